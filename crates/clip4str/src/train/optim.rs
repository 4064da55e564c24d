//! AdamW with the reference's parameter groups (SPEC §12.6) and gradient-norm clipping (§12.8).
//!
//! Written here rather than using `candle_nn::AdamW` because resuming a run needs the moments, and
//! because the reference's four groups differ in learning rate and weight decay.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::TrainError;

/// The four AdamW groups of `configure_optimizers`, in the reference's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamGroup {
    /// CLIP gains, biases, 1-D tensors: no weight decay, base learning rate.
    EncoderNoDecay = 0,
    /// Other CLIP weights: weight decay, base learning rate.
    EncoderDecay = 1,
    /// Decoder gains, biases, position queries, token embeddings: no decay, `coef_lr` times the rate.
    DecoderNoDecay = 2,
    /// Other decoder weights: `coef_wd` times the decay, `coef_lr` times the rate.
    DecoderDecay = 3,
}

impl ParamGroup {
    /// Index into the optimizer's group list (0..4).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Group of the state-dict tensor `name` of rank `rank` (the reference's `exclude` rule, applied to CLIP
/// names without their `clip_model.` prefix and to decoder names as they are).
pub fn param_group(name: &str, rank: usize) -> ParamGroup {
    let (encoder, short) = match name.strip_prefix("clip_model.") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let no_decay = rank < 2
        || [
            "bn",
            "ln",
            "bias",
            "logit_scale",
            "pos_queries",
            "text_embed",
        ]
        .iter()
        .any(|pattern| short.contains(pattern));
    match (encoder, no_decay) {
        (true, true) => ParamGroup::EncoderNoDecay,
        (true, false) => ParamGroup::EncoderDecay,
        (false, true) => ParamGroup::DecoderNoDecay,
        (false, false) => ParamGroup::DecoderDecay,
    }
}

/// STRAdapter's four AdamW groups (SPEC §16, `configure_optimizers`) over its trainable `params` (adapter,
/// decoder, `head`, `text_embed`, `pos_queries`; CLIP is in none). The learning rate follows PARSeq's rule,
/// `agb * sqrt(devices) * batch / 256 * lr`. Only `ladder` and `ladder_pruning` (`encoder_groups`) put the adapter
/// in groups 0/1 at that rate; the other adapters train in the decoder's groups at `coef_lr` times it.
pub fn str_adapter_groups(
    params: &[(String, Var)],
    cfg: &OptimizerConfig,
    encoder_groups: bool,
) -> Vec<(GroupSettings, Vec<(String, Var)>)> {
    let images = (cfg.accumulate_grad_batches * cfg.batch_size) as f64;
    let lr = images * (cfg.num_devices as f64).sqrt() / 256.0 * cfg.base_lr;
    let exclude = |short: &str, rank: usize| {
        rank < 2
            || ["bn", "ln", "bias", "logit_scale"]
                .iter()
                .any(|p| short.contains(p))
    };
    let mut groups: Vec<Vec<(String, Var)>> = vec![Vec::new(); 4];
    let mut tail: [Vec<(String, Var)>; 2] = [Vec::new(), Vec::new()];
    let (mut adapter_no_decay, mut adapter_decay) = (Vec::new(), Vec::new());
    for (name, var) in params {
        let item = (name.clone(), var.clone());
        if let Some(short) = name.strip_prefix("decoder.") {
            let g = if exclude(short, var.rank()) { 2 } else { 3 };
            groups[g].push(item);
        } else if let Some(short) = name.strip_prefix("adapter.") {
            if exclude(short, var.rank()) {
                adapter_no_decay.push(item);
            } else {
                adapter_decay.push(item);
            }
        } else if name == "head.weight" {
            tail[1].push(item);
        } else {
            tail[0].push(item);
        }
    }
    let (a, b) = if encoder_groups { (0, 1) } else { (2, 3) };
    groups[a].extend(adapter_no_decay);
    groups[b].extend(adapter_decay);
    let [no_decay, decay] = tail;
    groups[2].extend(no_decay);
    groups[3].extend(decay);
    let settings = [
        (lr, 0.0),
        (lr, cfg.weight_decay),
        (lr * cfg.coef_lr, 0.0),
        (lr * cfg.coef_lr, cfg.weight_decay * cfg.coef_wd),
    ];
    settings
        .into_iter()
        .zip(groups)
        .map(|((lr, weight_decay), members)| (GroupSettings { lr, weight_decay }, members))
        .collect()
}

/// Adam's moment coefficients and epsilon.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the bias-corrected root of the second moment.
    pub eps: f64,
}

impl Default for AdamWConfig {
    /// The reference's `betas=(0.9, 0.98), eps=1e-6`.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
        }
    }
}

/// Learning rate and decoupled weight decay of one group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupSettings {
    /// Learning rate used by the next step (the scheduler overwrites it).
    pub lr: f64,
    /// Weight decay (multiplied by the learning rate, torch's AdamW).
    pub weight_decay: f64,
}

/// Training hyper-parameters that decide the optimizer (the reference's model config and trainer).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerConfig {
    /// `lr` hyper-parameter before scaling (8.4e-5 in the release).
    pub base_lr: f64,
    /// Per-device batch size.
    pub batch_size: usize,
    /// Number of devices (data-parallel replicas).
    pub num_devices: usize,
    /// Gradient accumulation steps.
    pub accumulate_grad_batches: usize,
    /// CLIP weight decay (0.2).
    pub weight_decay: f64,
    /// Decoder learning-rate multiplier (19).
    pub coef_lr: f64,
    /// Decoder weight-decay multiplier (1).
    pub coef_wd: f64,
    /// Adam coefficients.
    pub adam: AdamWConfig,
}

impl Default for OptimizerConfig {
    /// The release's recipe: `1024` images per step (`lr = 2 * 8.4e-5`).
    fn default() -> Self {
        Self {
            base_lr: 8.4e-5,
            batch_size: 256,
            num_devices: 4,
            accumulate_grad_batches: 1,
            weight_decay: 0.2,
            coef_lr: 19.0,
            coef_wd: 1.0,
            adam: AdamWConfig::default(),
        }
    }
}

impl OptimizerConfig {
    /// Linear scaling rule of the reference: `agb * devices * batch / 512 * base_lr` (not PARSeq's sqrt).
    pub fn scaled_lr(&self) -> f64 {
        let images = (self.accumulate_grad_batches * self.num_devices * self.batch_size) as f64;
        images / 512.0 * self.base_lr
    }

    /// Peak settings of the four groups, indexed by [`ParamGroup::index`].
    pub fn group_settings(&self) -> [GroupSettings; 4] {
        let lr = self.scaled_lr();
        [
            GroupSettings {
                lr,
                weight_decay: 0.0,
            },
            GroupSettings {
                lr,
                weight_decay: self.weight_decay,
            },
            GroupSettings {
                lr: lr * self.coef_lr,
                weight_decay: 0.0,
            },
            GroupSettings {
                lr: lr * self.coef_lr,
                weight_decay: self.weight_decay * self.coef_wd,
            },
        ]
    }

    /// Peak learning rate of each group: the `max_lr` list of the one-cycle schedule.
    pub fn max_lrs(&self) -> Vec<f64> {
        self.group_settings().iter().map(|g| g.lr).collect()
    }
}

/// One parameter and its Adam state.
#[derive(Debug, Clone)]
struct ParamState {
    name: String,
    var: Var,
    /// First moment (`exp_avg`); `None` until the parameter's first update.
    exp_avg: Option<Tensor>,
    /// Second moment (`exp_avg_sq`).
    exp_avg_sq: Option<Tensor>,
    /// Updates applied to this parameter (torch keeps it per parameter).
    step: u64,
}

#[derive(Debug, Clone)]
struct Group {
    settings: GroupSettings,
    params: Vec<ParamState>,
}

/// torch's `AdamW` (decoupled weight decay, bias-corrected moments, no amsgrad) over candle `Var`s.
#[derive(Debug, Clone)]
pub struct AdamW {
    groups: Vec<Group>,
    adam: AdamWConfig,
}

impl AdamW {
    /// Optimizer over `params` split into the reference's four groups by [`param_group`].
    pub fn new(params: &[(String, Var)], cfg: &OptimizerConfig) -> Self {
        let mut groups: Vec<Group> = cfg
            .group_settings()
            .into_iter()
            .map(|settings| Group {
                settings,
                params: Vec::new(),
            })
            .collect();
        for (name, var) in params {
            let group = param_group(name, var.rank()).index();
            groups[group].params.push(ParamState {
                name: name.clone(),
                var: var.clone(),
                exp_avg: None,
                exp_avg_sq: None,
                step: 0,
            });
        }
        Self {
            groups,
            adam: cfg.adam,
        }
    }

    /// Optimizer over explicit groups (settings and members, in order): the families whose grouping differs
    /// from CLIP4STR's ([`str_adapter_groups`]).
    pub fn with_groups(
        groups: Vec<(GroupSettings, Vec<(String, Var)>)>,
        adam: AdamWConfig,
    ) -> Self {
        let groups = groups
            .into_iter()
            .map(|(settings, params)| Group {
                settings,
                params: params
                    .into_iter()
                    .map(|(name, var)| ParamState {
                        name,
                        var,
                        exp_avg: None,
                        exp_avg_sq: None,
                        step: 0,
                    })
                    .collect(),
            })
            .collect();
        Self { groups, adam }
    }

    /// Current settings of every group.
    pub fn groups(&self) -> Vec<GroupSettings> {
        self.groups.iter().map(|g| g.settings).collect()
    }

    /// Parameter names of group `group`, in optimizer order.
    pub fn group_names(&self, group: usize) -> Vec<&str> {
        self.groups
            .get(group)
            .map(|g| g.params.iter().map(|p| p.name.as_str()).collect())
            .unwrap_or_default()
    }

    /// Learning rate of every group.
    pub fn lrs(&self) -> Vec<f64> {
        self.groups.iter().map(|g| g.settings.lr).collect()
    }

    /// Sets the learning rate of each group (extra values are ignored), as a scheduler does.
    pub fn set_lrs(&mut self, lrs: &[f64]) {
        for (group, &lr) in self.groups.iter_mut().zip(lrs) {
            group.settings.lr = lr;
        }
    }

    /// Every optimized `Var`, in group order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().map(|p| &p.var))
    }

    /// One AdamW update from `grads`. Parameters without a gradient are skipped and keep their step count,
    /// like torch with gradients reset to `None`.
    pub fn step(&mut self, grads: &GradStore) -> Result<(), TrainError> {
        let AdamWConfig { beta1, beta2, eps } = self.adam;
        for group in &mut self.groups {
            let GroupSettings { lr, weight_decay } = group.settings;
            for p in &mut group.params {
                let Some(grad) = grads.get(p.var.as_tensor()) else {
                    continue;
                };
                // Detached: a gradient carries the backward graph, and moments built from it would keep
                // every step's activations alive (memory grows without bound).
                let grad = grad.detach().to_dtype(p.var.dtype())?;
                p.step += 1;
                let t = p.step as f64;
                let param = p.var.as_detached_tensor();
                let param = if weight_decay != 0.0 {
                    param.affine(1.0 - lr * weight_decay, 0.0)?
                } else {
                    param
                };
                // exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad^2.
                let m = match &p.exp_avg {
                    Some(m) => (m + ((&grad - m)? * (1.0 - beta1))?)?,
                    None => (&grad * (1.0 - beta1))?,
                };
                let grad_sq = (grad.sqr()? * (1.0 - beta2))?;
                let v = match &p.exp_avg_sq {
                    Some(v) => ((v * beta2)? + grad_sq)?,
                    None => grad_sq,
                };
                let bias_correction1 = 1.0 - beta1.powf(t);
                let bias_correction2_sqrt = (1.0 - beta2.powf(t)).sqrt();
                let step_size = lr / bias_correction1;
                let denom = ((v.sqrt()? / bias_correction2_sqrt)? + eps)?;
                let update = ((&m / &denom)? * step_size)?;
                p.var.set(&(param - update)?.detach())?;
                p.exp_avg = Some(m.detach());
                p.exp_avg_sq = Some(v.detach());
            }
        }
        Ok(())
    }

    /// Moments and step counts as named tensors (`exp_avg/<name>`, `exp_avg_sq/<name>`, `step/<name>` as an
    /// f64 scalar), e.g. to save next to a checkpoint. Parameters never updated have no entries.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let mut out = HashMap::new();
        for p in self.groups.iter().flat_map(|g| &g.params) {
            if let (Some(m), Some(v)) = (&p.exp_avg, &p.exp_avg_sq) {
                out.insert(format!("exp_avg/{}", p.name), m.clone());
                out.insert(format!("exp_avg_sq/{}", p.name), v.clone());
                out.insert(
                    format!("step/{}", p.name),
                    Tensor::new(p.step as f64, m.device())?,
                );
            }
        }
        Ok(out)
    }

    /// Restores what [`Self::state_dict`] saved. Parameters absent from `state` start fresh; a moment whose
    /// shape differs from its parameter is an error.
    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        for p in self.groups.iter_mut().flat_map(|g| &mut g.params) {
            let m = state.get(&format!("exp_avg/{}", p.name));
            let v = state.get(&format!("exp_avg_sq/{}", p.name));
            let step = state.get(&format!("step/{}", p.name));
            let (Some(m), Some(v), Some(step)) = (m, v, step) else {
                p.exp_avg = None;
                p.exp_avg_sq = None;
                p.step = 0;
                continue;
            };
            for (what, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                if t.shape() != p.var.shape() {
                    return Err(TrainError::State(format!(
                        "{what} of {} has shape {:?}, the parameter {:?}",
                        p.name,
                        t.dims(),
                        p.var.dims()
                    )));
                }
            }
            let step = step.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !(step.is_finite() && step >= 0.0) {
                return Err(TrainError::State(format!(
                    "step of {} is {step}, expected a count",
                    p.name
                )));
            }
            let dtype = p.var.dtype();
            let device = p.var.device();
            p.exp_avg = Some(m.to_dtype(dtype)?.to_device(device)?.detach());
            p.exp_avg_sq = Some(v.to_dtype(dtype)?.to_device(device)?.detach());
            p.step = step as u64;
        }
        Ok(())
    }
}

/// Result of gradient clipping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradNorm {
    /// L2 norm over every gradient, before clipping.
    pub total_norm: f64,
    /// Factor the gradients were multiplied by (`<= 1`).
    pub clip_coef: f64,
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: scales every gradient of `vars` by
/// `min(1, max_norm / (total_norm + 1e-6))`, where `total_norm` is the L2 norm of all of them together.
pub fn clip_grad_norm<'a>(
    grads: &mut GradStore,
    vars: impl IntoIterator<Item = &'a Var>,
    max_norm: f64,
) -> Result<GradNorm, TrainError> {
    let vars: Vec<&Var> = vars.into_iter().collect();
    let mut sum_sq = 0f64;
    for var in &vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let norm = g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            sum_sq += norm;
        }
    }
    let total_norm = sum_sq.sqrt();
    let clip_coef = (max_norm / (total_norm + 1e-6)).min(1.0);
    for var in &vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let scaled = g.affine(clip_coef, 0.0)?;
            grads.insert(var.as_tensor(), scaled);
        }
    }
    Ok(GradNorm {
        total_norm,
        clip_coef,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_the_exclude_rule() {
        use ParamGroup::*;
        assert_eq!(
            param_group("clip_model.visual.class_embedding", 1),
            EncoderNoDecay
        );
        assert_eq!(
            param_group("clip_model.visual.positional_embedding", 2),
            EncoderDecay
        );
        assert_eq!(
            param_group("clip_model.visual.conv1.weight", 4),
            EncoderDecay
        );
        assert_eq!(param_group("clip_model.ln_final.weight", 1), EncoderNoDecay);
        assert_eq!(param_group("clip_model.text_projection", 2), EncoderDecay);
        assert_eq!(param_group("visual_decoder.pos_queries", 3), DecoderNoDecay);
        assert_eq!(
            param_group("cross_decoder.text_embed.embedding.weight", 2),
            DecoderNoDecay
        );
        assert_eq!(param_group("cross_decoder.head.weight", 2), DecoderDecay);
        assert_eq!(
            param_group("visual_decoder.layers.0.linear1.weight", 2),
            DecoderDecay
        );
    }

    #[test]
    fn linear_lr_scaling() {
        let cfg = OptimizerConfig {
            batch_size: 128,
            num_devices: 8,
            ..Default::default()
        };
        assert!((cfg.scaled_lr() - 1.68e-4).abs() < 1e-12);
        let g = cfg.group_settings();
        assert!((g[3].lr - 3.192e-3).abs() < 1e-12);
        assert_eq!(g[2].weight_decay, 0.0);
        assert!((g[3].weight_decay - 0.2).abs() < 1e-12);
    }
}
