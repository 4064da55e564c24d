//! Paired comparison of two models on the same images: which images only one of them reads right, and
//! whether that split could be chance (the exact McNemar test). Differences of a few images on a few
//! hundred are usually churn, and this says how many are not.

/// Counts over the images both models were scored on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PairedCounts {
    /// Images scored by both.
    pub paired: usize,
    /// Images model A reads right.
    pub correct_a: usize,
    /// Images model B reads right.
    pub correct_b: usize,
    /// Images only model A reads right.
    pub only_a: usize,
    /// Images only model B reads right.
    pub only_b: usize,
}

impl PairedCounts {
    /// Adds one image, given whether each model read it right.
    pub fn add(&mut self, a_correct: bool, b_correct: bool) {
        self.paired += 1;
        self.correct_a += usize::from(a_correct);
        self.correct_b += usize::from(b_correct);
        self.only_a += usize::from(a_correct && !b_correct);
        self.only_b += usize::from(b_correct && !a_correct);
    }

    /// Two-sided exact McNemar p-value of the split (see [`mcnemar_exact`]).
    pub fn p_value(&self) -> f64 {
        mcnemar_exact(self.only_a, self.only_b)
    }
}

/// Two-sided exact McNemar test: the probability, if each discordant image were a fair coin between the two
/// models, of a split at least as uneven as `only_a` : `only_b`. 1 when there are no discordant images.
/// Summed in log space, so thousands of discordant images neither overflow nor underflow to a wrong 0.
pub fn mcnemar_exact(only_a: usize, only_b: usize) -> f64 {
    let n = only_a + only_b;
    if n == 0 {
        return 1.0;
    }
    let k = only_a.min(only_b);
    // ln C(n, i) for i = 0..=k, built up term by term.
    let mut ln_terms = Vec::with_capacity(k + 1);
    let mut ln_choose = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        ln_terms.push(ln_choose);
    }
    let max = ln_terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let ln_tail = max + ln_terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln();
    (2.0 * (ln_tail - n as f64 * std::f64::consts::LN_2).exp()).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_values() {
        // Hand-checkable: 0 vs 5 is 2 / 32; 1 vs 2 is 2 * (1 + 3) / 8, capped at 1.
        assert!((mcnemar_exact(0, 5) - 0.0625).abs() < 1e-15);
        assert!((mcnemar_exact(5, 0) - 0.0625).abs() < 1e-15);
        assert_eq!(mcnemar_exact(1, 2), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(7, 7), 1.0);
        // Exact sums (Python's integer math.comb) of binomtest(5, 33) and binomtest(10, 18).
        assert!((mcnemar_exact(5, 28) - 6.618_769_839_406_013e-5).abs() < 1e-15);
        assert!((mcnemar_exact(10, 8) - 0.814_529_418_945_312_5).abs() < 1e-12);
        // Large counts stay accurate: C(4000, 2000) and 2^4000 are far outside f64, their ratio is not.
        let p = mcnemar_exact(100, 400);
        assert!((p / 1.659_629_475_217_393_2e-43 - 1.0).abs() < 1e-9, "{p}");
        assert_eq!(mcnemar_exact(2000, 2000), 1.0);
        assert!((mcnemar_exact(1950, 2050) - 0.117_495_068_368_961_37).abs() < 1e-9);
    }

    #[test]
    fn counts() {
        let mut c = PairedCounts::default();
        for (a, b) in [
            (true, true),
            (true, false),
            (false, true),
            (false, true),
            (false, false),
        ] {
            c.add(a, b);
        }
        let expected = PairedCounts {
            paired: 5,
            correct_a: 2,
            correct_b: 3,
            only_a: 1,
            only_b: 2,
        };
        assert_eq!(c, expected);
        assert_eq!(c.p_value(), 1.0);
    }
}
