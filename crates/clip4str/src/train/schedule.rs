//! torch's `OneCycleLR` with the reference's settings (SPEC §12.7): cosine warm-up from `max_lr / 25` to
//! `max_lr` over `pct_start` of the run, then cosine decay to `max_lr / 25 / 1e4`; no momentum cycling.

use super::optim::AdamW;
use super::TrainError;

/// One-cycle learning-rate schedule for several groups, stepped once per optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct OneCycleLr {
    max_lrs: Vec<f64>,
    total_steps: usize,
    pct_start: f64,
    div_factor: f64,
    final_div_factor: f64,
    step: usize,
}

/// `end + (start - end) / 2 * (cos(pi * pct) + 1)`.
fn cos_anneal(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0)
}

/// Position inside a phase of `len` steps. torch divides by zero (and yields NaN learning rates) when a phase
/// is shorter than one step, e.g. a 1-step warm-up; such a phase counts as already complete.
fn phase_pct(step: f64, len: f64) -> f64 {
    if len > 0.0 {
        step / len
    } else {
        1.0
    }
}

impl OneCycleLr {
    /// Schedule with torch's defaults (`div_factor = 25`, `final_div_factor = 1e4`); `max_lrs` has one
    /// entry per optimizer group, `total_steps` is the number of optimizer steps of the whole run.
    pub fn new(max_lrs: Vec<f64>, total_steps: usize, pct_start: f64) -> Result<Self, TrainError> {
        Self::with_factors(max_lrs, total_steps, pct_start, 25.0, 1e4)
    }

    /// Schedule with explicit `div_factor` (initial = max / div) and `final_div_factor` (min = initial / it).
    pub fn with_factors(
        max_lrs: Vec<f64>,
        total_steps: usize,
        pct_start: f64,
        div_factor: f64,
        final_div_factor: f64,
    ) -> Result<Self, TrainError> {
        if total_steps == 0 {
            return Err(TrainError::Schedule("total_steps must be positive".into()));
        }
        if !(0.0..=1.0).contains(&pct_start) {
            return Err(TrainError::Schedule(format!(
                "pct_start {pct_start} is outside [0, 1]"
            )));
        }
        Ok(Self {
            max_lrs,
            total_steps,
            pct_start,
            div_factor,
            final_div_factor,
            step: 0,
        })
    }

    /// Optimizer steps taken so far (torch's `last_epoch`); save it to resume.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// Restores a saved step count.
    pub fn set_step_count(&mut self, step: usize) {
        self.step = step;
    }

    /// Learning rate of every group for the current step. Like torch, stepping past `total_steps` is an
    /// error.
    pub fn lrs(&self) -> Result<Vec<f64>, TrainError> {
        if self.step > self.total_steps {
            return Err(TrainError::Schedule(format!(
                "step {} is past the planned {} steps",
                self.step, self.total_steps
            )));
        }
        let step = self.step as f64;
        let warmup_end = self.pct_start * self.total_steps as f64 - 1.0;
        let last = self.total_steps as f64 - 1.0;
        Ok(self
            .max_lrs
            .iter()
            .map(|&max_lr| {
                let initial = max_lr / self.div_factor;
                let min_lr = initial / self.final_div_factor;
                if step <= warmup_end {
                    cos_anneal(initial, max_lr, phase_pct(step, warmup_end))
                } else {
                    cos_anneal(
                        max_lr,
                        min_lr,
                        phase_pct(step - warmup_end, last - warmup_end),
                    )
                }
            })
            .collect())
    }

    /// Writes the current learning rates into `optimizer`.
    pub fn apply(&self, optimizer: &mut AdamW) -> Result<(), TrainError> {
        optimizer.set_lrs(&self.lrs()?);
        Ok(())
    }

    /// Advances one optimizer step (`scheduler.step()`).
    pub fn step(&mut self) {
        self.step += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_max_over_25_and_peaks_after_warmup() {
        let mut s = OneCycleLr::new(vec![1.68e-4], 10_000, 0.075).expect("valid");
        assert!((s.lrs().expect("in range")[0] - 6.72e-6).abs() < 1e-18);
        s.set_step_count(749);
        assert!((s.lrs().expect("in range")[0] - 1.68e-4).abs() < 1e-15);
        s.set_step_count(9_999);
        assert!((s.lrs().expect("in range")[0] - 6.72e-10).abs() < 1e-18);
        s.set_step_count(10_001);
        assert!(s.lrs().is_err());
    }

    #[test]
    fn zero_length_phases_give_finite_rates() {
        // 20 steps x 5% = a warm-up ending at step 0; 1 step in all = a decay phase of length 0.
        for (total, pct) in [(20, 0.05), (1, 0.3), (10, 0.0), (10, 1.0)] {
            let mut s = OneCycleLr::new(vec![1e-3], total, pct).expect("valid");
            for step in 0..=total {
                s.set_step_count(step);
                let lr = s.lrs().expect("in range")[0];
                assert!(
                    lr.is_finite() && lr > 0.0,
                    "total {total} pct {pct} step {step}: {lr}"
                );
            }
        }
    }
}
