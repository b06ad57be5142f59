//! Cell → `f64` parsing and compensated (Neumaier) summation.
//!
//! `parse_f64` must give exactly what `str::parse::<f64>` gives: a SWAR path for cells
//! of up to 8 bytes, the shared plain-decimal fast path ([`crate::decimal`], Clinger's)
//! for longer ones, and `str::parse` for everything else (exponents, long mantissas,
//! `inf`, `NaN`, garbage).

use crate::decimal::{self, POW10};

/// Why a non-empty cell is not a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CellError {
    InvalidUtf8,
    NotANumber,
}

/// SWAR path for the commonest shape: `[+-]?` then at most 8 bytes of digits
/// with at most one `.`. Reads the 8 bytes at the cell start in one load
/// (bytes past the cell are masked off), so it needs 8 readable bytes.
/// Same exactness argument as `decimal::scan` (w < 10^8, k <= 7).
#[inline(always)]
fn swar_f64(data: &[u8], start: usize, end: usize) -> Option<f64> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let first = *data.get(start)?;
    let neg = first == b'-';
    let start = start + usize::from(neg || first == b'+');
    let len = end.checked_sub(start)?;
    if len == 0 || len > 8 {
        return None;
    }
    let bytes: [u8; 8] = data.get(start..start + 8)?.try_into().ok()?;
    let x = u64::from_le_bytes(bytes) & (u64::MAX >> (64 - 8 * len));
    // Per kept byte, 0x80 iff it is not an ASCII digit (exact, carry-free).
    let v = x ^ (ONES * 0x30);
    let nondigit =
        (((v & (ONES * 0x7F)) + ONES * 0x76) | v) & (ONES * 0x80) & (u64::MAX >> (64 - 8 * len));
    let (y, n, k) = if nondigit == 0 {
        (x, len, 0)
    } else {
        // Exactly one non-digit, and it is the dot.
        if nondigit & (nondigit - 1) != 0 {
            return None;
        }
        let d = (nondigit.trailing_zeros() / 8) as usize;
        if (x >> (8 * d)) as u8 != b'.' {
            return None;
        }
        let lo = x & ((1u64 << (8 * d)) - 1);
        let hi = (x >> (8 * d) >> 8) << (8 * d);
        (lo | hi, len - 1, len - 1 - d)
    };
    if n == 0 {
        return None;
    }
    // Digit values, first digit in the lowest byte; left-pad with zeros.
    let z = (y ^ ((ONES * 0x30) & (u64::MAX >> (64 - 8 * n)))) << (8 * (8 - n));
    let z = z.wrapping_mul(10).wrapping_add(z >> 8);
    let mask = 0x0000_00FF_0000_00FF;
    let mul1 = 100 + (1_000_000u64 << 32);
    let mul2 = 1 + (10_000u64 << 32);
    let w = ((z & mask)
        .wrapping_mul(mul1)
        .wrapping_add(((z >> 16) & mask).wrapping_mul(mul2)))
        >> 32;
    let r = (w as u32) as f64 / POW10[k];
    Some(if neg { -r } else { r })
}

/// Parses the non-empty unquoted cell `data[start..end]` exactly like
/// `str::parse::<f64>`.
#[inline(always)]
pub(crate) fn parse_at(data: &[u8], start: usize, end: usize) -> Result<f64, CellError> {
    if let Some(v) = swar_f64(data, start, end) {
        return Ok(v);
    }
    parse_f64(&data[start..end])
}

/// Parses a non-empty cell exactly like `str::parse::<f64>` (no trimming).
#[inline]
pub(crate) fn parse_f64(b: &[u8]) -> Result<f64, CellError> {
    if let Some(v) = decimal::parse(b) {
        return Ok(v);
    }
    slow_f64(b)
}

#[cold]
#[inline(never)]
fn slow_f64(b: &[u8]) -> Result<f64, CellError> {
    let s = std::str::from_utf8(b).map_err(|_| CellError::InvalidUtf8)?;
    s.parse::<f64>().map_err(|_| CellError::NotANumber)
}

pub(crate) use crate::neumaier::Neumaier;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_path_equals_std_parse() {
        let cases = [
            "0",
            "-0",
            "+0",
            "0.0",
            "-0.0",
            "1",
            "123.456",
            "-123.456",
            "+5.25",
            ".5",
            "5.",
            "-.5",
            "0.1",
            "0.2",
            "0.3",
            "9007199254740992",
            "9007199254740993",
            "9007199254740991.5",
            "1234567890123456789",
            "12345678901234567890",
            "0.0000000000000000000001",
            "0.00000000000000000000001",
            "3.141592653589793",
            "2.718281828459045235",
            "00000000000000000001.5",
            "1e5",
            "1E-5",
            "inf",
            "-inf",
            "NaN",
            "nan",
            "infinity",
            "1_0",
            "0x10",
            " 1",
            "1 ",
            "",
            ".",
            "-",
            "+",
            "1..2",
            "1.2.3",
            "--1",
            "1-",
            "١",
        ];
        for s in cases {
            let std = s.parse::<f64>().ok();
            let ours = if s.is_empty() {
                None
            } else {
                parse_f64(s.as_bytes()).ok()
            };
            match (std, ours) {
                (Some(a), Some(b)) => {
                    assert!(
                        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                        "{s}: {a} vs {b}"
                    )
                }
                (None, None) => {}
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[test]
    fn fast_path_random_decimals_equal_std_parse() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200_000 {
            let int_digits = rng.random_range(0..12);
            let frac_digits = rng.random_range(0..12);
            let mut s = String::new();
            if rng.random_bool(0.3) {
                s.push('-');
            }
            for _ in 0..int_digits {
                s.push(char::from(b'0' + rng.random_range(0..10u8)));
            }
            if frac_digits > 0 || rng.random_bool(0.5) {
                s.push('.');
            }
            for _ in 0..frac_digits {
                s.push(char::from(b'0' + rng.random_range(0..10u8)));
            }
            let std = s.parse::<f64>().ok();
            let ours = parse_f64(s.as_bytes()).ok();
            assert_eq!(std.map(f64::to_bits), ours.map(f64::to_bits), "{s}");
        }
    }

    #[test]
    fn swar_path_equals_std_parse() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let alphabet = b"0123456789.-+e,x";
        for i in 0..300_000 {
            let len = rng.random_range(1..11);
            let mut cell: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.random_bool(0.8) {
                        b'0' + rng.random_range(0..10u8)
                    } else {
                        alphabet[rng.random_range(0..alphabet.len())]
                    }
                })
                .collect();
            if i % 3 == 0 {
                cell.insert(0, b'-');
            }
            // Cell followed by junk (read by the 8-byte load) or at the end.
            let mut data = vec![b'9'; rng.random_range(0..3)];
            let start = data.len();
            data.extend_from_slice(&cell);
            let end = data.len();
            if i % 2 == 0 {
                data.extend_from_slice(b"7.5,19\n88");
            }
            let text = String::from_utf8_lossy(&cell).into_owned();
            let std = text.parse::<f64>().ok().map(f64::to_bits);
            let ours = parse_at(&data, start, end).ok().map(f64::to_bits);
            assert_eq!(std, ours, "{text:?}");
        }
    }

    #[test]
    fn invalid_utf8_is_reported() {
        assert_eq!(parse_f64(b"\xff1"), Err(CellError::InvalidUtf8));
        assert_eq!(parse_f64(b"abc"), Err(CellError::NotANumber));
    }

    #[test]
    fn neumaier_does_not_drift() {
        let mut n = Neumaier::default();
        let mut naive = 0.0f64;
        n.add(1e16);
        naive += 1e16;
        for _ in 0..10_000 {
            n.add(1.0);
            naive += 1.0;
        }
        assert_eq!(n.value(), 1e16 + 10_000.0);
        assert_ne!(naive, 1e16 + 10_000.0);
        let mut inf = Neumaier::default();
        inf.add(f64::INFINITY);
        inf.add(1.0);
        assert_eq!(inf.value(), f64::INFINITY);
        let mut merged = Neumaier::default();
        merged.merge(&inf);
        assert_eq!(merged.value(), f64::INFINITY);
    }
}
