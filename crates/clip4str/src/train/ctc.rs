//! An optional auxiliary CTC loss on the image tokens, for training small models from scratch.
//!
//! Not part of the reference recipe (which starts from pre-trained CLIP): an attention decoder trained from
//! random weights sits on a long plateau before it learns where the characters are, while CTC's monotonic
//! alignment teaches the image encoder character-level features from the first steps (joint CTC-attention,
//! Kim et al. 2017). The head lives outside the model's state dict: exported weights stay plain CLIP4STR.

use candle_core::{DType, Device, Tensor, Var, D};

use super::TrainError;

/// Stands in for log(0): far below any reachable path score, yet `exp(x - max)` stays exactly 0 in f32
/// without producing infinities or NaN in the backward pass.
const LOG_ZERO: f32 = -1.0e5;

/// Name prefix of the head's tensors in the optimizer state file.
pub const CTC_HEAD_PREFIX: &str = "aux.ctc_head.";

/// A linear classifier over the image tokens of each patch column, pooled over rows. Each column emits
/// `steps_per_column` frames, so a 16-column grid gives 32 CTC frames.
#[derive(Debug, Clone)]
pub struct CtcHead {
    /// `[E, steps_per_column * classes]`.
    pub weight: Var,
    /// `[steps_per_column * classes]`.
    pub bias: Var,
    grid: [usize; 2],
    classes: usize,
    steps_per_column: usize,
}

impl CtcHead {
    /// A zero-bias head with weights uniform in ±1/sqrt(E) (torch's `nn.Linear` range), seeded.
    pub fn new(
        embed_dim: usize,
        grid: [usize; 2],
        classes: usize,
        steps_per_column: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self, TrainError> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xC7C0_4EAD);
        let bound = 1.0 / (embed_dim as f32).sqrt();
        let out = steps_per_column * classes;
        let w: Vec<f32> = (0..embed_dim * out)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Ok(Self {
            weight: Var::from_tensor(&Tensor::from_vec(w, (embed_dim, out), device)?)?,
            bias: Var::zeros(out, DType::F32, device)?,
            grid,
            classes,
            steps_per_column,
        })
    }

    /// Restores a head from tensors saved by [`Self::named`]; `None` when they are absent.
    pub fn from_named(
        tensors: &std::collections::HashMap<String, Tensor>,
        grid: [usize; 2],
        classes: usize,
        steps_per_column: usize,
    ) -> Result<Option<Self>, TrainError> {
        let (Some(w), Some(b)) = (
            tensors.get(&format!("{CTC_HEAD_PREFIX}weight")),
            tensors.get(&format!("{CTC_HEAD_PREFIX}bias")),
        ) else {
            return Ok(None);
        };
        let out = steps_per_column * classes;
        if w.dim(1)? != out || b.dims() != [out] {
            return Err(TrainError::State(format!(
                "CTC head has shape {:?}, this model needs [E, {out}]",
                w.dims()
            )));
        }
        Ok(Some(Self {
            weight: Var::from_tensor(&w.to_dtype(DType::F32)?)?,
            bias: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            grid,
            classes,
            steps_per_column,
        }))
    }

    /// The head's parameters by name, for the optimizer and the state file.
    pub fn named(&self) -> Vec<(String, Var)> {
        vec![
            (format!("{CTC_HEAD_PREFIX}weight"), self.weight.clone()),
            (format!("{CTC_HEAD_PREFIX}bias"), self.bias.clone()),
        ]
    }

    /// Per-frame log-probabilities `[B, columns * steps_per_column, classes]` from the image memory
    /// `[B, 1 + rows * columns, E]` (class token first, then the patch grid row by row).
    pub fn log_probs(&self, memory: &Tensor) -> Result<Tensor, TrainError> {
        let (b, s, e) = memory.dims3()?;
        let [rows, cols] = self.grid;
        if s != 1 + rows * cols {
            return Err(candle_core::Error::Msg(format!(
                "CTC head: memory has {s} tokens, a {rows}x{cols} grid needs {}",
                1 + rows * cols
            ))
            .into());
        }
        let columns = memory
            .narrow(1, 1, rows * cols)?
            .reshape((b, rows, cols, e))?
            .mean(1)?; // [B, cols, E]
        let logits = columns
            .reshape((b * cols, e))?
            .matmul(self.weight.as_tensor())?
            .broadcast_add(self.bias.as_tensor())?
            .reshape((b, cols * self.steps_per_column, self.classes))?;
        let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?;
        Ok(shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?)
    }
}

/// log(Σ exp) of equally shaped tensors, element-wise; the max is detached (its gradient cancels).
fn log_sum_exp(terms: &[&Tensor]) -> Result<Tensor, TrainError> {
    let mut max = terms[0].clone();
    for t in &terms[1..] {
        max = max.maximum(*t)?;
    }
    let max = max.detach();
    let mut sum = (terms[0] - &max)?.exp()?;
    for t in &terms[1..] {
        sum = (sum + (*t - &max)?.exp()?)?;
    }
    Ok((sum.log()? + max)?)
}

/// Whether a label of these class ids fits `frames` CTC frames (repeats need a blank between them).
pub fn ctc_feasible(label: &[u32], frames: usize) -> bool {
    let repeats = label.windows(2).filter(|w| w[0] == w[1]).count();
    !label.is_empty() && label.len() + repeats <= frames
}

/// CTC negative log-likelihood of `targets` (class ids, never `blank`) under `log_probs [B, T, K]`, each
/// divided by its label length and averaged over the labels that fit `T` frames (torch's
/// `F.ctc_loss(reduction="mean")` over those). Returns the loss and the number of labels counted; none
/// counted gives a zero loss.
pub fn ctc_loss(
    log_probs: &Tensor,
    targets: &[Vec<u32>],
    blank: u32,
) -> Result<(Tensor, usize), TrainError> {
    let (b, t, k) = log_probs.dims3()?;
    let device = log_probs.device();
    if targets.len() != b {
        return Err(candle_core::Error::Msg(format!(
            "ctc_loss: {} labels for a batch of {b}",
            targets.len()
        ))
        .into());
    }
    let feasible: Vec<bool> = targets.iter().map(|l| ctc_feasible(l, t)).collect();
    let counted = feasible.iter().filter(|&&f| f).count();
    if counted == 0 {
        return Ok((Tensor::zeros((), log_probs.dtype(), device)?, 0));
    }
    let longest = targets.iter().map(Vec::len).max().unwrap_or(0);
    let states = 2 * longest + 1;
    // Extended labels (blank, l1, blank, l2, .., blank) as a one-hot [B, K, S] selector, the "skip"
    // transitions allowed into each state, the start states and the two end states.
    let mut select = vec![0f32; b * k * states];
    let mut skip = vec![LOG_ZERO; b * states];
    let mut start = vec![LOG_ZERO; b * states];
    let mut end = vec![LOG_ZERO; b * states];
    for (row, label) in targets.iter().enumerate() {
        if let Some(&bad) = label.iter().find(|&&c| c == blank || c as usize >= k) {
            return Err(candle_core::Error::Msg(format!(
                "ctc_loss: label id {bad} is the blank or not one of the {k} classes"
            ))
            .into());
        }
        for s in 0..states {
            let class = if s % 2 == 1 && s / 2 < label.len() {
                label[s / 2]
            } else {
                blank
            };
            select[(row * k + class as usize) * states + s] = 1.0;
            if s % 2 == 1 && s >= 3 && s / 2 < label.len() && label[s / 2] != label[s / 2 - 1] {
                skip[row * states + s] = 0.0;
            }
        }
        start[row * states] = 0.0;
        if !label.is_empty() {
            start[row * states + 1] = 0.0;
        }
        let last = 2 * label.len();
        end[row * states + last] = 0.0;
        if last > 0 {
            end[row * states + last - 1] = 0.0;
        }
    }
    let dtype = log_probs.dtype();
    let as_tensor = |v: Vec<f32>| -> Result<Tensor, TrainError> {
        Ok(Tensor::from_vec(v, (b, states), device)?.to_dtype(dtype)?)
    };
    let select = Tensor::from_vec(select, (b, k, states), device)?.to_dtype(dtype)?;
    let (skip, start, end) = (as_tensor(skip)?, as_tensor(start)?, as_tensor(end)?);
    let emissions = log_probs.matmul(&select)?; // [B, T, S]
    let pad = |n: usize| -> Result<Tensor, TrainError> {
        Ok(Tensor::full(LOG_ZERO, (b, n), device)?.to_dtype(dtype)?)
    };
    let (pad1, pad2) = (pad(1)?, pad(2)?);

    let mut alpha = (emissions.get_on_dim(1, 0)? + start)?; // [B, S]
    for frame in 1..t {
        let stay = alpha.clone();
        let step = Tensor::cat(&[&pad1, &alpha.narrow(1, 0, states - 1)?], 1)?;
        let jump = if states > 2 {
            (Tensor::cat(&[&pad2, &alpha.narrow(1, 0, states - 2)?], 1)? + &skip)?
        } else {
            pad(states)?
        };
        alpha = (log_sum_exp(&[&stay, &step, &jump])? + emissions.get_on_dim(1, frame)?)?;
    }
    // log p(label) per row: the end states, summed in log space.
    let finals = (alpha + end)?;
    let max = finals.max_keepdim(1)?.detach();
    let log_likelihood = (finals.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max)?; // [B, 1]
    let weights: Vec<f32> = targets
        .iter()
        .zip(&feasible)
        .map(|(l, &ok)| {
            if ok {
                1.0 / (l.len() as f32 * counted as f32)
            } else {
                0.0
            }
        })
        .collect();
    let weights = Tensor::from_vec(weights, (b, 1), device)?.to_dtype(dtype)?;
    let loss = (log_likelihood * weights)?.sum_all()?.neg()?;
    Ok((loss, counted))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every frame labelling of length `t` over `k` classes that collapses to `label`, summed.
    fn brute_force(log_probs: &[Vec<f32>], label: &[u32], blank: u32) -> f64 {
        let t = log_probs.len();
        let k = log_probs[0].len();
        let mut total = 0f64;
        let mut path = vec![0usize; t];
        loop {
            let mut collapsed = Vec::new();
            let mut prev = None;
            for &c in &path {
                if Some(c) != prev && c as u32 != blank {
                    collapsed.push(c as u32);
                }
                prev = Some(c);
            }
            if collapsed == label {
                let lp: f64 = path
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| f64::from(log_probs[i][c]))
                    .sum();
                total += lp.exp();
            }
            let mut i = 0;
            loop {
                if i == t {
                    return total;
                }
                path[i] += 1;
                if path[i] < k {
                    break;
                }
                path[i] = 0;
                i += 1;
            }
        }
    }

    fn random_log_probs(b: usize, t: usize, k: usize, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..b * t * k)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let logits = Tensor::from_vec(v, (b, t, k), &Device::Cpu).unwrap();
        candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap()
    }

    #[test]
    fn matches_enumerating_every_alignment() {
        let (t, k) = (5, 4);
        let labels = vec![vec![1, 2], vec![3, 3], vec![2], vec![1, 2, 3]];
        let lp = random_log_probs(labels.len(), t, k, 7);
        let (loss, counted) = ctc_loss(&lp, &labels, 0).unwrap();
        assert_eq!(counted, 4);
        let rows: Vec<Vec<Vec<f32>>> = lp.to_vec3().unwrap();
        let expected: f64 = labels
            .iter()
            .zip(&rows)
            .map(|(l, r)| -brute_force(r, l, 0).ln() / l.len() as f64)
            .sum::<f64>()
            / labels.len() as f64;
        let got = f64::from(loss.to_scalar::<f32>().unwrap());
        assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
    }

    #[test]
    fn labels_that_do_not_fit_are_left_out() {
        let lp = random_log_probs(2, 3, 3, 1);
        // [1, 1, 1] needs 5 frames; [2] fits.
        let (loss, counted) = ctc_loss(&lp, &[vec![1, 1, 1], vec![2]], 0).unwrap();
        assert_eq!(counted, 1);
        let rows: Vec<Vec<Vec<f32>>> = lp.to_vec3().unwrap();
        let expected = -brute_force(&rows[1], &[2], 0).ln();
        let got = f64::from(loss.to_scalar::<f32>().unwrap());
        assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
        assert!(ctc_loss(&lp, &[vec![0], vec![2]], 0).is_err());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (b, t, k) = (2, 4, 3);
        let labels = vec![vec![1, 2], vec![2, 2]];
        let base = random_log_probs(b, t, k, 3).to_vec3::<f32>().unwrap();
        let flat: Vec<f32> = base.iter().flatten().flatten().copied().collect();
        let eval = |v: &[f32]| -> (f32, Option<Vec<f32>>) {
            let x =
                Var::from_tensor(&Tensor::from_vec(v.to_vec(), (b, t, k), &Device::Cpu).unwrap())
                    .unwrap();
            let (loss, _) = ctc_loss(x.as_tensor(), &labels, 0).unwrap();
            let grads = loss.backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
            (loss.to_scalar().unwrap(), Some(g.to_vec1().unwrap()))
        };
        let (_, grad) = eval(&flat);
        let grad = grad.unwrap();
        let h = 1e-2f32;
        for i in [0, 4, 7, 13, 20, 23] {
            let mut plus = flat.clone();
            plus[i] += h;
            let mut minus = flat.clone();
            minus[i] -= h;
            let numeric = (eval(&plus).0 - eval(&minus).0) / (2.0 * h);
            assert!(
                (numeric - grad[i]).abs() < 2e-3,
                "entry {i}: numeric {numeric}, backward {}",
                grad[i]
            );
        }
    }

    #[test]
    fn head_reads_the_patch_grid() {
        let head = CtcHead::new(8, [2, 3], 5, 2, 0, &Device::Cpu).unwrap();
        let memory = Tensor::randn(0f32, 1.0, (2, 1 + 6, 8), &Device::Cpu).unwrap();
        let lp = head.log_probs(&memory).unwrap();
        assert_eq!(lp.dims(), [2, 6, 5]);
        let sums = lp.exp().unwrap().sum(2).unwrap().flatten_all().unwrap();
        for s in sums.to_vec1::<f32>().unwrap() {
            assert!((s - 1.0).abs() < 1e-5);
        }
        let wrong = Tensor::zeros((2, 6, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(head.log_probs(&wrong).is_err());
    }
}
