//! `--device`: where a command's model runs. Parsed by clap (so a typo is a usage error), opened when the
//! command starts (so a build without CUDA, or a machine without a GPU, says so before any work).

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    /// The CPU (the only device of a default build).
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal; needs a build with `--features cuda`.
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("unknown device {s:?}: use cpu, cuda or cuda:N");
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => {
                let ordinal = other
                    .strip_prefix("cuda:")
                    .or_else(|| other.strip_prefix("gpu:"))
                    .ok_or_else(bad)?;
                ordinal.parse().map(Self::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// Opens the device; a build without CUDA, a missing driver or a bad ordinal is an error naming it.
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    anyhow::bail!(
                        "--device {self}: this clip4str was built without CUDA support (build it with \
                         `cargo build --release -p clip4str-cli --features cuda`, which needs nvcc)"
                    );
                }
                Device::new_cuda(n)
                    .map_err(|e| anyhow::anyhow!("--device {self}: cannot open the GPU: {e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_spellings() {
        assert_eq!("cpu".parse(), Ok(DeviceArg::Cpu));
        assert_eq!("CUDA".parse(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:1".parse(), Ok(DeviceArg::Cuda(1)));
        assert_eq!(DeviceArg::Cuda(2).to_string(), "cuda:2");
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1"] {
            let err = bad.parse::<DeviceArg>().unwrap_err();
            assert!(err.contains("use cpu, cuda or cuda:N"), "{bad}: {err}");
        }
    }

    #[test]
    fn cpu_opens_everywhere() {
        assert!(DeviceArg::Cpu.open().unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = DeviceArg::Cuda(0).open().unwrap_err().to_string();
        assert!(
            err.contains("built without CUDA") && err.contains("--features cuda"),
            "{err}"
        );
    }
}
