//! Neumaier (improved Kahan–Babuška) compensated summation, the one accurate running sum
//! that the statistics, the CSV scan and the series aggregates share: its error does not
//! grow with the number of terms, so a billion small values do not drift.

/// A compensated running sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neumaier {
    sum: f64,
    comp: f64,
}

impl Default for Neumaier {
    /// Starts at `+0.0`, so an empty sum reads as `0.0`.
    fn default() -> Self {
        Neumaier {
            sum: 0.0,
            comp: 0.0,
        }
    }
}

impl Neumaier {
    /// Starts at `-0.0`, the true additive identity (`-0.0 + x == x` for every `x`,
    /// `-0.0` included): for aggregates that must reproduce IEEE sums bit for bit.
    pub const IDENTITY: Neumaier = Neumaier {
        sum: -0.0,
        comp: 0.0,
    };

    #[inline(always)]
    pub fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.comp += (self.sum - t) + x;
        } else {
            self.comp += (x - t) + self.sum;
        }
        self.sum = t;
    }

    /// Folds another partial sum in (as if its terms had been added after ours).
    pub fn merge(&mut self, other: &Neumaier) {
        self.add(other.sum);
        self.comp += other.comp;
    }

    /// This sum times `k`; exact when `k` is a power of two and nothing overflows or
    /// turns subnormal (used to sum totals whose plain sum would overflow).
    pub fn scaled(&self, k: f64) -> Neumaier {
        Neumaier {
            sum: self.sum * k,
            comp: self.comp * k,
        }
    }

    /// The compensated total. Once the running sum is infinite or NaN the compensation
    /// is meaningless (`inf - inf` is NaN), so the plain IEEE sum is returned; a zero
    /// compensation is not added, which keeps the sign of a `-0.0` sum.
    pub fn value(&self) -> f64 {
        if self.sum.is_finite() && self.comp != 0.0 {
            self.sum + self.comp
        } else {
            self.sum
        }
    }
}

/// `2^-1000`: [`WideSum::hi`] counts units of `2^1000`.
const WIDE_UNIT_INV: f64 = f64::from_bits((1023 - 1000) << 52);
/// `2^-64` and `2^64`: the scale of the fallback sum of [`WideSum::sum_with`], room
/// for 2^64 totals of up to `f64::MAX` each.
const SCALE_DOWN: f64 = f64::from_bits((1023 - 64) << 52);
const SCALE_UP: f64 = f64::from_bits((1023 + 64) << 52);
/// `2^936`: a `hi` unit in the scaled domain (`2^1000 · 2^-64`).
const WIDE_UNIT_SCALED: f64 = f64::from_bits((1023 + 936) << 52);

/// A sum of finite totals that never overflows: `lo + hi · 2^1000`. Series totals are
/// finite, but the totals of removed series, added up forever, need not be; this keeps
/// them exact enough that `/getSum` comes back to a number when live totals offset them.
#[derive(Debug, Clone, Copy, Default)]
pub struct WideSum {
    lo: Neumaier,
    hi: Neumaier,
}

impl WideSum {
    pub fn add(&mut self, t: Neumaier) {
        let mut lo = self.lo;
        lo.merge(&t);
        if lo.value().is_finite() {
            self.lo = lo;
            return;
        }
        // |lo + t| > f64::MAX, so the larger of the two is at least f64::MAX / 2: moving
        // it into `hi` (a power-of-two scaling) loses nothing.
        let (big, small) = if t.value().abs() >= self.lo.value().abs() {
            (t, self.lo)
        } else {
            (self.lo, t)
        };
        self.hi.merge(&big.scaled(WIDE_UNIT_INV));
        self.lo = small;
    }

    /// `self + Σ live`, as `f64`: the plain compensated sum when no partial sum
    /// overflows, else the same sum scaled by `2^-64` (exact for totals of normal size) and
    /// scaled back, which overflows only if the result itself does.
    pub fn sum_with(&self, live: &[Neumaier]) -> f64 {
        let hi = self.hi.value();
        if hi == 0.0 {
            let mut n = self.lo;
            for t in live {
                n.merge(t);
            }
            let v = n.value();
            if v.is_finite() {
                return v;
            }
        }
        // Live totals and `lo` add up to at most (2^27 + 1) · 2^1024 (--max-series is at most
        // 10^8 < 2^27): a `hi` part of 2^80 units (2^1080) or more decides the result alone.
        if hi.abs() >= f64::from_bits((1023 + 80) << 52) {
            return f64::INFINITY.copysign(hi);
        }
        let mut n = self.lo.scaled(SCALE_DOWN);
        for t in live {
            n.merge(&t.scaled(SCALE_DOWN));
        }
        n.merge(&self.hi.scaled(WIDE_UNIT_SCALED));
        n.value() * SCALE_UP
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_terms_do_not_drift_and_special_values_keep_ieee_meaning() {
        let mut s = Neumaier::default();
        s.add(1e16);
        for _ in 0..10_000 {
            s.add(1.0);
        }
        s.add(-1e16);
        assert_eq!(s.value(), 10_000.0);

        let mut inf = Neumaier::default();
        inf.add(f64::INFINITY);
        inf.add(1.0);
        assert_eq!(inf.value(), f64::INFINITY);

        let mut neg_zero = Neumaier::IDENTITY;
        neg_zero.add(-0.0);
        assert!(neg_zero.value() == 0.0 && neg_zero.value().is_sign_negative());
        assert!(Neumaier::default().value().is_sign_positive());

        let (mut a, mut b) = (Neumaier::default(), Neumaier::default());
        a.add(0.1);
        a.add(0.2);
        b.add(0.3);
        a.merge(&b);
        assert!((a.value() - 0.6).abs() < 1e-15);
    }

    #[test]
    fn summing_totals_matches_exact_arithmetic_in_and_out_of_range() {
        let max = f64::MAX;
        let n = |v: &[f64]| {
            let mut x = Neumaier::default();
            v.iter().for_each(|&v| x.add(v));
            x
        };
        // (dropped totals in order, live totals, expected)
        let cases: &[(&[f64], &[f64], f64)] = &[
            (&[], &[], 0.0),
            (&[1.5, 2.0], &[0.25], 3.75),
            (&[max, max], &[-max], max),
            (&[max, max, max], &[-max, -max], max),
            (&[max], &[max], f64::INFINITY),
            (&[-max], &[-max, 1.0], f64::NEG_INFINITY),
            (&[max, -max, max], &[], max),
            (&[1e300, max, max, -max], &[-max, 0.5e300], 1.5e300),
        ];
        for (i, &(dropped, live, expect)) in cases.iter().enumerate() {
            let mut w = WideSum::default();
            dropped.iter().for_each(|&d| w.add(n(&[d])));
            let live: Vec<Neumaier> = live.iter().map(|&v| n(&[v])).collect();
            assert_eq!(w.sum_with(&live), expect, "case {i}");
        }
    }
}
