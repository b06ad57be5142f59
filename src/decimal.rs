//! Plain decimal numbers (`-12.345`, `1700000000123`) read from bytes, on the fast paths
//! the CSV scan and the line-protocol parser share. Hand-written because number parsing
//! is most of both hot loops; everything the fast paths do not take falls back to
//! `str::parse`, so the answers are always exactly `str::parse`'s.
//!
//! Why it is exact (Clinger's fast path): with at most 19 digits, an integer mantissa
//! `m <= 2^53` and at most 22 fraction digits, `m` and `10^k` are both exact `f64`s and
//! one IEEE division rounds correctly, i.e. to the correctly rounded decimal value.

/// Exact powers of ten representable in an `f64` (10^0 ..= 10^22).
pub const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// `[+-]?digits[.digits]` starting at `b[start]`, up to the first byte that is neither a
/// digit nor the first `.`: the value and where it stopped. `None` when it does not take
/// the fast path (no digit, more than 19 digits, a mantissa past 2^53): not "invalid",
/// only "ask `str::parse`".
#[inline(always)]
pub fn scan(b: &[u8], start: usize) -> Option<(f64, usize)> {
    let mut i = start;
    let neg = match b.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let mut m: u64 = 0;
    let mut digits = 0u32;
    let mut point: Option<usize> = None;
    while let Some(&c) = b.get(i) {
        let d = c.wrapping_sub(b'0');
        if d < 10 {
            if digits == 19 {
                return None;
            }
            m = m * 10 + u64::from(d);
            digits += 1;
        } else if c == b'.' && point.is_none() {
            point = Some(i);
        } else {
            break;
        }
        i += 1;
    }
    if digits == 0 || m > (1u64 << 53) {
        return None;
    }
    let frac = point.map_or(0, |p| i - p - 1);
    let v = m as f64 / *POW10.get(frac)?;
    Some((if neg { -v } else { v }, i))
}

/// The whole of `b` as a plain decimal, on the fast path (see [`scan`]).
#[inline(always)]
pub fn parse(b: &[u8]) -> Option<f64> {
    scan(b, 0).and_then(|(v, end)| (end == b.len()).then_some(v))
}

/// The value of eight ASCII digits, `None` if one is not a digit (SWAR: the classic
/// check and three multiplications that combine digit pairs, then pairs of pairs).
#[inline]
pub fn eight_digits(b: &[u8]) -> Option<u64> {
    let v = u64::from_le_bytes(b.try_into().ok()?);
    let high = v & 0xF0F0_F0F0_F0F0_F0F0;
    let carry = (v.wrapping_add(0x0606_0606_0606_0606) & 0xF0F0_F0F0_F0F0_F0F0) >> 4;
    if high | carry != 0x3333_3333_3333_3333 {
        return None;
    }
    let v = ((v & 0x0F0F_0F0F_0F0F_0F0F).wrapping_mul(2561)) >> 8;
    let v = ((v & 0x00FF_00FF_00FF_00FF).wrapping_mul(6_553_601)) >> 16;
    Some(((v & 0x0000_FFFF_0000_FFFF).wrapping_mul(42_949_672_960_001)) >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_gives_what_str_parse_gives_or_steps_aside() {
        // (text, where scan stops or None when it steps aside)
        let cases: &[(&str, Option<usize>)] = &[
            ("0", Some(1)),
            ("-0", Some(2)),
            ("+5.25", Some(5)),
            (".5", Some(2)),
            ("5.", Some(2)),
            ("-12.345,", Some(7)),
            ("1.2.3", Some(3)),
            ("12 x", Some(2)),
            ("9007199254740992", Some(16)),
            ("9007199254740993", None),
            ("1234567890123456789", None),
            ("0.000000000000000001", Some(20)),
            ("0.0000000000000000001", None),
            ("1e5", Some(1)),
            ("", None),
            ("-", None),
            (".", None),
            ("x1", None),
        ];
        for &(s, stop) in cases {
            let got = scan(s.as_bytes(), 0);
            assert_eq!(got.map(|(_, end)| end), stop, "{s:?}");
            if let Some((v, end)) = got {
                let want: f64 = s[..end].parse().unwrap();
                assert_eq!(v.to_bits(), want.to_bits(), "{s:?}");
            }
        }
        assert_eq!(parse(b"-12.5"), Some(-12.5));
        assert_eq!(parse(b"12.5x"), None);
        assert_eq!(scan(b"a=-1.5 7", 2), Some((-1.5, 6)));
    }

    #[test]
    fn eight_digits_at_a_time_match_one_at_a_time() {
        for s in [
            "00000000",
            "12345678",
            "99999999",
            "17957877",
            "1234567/",
            "1234567:",
            "a2345678",
            "1234 678",
            "-1234567",
            "0000000\u{b0}",
        ] {
            let b = s.as_bytes();
            let want = s
                .parse::<u64>()
                .ok()
                .filter(|_| b.iter().all(u8::is_ascii_digit));
            assert_eq!(b.get(..8).and_then(eight_digits), want, "{s}");
        }
        assert_eq!(eight_digits(b"1234567"), None, "fewer than eight bytes");
    }
}
