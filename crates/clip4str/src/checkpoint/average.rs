//! Averaging checkpoints of one model ("model soups"), all at once or one file at a time.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::{LoadError, RawCheckpoint};

/// The weighted mean, tensor by tensor, of several checkpoints of one model (a "model soup"): runs fine-tuned
/// from a common ancestor stay in one basin, and the mean of their weights often beats each run. `weights` (one
/// per checkpoint, finite, >= 0, not all zero) are normalised to sum to 1; `names` are the tensors to average,
/// which every checkpoint must hold with the same shape. See [`WeightedAverage`] to add files one at a time.
pub fn average_checkpoints(
    checkpoints: &[RawCheckpoint],
    weights: &[f64],
    names: &[String],
) -> Result<Vec<(String, Tensor)>, LoadError> {
    if let Some(first) = checkpoints.first() {
        if weights.len() != checkpoints.len() {
            return Err(LoadError::Config {
                path: first.path.clone(),
                reason: format!(
                    "{} weights for {} checkpoints",
                    weights.len(),
                    checkpoints.len()
                ),
            });
        }
    }
    let mut average = WeightedAverage::new(names.to_vec());
    for (raw, weight) in checkpoints.iter().zip(weights) {
        average.add(raw, *weight)?;
    }
    average.finish()
}

/// A running weighted sum of one model's checkpoints, so that averaging N files holds the sum and one file in
/// memory rather than all N. The sum is f32, so the mean of two f16 files is exact before it is stored again.
#[derive(Debug)]
pub struct WeightedAverage {
    names: Vec<String>,
    /// `sum_i weight_i * tensor_i`, one per name, once a file has been added.
    sums: Vec<Tensor>,
    total_weight: f64,
    /// The first file added: errors about the whole average name it.
    first: Option<PathBuf>,
}

impl WeightedAverage {
    /// An empty average over the tensors `names`.
    pub fn new(names: Vec<String>) -> Self {
        Self {
            names,
            sums: Vec::new(),
            total_weight: 0.0,
            first: None,
        }
    }

    /// Adds `raw` with `weight` (finite, >= 0); it must hold every name with the shape of the first file's.
    pub fn add(&mut self, raw: &RawCheckpoint, weight: f64) -> Result<(), LoadError> {
        let tensor_error = |source| LoadError::Tensor {
            path: raw.path.clone(),
            error: source,
        };
        if !weight.is_finite() || weight < 0.0 {
            return Err(LoadError::Config {
                path: raw.path.clone(),
                reason: format!("averaging weight {weight} is not a finite number >= 0"),
            });
        }
        let factor = Tensor::new(weight as f32, &Device::Cpu).map_err(tensor_error)?;
        let mut sums = Vec::with_capacity(self.names.len());
        for (i, name) in self.names.iter().enumerate() {
            let sum = self.sums.get(i);
            let tensor = raw.get(name).ok_or_else(|| LoadError::MissingTensor {
                path: raw.path.clone(),
                name: name.clone(),
                expected_shape: sum.map(|s| s.dims().to_vec()).unwrap_or_default(),
                more: 0,
            })?;
            if let Some(sum) = sum.filter(|s| s.dims() != tensor.dims()) {
                return Err(LoadError::ShapeMismatch {
                    path: raw.path.clone(),
                    name: name.clone(),
                    expected: sum.dims().to_vec(),
                    found: tensor.dims().to_vec(),
                    more: 0,
                });
            }
            // A product, not `affine(w, 0.0)`: adding 0.0 would turn -0.0 into +0.0.
            let scaled = tensor
                .to_device(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32)?.broadcast_mul(&factor))
                .map_err(tensor_error)?;
            sums.push(match sum {
                None => scaled,
                Some(sum) => sum.add(&scaled).map_err(tensor_error)?,
            });
        }
        // Only a file that fits every tensor changes the sum.
        self.sums = sums;
        self.total_weight += weight;
        self.first.get_or_insert_with(|| raw.path.clone());
        Ok(())
    }

    /// The mean: the weighted sum divided by the sum of the weights, as f32 tensors in `names` order.
    pub fn finish(self) -> Result<Vec<(String, Tensor)>, LoadError> {
        let Some(path) = self.first else {
            return Err(LoadError::Config {
                path: PathBuf::from("(none)"),
                reason: "nothing to average: no checkpoints given".into(),
            });
        };
        if self.total_weight <= 0.0 {
            return Err(LoadError::Config {
                path,
                reason: "the averaging weights are all zero".into(),
            });
        }
        let tensor_error = |source| LoadError::Tensor {
            path: path.clone(),
            error: source,
        };
        let total = Tensor::new(self.total_weight as f32, &Device::Cpu).map_err(tensor_error)?;
        self.names
            .into_iter()
            .zip(self.sums)
            .map(|(name, sum)| Ok((name, sum.broadcast_div(&total).map_err(tensor_error)?)))
            .collect()
    }
}
