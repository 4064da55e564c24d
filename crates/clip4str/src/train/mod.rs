//! Training core (SPEC §12): permutations and their attention masks, the permutation-language-modelling
//! loss of both decoders, parameter freezing, AdamW with the reference's four parameter groups, gradient
//! clipping and the one-cycle learning-rate schedule.
//!
//! The pieces compose like one Lightning training step:
//! [`ParamStore`] (trainable tensors as `Var`s, frozen ones as constants) → [`crate::model::Clip4Str`] →
//! [`gen_tgt_perms`] → [`training_loss`] → `loss.backward()` → [`clip_grad_norm`] → [`AdamW::step`] →
//! [`OneCycleLr::step`].

mod ctc;
mod loss;
mod optim;
mod params;
mod perms;
mod schedule;

mod config;
pub mod init;
mod trainer;

pub use config::{
    DataSpec, InitSpec, ModelSpec, OptimSpec, PositionalInit, RunSpec, TrainConfig, TrainPrecision,
};
// The pieces of a training step that the parity tests check against the reference are public; helpers used
// only inside a step (CTC and cross-entropy kernels, parameter grouping, the freezing rule) are not exported.
pub use ctc::{CtcHead, CTC_HEAD_PREFIX};
pub use loss::{str_adapter_loss, training_loss, AdapterLoss, LossOptions, PermLoss, TrainingLoss};
pub use optim::{
    clip_grad_norm, str_adapter_groups, AdamW, AdamWConfig, GradNorm, GroupSettings,
    OptimizerConfig, ParamGroup,
};
pub use params::ParamStore;
pub use perms::{gen_tgt_perms, generate_attn_masks};
pub use schedule::OneCycleLr;
pub use trainer::{effective_precision, StepMetrics, TrainObserver, Trainer};

use crate::charset::CharsetError;

/// Why a training computation could not run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed (shape, dtype or device problem).
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A label cannot be encoded with the training charset.
    #[error(transparent)]
    Label(#[from] CharsetError),
    /// A batch without samples.
    #[error("the training batch is empty")]
    EmptyBatch,
    /// A permutation that is not a reordering of `0..len`, or does not fit the target length.
    #[error("invalid permutation {perm:?}: {reason}")]
    InvalidPermutation {
        /// The offending permutation.
        perm: Vec<usize>,
        /// What is wrong with it.
        reason: String,
    },
    /// A weight the configuration needs is absent or has the wrong shape.
    #[error("parameter {name}: {reason}")]
    Parameter {
        /// State-dict name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The loss or gradient norm stopped being a finite number; the weights were not updated with it.
    #[error(
        "training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; the weights of the last \
         saved checkpoint are intact (lower optim.lr or raise optim.warmup_pct, then resume or restart)"
    )]
    Diverged {
        /// The optimizer step that produced the non-finite values.
        step: usize,
        /// Its loss.
        loss: f64,
        /// Its gradient norm before clipping.
        grad_norm: f64,
    },
    /// Saved optimizer or scheduler state that does not fit the current model.
    #[error("optimizer state: {0}")]
    State(String),
    /// A training configuration that cannot run (bad value, missing file, existing run).
    #[error("{0}")]
    Config(String),
    /// A checkpoint could not be read or written.
    #[error(transparent)]
    Load(#[from] crate::checkpoint::LoadError),
    /// Starting weights could not be built.
    #[error(transparent)]
    Init(#[from] init::InitError),
    /// Training or validation data could not be read.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A scheduler stepped past its planned number of steps, or built with impossible settings.
    #[error("learning-rate schedule: {0}")]
    Schedule(String),
}
