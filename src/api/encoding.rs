//! Compressed request bodies (`Content-Encoding: gzip`, what Telegraf and other agents send
//! with compression on): the body's limit applies twice, to the bytes on the wire and to
//! the bytes they inflate to, so a gzip bomb answers 413 having cost no more memory than
//! the limit. Any other encoding answers 415 naming the ones taken.

use std::io::Read;

use axum::http::{header, HeaderMap};

/// Why a body could not be read; `error.rs` maps it to 415, 413 and 400 (this room
/// imports nothing of the api's).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("Content-Encoding {0} is not supported; send the body as gzip or uncompressed")]
    Unsupported(String),
    #[error("the body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("the gzip body does not inflate: {0}")]
    Corrupt(String),
}

/// How a request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

/// The request's `Content-Encoding`: none or `identity`, or `gzip` (`x-gzip`).
pub fn of(headers: &HeaderMap) -> Result<Encoding, BodyError> {
    let mut values = headers.get_all(header::CONTENT_ENCODING).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return match headers.contains_key(header::CONTENT_ENCODING) {
            false => Ok(Encoding::Identity),
            true => Err(BodyError::Unsupported("several encodings".into())),
        };
    };
    let v = v.to_str().unwrap_or("").trim();
    if v.eq_ignore_ascii_case("identity") || v.is_empty() {
        Ok(Encoding::Identity)
    } else if v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("x-gzip") {
        Ok(Encoding::Gzip)
    } else {
        Err(BodyError::Unsupported(v.to_string()))
    }
}

/// Inflates `gzip` (one member or several, as `cat a.gz b.gz` makes) into `out`, at most
/// `limit` bytes: more is 413, and nothing past `limit + 1` bytes is ever held.
pub fn gunzip_into(gzip: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), BodyError> {
    out.clear();
    let mut inflate = flate2::read::MultiGzDecoder::new(gzip).take(limit as u64 + 1);
    inflate
        .read_to_end(out)
        .map_err(|e| BodyError::Corrupt(e.to_string()))?;
    if out.len() > limit {
        out.clear();
        out.shrink_to(limit);
        return Err(BodyError::TooLarge(limit));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn bodies_inflate_within_the_limit_and_a_bomb_is_refused() {
        let mut out = Vec::new();
        let mut two = gzip(b"a,b=1 v=1\n");
        two.extend(gzip(b"a,b=2 v=2\n"));
        gunzip_into(&two, &mut out, 100).unwrap();
        assert_eq!(out, b"a,b=1 v=1\na,b=2 v=2\n");
        // 64 MiB of zeros in a few hundred KiB, against a 1 MiB limit.
        let bomb = gzip(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        let e = gunzip_into(&bomb, &mut out, 1 << 20).unwrap_err();
        assert!(matches!(e, BodyError::TooLarge(n) if n == 1 << 20));
        assert!(out.capacity() <= 2 << 20, "{}", out.capacity());
        let e = gunzip_into(b"not gzip", &mut out, 100).unwrap_err();
        assert!(e.to_string().contains("does not inflate"), "{e}");
    }

    #[test]
    fn the_encoding_is_named_or_refused() {
        let h = |v: &[&str]| {
            let mut h = HeaderMap::new();
            for v in v {
                h.append(header::CONTENT_ENCODING, v.parse().unwrap());
            }
            of(&h).map_err(|e| e.to_string())
        };
        assert_eq!(h(&[]), Ok(Encoding::Identity));
        assert_eq!(h(&["identity"]), Ok(Encoding::Identity));
        assert_eq!(h(&["GZIP"]), Ok(Encoding::Gzip));
        assert_eq!(h(&["x-gzip"]), Ok(Encoding::Gzip));
        let e = h(&["br"]).unwrap_err();
        assert!(
            e.contains("Content-Encoding br") && e.contains("gzip"),
            "{e}"
        );
        assert!(h(&["gzip", "gzip"]).is_err());
    }
}
