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
}
