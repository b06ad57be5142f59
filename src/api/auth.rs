//! Bearer-token checks for the guarded routes (`--auth-token`).

use axum::http::{header, HeaderMap};

use crate::config::Secret;

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The credentials of `Authorization: Bearer <token>`. The scheme is case-insensitive
/// and may be followed by more than one space (RFC 9110 §11.1, §11.4).
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Whether a request may use a guarded route: always without `--auth-token`, else only
/// with the token as a bearer credential (compared in constant time).
pub(crate) fn authorized(auth: Option<&Secret>, headers: &HeaderMap) -> bool {
    match auth {
        None => true,
        Some(Secret(token)) => {
            bearer_token(headers).is_some_and(|given| same_secret(given, token.as_bytes()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn secrets_compare_by_content_and_length() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_must_match() {
        let token = Secret("s3cret".to_string());
        for (header, ok) in [
            (Some("Bearer s3cret"), true),
            (Some("bearer s3cret"), true),
            (Some("BEARER s3cret"), true),
            (Some("Bearer   s3cret"), true),
            (Some("Bearer s3cret "), true),
            (Some("Bearer wrong"), false),
            (Some("Bearer s3cre"), false),
            (Some("Bearers3cret"), false),
            (Some("Bearer"), false),
            (Some("Bearer "), false),
            (Some("Basic s3cret"), false),
            (Some("Token s3cret"), false),
            (Some("s3cret"), false),
            (None, false),
        ] {
            let mut h = HeaderMap::new();
            if let Some(v) = header {
                h.insert(header::AUTHORIZATION, HeaderValue::from_static(v));
            }
            assert_eq!(authorized(Some(&token), &h), ok, "{header:?}");
            assert!(authorized(None, &h), "no token configured: {header:?}");
        }
    }
}
