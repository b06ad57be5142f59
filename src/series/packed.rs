//! Sealed blocks as the store keeps them: the smaller of a Gorilla block ([`gorilla`]) and
//! a *packed* block, columns of small integers compressed with zstd.
//!
//! # Why a packed form, and why it is hand-written
//!
//! Gorilla spends 9 bits on a timestamp whose delta-of-delta is a few dozen ms (a poll
//! every second with network jitter) and ~7 bits on a small integer value, because its
//! codes are fixed-width. What agents send is mostly that: timestamps on a jittered grid
//! and decimals with a few digits (`12.345`, integers). The packed form turns both into
//! small integers, one byte each in the common case, and leaves the entropy coding to
//! zstd (a well-kept general compressor, here as a Huffman coder for the byte columns).
//! The transforms before it are the product's edge, as Gorilla is: they decide bytes per
//! point, they must be exact for every `f64` and `i64`, and they must decode fast, so we
//! own them; they are a few dozen lines each.
//!
//! # Packed format (version 1)
//!
//! After one tag byte (`0` Gorilla, `1` packed), a packed block is: a varint with the size
//! of the compressed timestamp column, that column (a zstd frame), then the value column:
//! a mode byte, an exponent byte, a width `w` (1 to 8) and `zz(base)`, then `w` byte
//! planes of `u_i`, least significant first, each a varint size and a zstd frame (each
//! plane its own frame, so its own Huffman table). Varints are LEB128; `zz` is zigzag
//! (0, -1, 1, -2, ... as 0, 1, 2, 3, ...).
//!
//! * Timestamps: `zz(t0)`, `zz(d1)` with `d1 = t1 - t0`, then for each later point one
//!   byte `x = d_i - d1` when `-127 <= x <= 127`, else `0x80` and `zz(x)`. A jittered
//!   grid costs one byte of ~6 bits of entropy per point, a regular one a byte of zero.
//! * Values, by mode:
//!   * 0, decimal: every value is exactly `m_i / 10^e` (`|m_i| <= 2^53`; checked bit for
//!     bit, so `-0.0` and NaN never take this mode), `u_i = m_i - base` with `base` the
//!     smallest `m_i` (frame of reference);
//!   * 1, decimal deltas: as mode 0 with `d_i = m_i - m_{i-1}` (`m_{-1} = 0`) in place of
//!     `m_i`, for values that move slowly;
//!   * 2, bits: `u_i` is the XOR of each value's bits with the previous one's (the first
//!     with 0), `base` 0 (zstd then finds the zero and near-constant planes).
//!
//! The encoder builds both decimal modes when they apply and keeps the one whose byte
//! histogram has less entropy, and it keeps the Gorilla form when that is not larger.

use std::cell::RefCell;

use super::gorilla::{BlockEncoder, SealedBlock};

/// Largest decimal exponent tried for mode 0 and 1 (`0.000001` steps).
const MAX_EXP: usize = 9;
/// zstd level: the columns are entropy-coded bytes with few repeats, where higher levels
/// gain little and cost seal time (negative levels would skip the Huffman coding).
const LEVEL: i32 = 1;

/// Exact powers of ten.
const POW10: [f64; MAX_EXP + 1] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// A sealed block of points in time order (see the module docs). Immutable.
#[derive(Clone, Debug)]
pub struct Block {
    data: Box<[u8]>,
    count: u32,
}

impl Block {
    /// Encodes points sorted by timestamp (at most `u32::MAX`), in the smaller form.
    pub fn encode(points: &[(i64, f64)]) -> Block {
        let count = points.len().min(u32::MAX as usize);
        let points = &points[..count];
        let data = match pack(points) {
            // Decimal columns are always far smaller than Gorilla: skip building it.
            Some((p, true)) => p,
            Some((p, false)) => {
                let gorilla = gorilla_bytes(points);
                if p.len() < gorilla.len() {
                    p
                } else {
                    gorilla
                }
            }
            None => gorilla_bytes(points),
        };
        Block {
            data: data.into_boxed_slice(),
            count: count as u32,
        }
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// `true` for a block without points.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes held for the points.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// `true` when the block is kept in the packed form.
    pub fn is_packed(&self) -> bool {
        self.data.first() == Some(&1)
    }

    /// Appends the points to `out`, in order.
    pub fn decode_into(&self, out: &mut Vec<(i64, f64)>) {
        let before = out.len();
        let ok = match self.data.split_first() {
            Some((0, bytes)) => match SealedBlock::from_raw(bytes, self.count) {
                Ok(b) => {
                    out.extend(b.iter());
                    true
                }
                Err(_) => false,
            },
            Some((1, bytes)) => unpack(bytes, self.count as usize, out).is_some(),
            _ => self.count == 0,
        };
        if !ok {
            // Unreachable for a block built by `encode`; yield nothing rather than garbage.
            debug_assert!(false, "corrupt sealed block");
            out.truncate(before);
        }
    }

    /// The points, in order.
    pub fn points(&self) -> Vec<(i64, f64)> {
        let mut out = Vec::with_capacity(self.len());
        self.decode_into(&mut out);
        out
    }
}

fn gorilla_bytes(points: &[(i64, f64)]) -> Vec<u8> {
    let mut enc = BlockEncoder::with_capacity(points.len());
    for &(t, v) in points {
        // Sorted and fewer than u32::MAX: push cannot fail.
        let _ = enc.push(t, v);
    }
    let block = enc.finish();
    let mut out = Vec::with_capacity(block.byte_len() + 1);
    out.push(0);
    out.extend_from_slice(block.as_bytes());
    out
}

#[inline]
fn zz(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
fn unzz(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

#[inline]
fn put_varint(out: &mut Vec<u8>, mut u: u64) {
    while u >= 0x80 {
        out.push(u as u8 | 0x80);
        u >>= 7;
    }
    out.push(u as u8);
}

#[inline]
fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut u = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        u |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(u);
        }
    }
    None
}

/// The decimal exponent and mantissas that give back every value bit for bit, if any.
fn decimal(points: &[(i64, f64)]) -> Option<(usize, Vec<i64>)> {
    // Checked on what the decoder computes, so `-0.0` (whose mantissa is 0) fails.
    let exact = |v: f64, e: usize| -> Option<i64> {
        let m = (v * POW10[e]).round();
        if m.is_nan() || m.abs() > (1u64 << 53) as f64 {
            return None;
        }
        let m = m as i64;
        ((m as f64 / POW10[e]).to_bits() == v.to_bits()).then_some(m)
    };
    let mut e = 0;
    for &(_, v) in points {
        while exact(v, e).is_none() {
            e += 1;
            if e > MAX_EXP {
                return None;
            }
        }
    }
    points
        .iter()
        .map(|&(_, v)| exact(v, e))
        .collect::<Option<Vec<i64>>>()
        .map(|m| (e, m))
}

/// Entropy of the bytes' histogram, in bits: what a Huffman coder gets near.
fn entropy_bits(bytes: &[u8]) -> f64 {
    let mut hist = [0u32; 256];
    for &b in bytes {
        hist[b as usize] += 1;
    }
    let n = bytes.len() as f64;
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let c = f64::from(c);
            -c * (c / n).log2()
        })
        .sum()
}

fn compress(bytes: &[u8]) -> Option<Vec<u8>> {
    thread_local! {
        static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { RefCell::new(None) };
    }
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(LEVEL).ok();
        }
        c.as_mut()?.compress(bytes).ok()
    })
}

fn decompress(frame: &[u8], capacity: usize) -> Option<Vec<u8>> {
    thread_local! {
        static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { RefCell::new(None) };
    }
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        d.as_mut()?.decompress(frame, capacity).ok()
    })
}

/// Bytes of a timestamp column of `n` points at most.
fn ts_capacity(n: usize) -> usize {
    20 + n * 11
}

/// The packed form (tag byte included) and whether its values are decimal, or `None` if
/// zstd failed.
fn pack(points: &[(i64, f64)]) -> Option<(Vec<u8>, bool)> {
    let (&(t0, _), rest) = points.split_first()?;
    let mut ts = Vec::with_capacity(points.len() + 16);
    put_varint(&mut ts, zz(t0));
    let d1 = rest.first().map_or(0, |p| p.0.wrapping_sub(t0));
    put_varint(&mut ts, zz(d1));
    let mut prev = t0;
    for (i, &(t, _)) in rest.iter().enumerate() {
        let x = t.wrapping_sub(prev).wrapping_sub(d1);
        prev = t;
        if i == 0 {
            continue;
        }
        if (-127..=127).contains(&x) {
            ts.push(x as i8 as u8);
        } else {
            ts.push(0x80);
            put_varint(&mut ts, zz(x));
        }
    }
    let dec = decimal(points);
    let is_decimal = dec.is_some();
    // (mode, exponent, base, offsets from the base)
    let (mode, e, base, values) = match dec {
        Some((e, m)) => {
            let delta: Vec<i64> = std::iter::once(0)
                .chain(m.iter().copied())
                .zip(m.iter())
                .map(|(prev, &m)| m.wrapping_sub(prev))
                .collect();
            let (raw_base, raw) = offsets(&m);
            let (delta_base, delta) = offsets(&delta);
            if planes_entropy(&delta) < planes_entropy(&raw) {
                (1, e, delta_base, delta)
            } else {
                (0, e, raw_base, raw)
            }
        }
        None => {
            let mut last = 0u64;
            let x = points
                .iter()
                .map(|&(_, v)| {
                    let x = v.to_bits() ^ last;
                    last = v.to_bits();
                    x
                })
                .collect();
            (2, 0, 0, x)
        }
    };
    let ts = compress(&ts)?;
    let mut out = Vec::with_capacity(16 + ts.len() + values.len() * 2);
    out.push(1);
    put_varint(&mut out, ts.len() as u64);
    out.extend_from_slice(&ts);
    let w = width(&values);
    out.extend_from_slice(&[mode, e as u8, w as u8]);
    put_varint(&mut out, zz(base));
    let n = values.len();
    let mut plane = vec![0u8; n];
    for k in 0..w {
        for (byte, v) in plane.iter_mut().zip(&values) {
            *byte = (v >> (8 * k)) as u8;
        }
        let frame = compress(&plane)?;
        put_varint(&mut out, frame.len() as u64);
        out.extend_from_slice(&frame);
    }
    Some((out, is_decimal))
}

/// The smallest value and every value's offset from it (frame of reference: the offsets
/// are small non-negative numbers when the values lie close together).
fn offsets(values: &[i64]) -> (i64, Vec<u64>) {
    let base = values.iter().copied().min().unwrap_or(0);
    (
        base,
        values
            .iter()
            .map(|&v| v.wrapping_sub(base) as u64)
            .collect(),
    )
}

/// Bytes that hold every value (at least one).
fn width(values: &[u64]) -> usize {
    let max = values.iter().fold(0, |a, &v| a | v);
    (8 - max.leading_zeros() as usize / 8).max(1)
}

/// The entropy, in bits, of the values' byte planes, each with its own histogram (each
/// plane is its own zstd frame, so its own Huffman table).
fn planes_entropy(values: &[u64]) -> f64 {
    (0..width(values))
        .map(|k| {
            let plane: Vec<u8> = values.iter().map(|v| (v >> (8 * k)) as u8).collect();
            entropy_bits(&plane)
        })
        .sum()
}

/// Appends the `n` points of a packed block (without its tag byte) to `out`.
fn unpack(b: &[u8], n: usize, out: &mut Vec<(i64, f64)>) -> Option<()> {
    if n == 0 {
        return None;
    }
    let mut at = 0;
    let ts_len = usize::try_from(get_varint(b, &mut at)?).ok()?;
    let ts = decompress(b.get(at..at.checked_add(ts_len)?)?, ts_capacity(n))?;
    at += ts_len;
    let &[mode, e, w] = b.get(at..at + 3)? else {
        return None;
    };
    at += 3;
    let (w, base) = (usize::from(w), unzz(get_varint(b, &mut at)?));
    if !(1..=8).contains(&w) {
        return None;
    }
    let mut values = vec![0u64; n];
    for k in 0..w {
        let len = usize::try_from(get_varint(b, &mut at)?).ok()?;
        let plane = decompress(b.get(at..at.checked_add(len)?)?, n)?;
        at += len;
        if plane.len() != n {
            return None;
        }
        for (v, &byte) in values.iter_mut().zip(&plane) {
            *v |= u64::from(byte) << (8 * k);
        }
    }
    if at != b.len() {
        return None;
    }
    let start = out.len();
    out.reserve(n);
    // Timestamps.
    let mut at = 0;
    let mut t = unzz(get_varint(&ts, &mut at)?);
    let d1 = unzz(get_varint(&ts, &mut at)?);
    out.push((t, 0.0));
    if n > 1 {
        t = t.wrapping_add(d1);
        out.push((t, 0.0));
        for _ in 2..n {
            let byte = *ts.get(at)?;
            at += 1;
            let x = if byte == 0x80 {
                unzz(get_varint(&ts, &mut at)?)
            } else {
                i64::from(byte as i8)
            };
            t = t.wrapping_add(d1.wrapping_add(x));
            out.push((t, 0.0));
        }
    }
    if at != ts.len() {
        return None;
    }
    // Values.
    let pts = &mut out[start..];
    match mode {
        0 | 1 => {
            let scale = *POW10.get(usize::from(e))?;
            let mut m = 0i64;
            for (p, &v) in pts.iter_mut().zip(&values) {
                let v = base.wrapping_add(v as i64);
                m = if mode == 0 { v } else { m.wrapping_add(v) };
                p.1 = m as f64 / scale;
            }
        }
        2 => {
            let mut last = 0u64;
            for (p, &x) in pts.iter_mut().zip(&values) {
                last ^= x;
                p.1 = f64::from_bits(last);
            }
        }
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(points: &[(i64, f64)]) -> Block {
        let b = Block::encode(points);
        let got = b.points();
        assert_eq!(got.len(), points.len());
        for (g, p) in got.iter().zip(points) {
            assert_eq!((g.0, g.1.to_bits()), (p.0, p.1.to_bits()), "{p:?}");
        }
        b
    }

    #[test]
    fn every_kind_of_block_decodes_bit_for_bit() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let t0 = 1_800_000_000_000i64;
        let cases: Vec<Vec<(i64, f64)>> = vec![
            vec![],
            vec![(5, 1.0)],
            vec![(i64::MIN, -0.0), (i64::MAX, f64::NAN)],
            (0..1024).map(|i| (t0 + i * 1000, 1.0)).collect(),
            (0..1024)
                .map(|i| {
                    (
                        t0 + i * 1000 + (next() % 41) as i64 - 20,
                        (10 + next() % 16) as f64,
                    )
                })
                .collect(),
            (0..1024)
                .map(|i| (t0 + i * 1000, (next() % 100_000) as f64 / 1000.0))
                .collect(),
            (0..1024)
                .map(|i| (t0 + i, f64::from_bits(next() >> 2)))
                .collect(),
            (0..1024)
                .map(|i| {
                    (
                        t0 + (i * i * 37) % 5_000_000 + i * 10_000,
                        -(i as f64) * 0.1,
                    )
                })
                .collect(),
            (0..300)
                .map(|i| {
                    (
                        t0 + i * 1000,
                        [0.1, -0.0, f64::INFINITY, 1e300, 5e-324][i as usize % 5],
                    )
                })
                .collect(),
            (0..300)
                .map(|i| (t0 + (i / 7), (i % 3) as f64 * 0.25 - 1e15))
                .collect(),
        ];
        let mut packed = 0;
        for pts in &cases {
            let mut sorted = pts.clone();
            sorted.sort_by_key(|p| p.0);
            packed += usize::from(roundtrip(&sorted).is_packed());
        }
        assert!(packed >= 4, "{packed} packed");
    }

    #[test]
    fn jittered_small_integers_take_under_one_and_a_half_bytes_a_point() {
        let mut x: u64 = 7;
        let mut next = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 33
        };
        let pts: Vec<(i64, f64)> = (0..1024)
            .map(|i| {
                (
                    1_800_000_000_000 + i * 1000 + (next() % 41) as i64 - 20,
                    (10 + next() % 16) as f64,
                )
            })
            .collect();
        let b = roundtrip(&pts);
        assert!(b.is_packed());
        assert!(b.byte_len() < 1024 * 3 / 2, "{} bytes", b.byte_len());
    }
}
