//! A placement policy as served live: a ferry policy file (safetensors, `ferry policy train`),
//! or, with the `torch` feature, a TorchScript module exported from PyTorch /
//! Stable-Baselines3 ([`super::torch`]). Both take the same observation and act with the same
//! mask.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::policy::{PlacementPolicy, Serve};
use super::{Action, CallPrices, CostModel, Observation, PolicyMeta, TmoError, ACTIONS};

/// How a policy file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyFormat {
    /// `ferry policy train`'s safetensors file with its metadata header.
    Safetensors,
    /// A TorchScript module (`torch.jit.save`); needs the `torch` feature.
    Torchscript,
}

impl PolicyFormat {
    /// The format a file name suggests: `.pt`, `.pth`, `.ts`, `.jit` and `.torchscript` are
    /// TorchScript, anything else safetensors.
    pub fn from_path(path: &Path) -> PolicyFormat {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("pt" | "pth" | "ts" | "jit" | "torchscript") => PolicyFormat::Torchscript,
            _ => PolicyFormat::Safetensors,
        }
    }
}

impl std::fmt::Display for PolicyFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PolicyFormat::Safetensors => "safetensors",
            PolicyFormat::Torchscript => "torchscript",
        })
    }
}

/// Whether this build reads TorchScript policies (the `torch` feature).
pub const TORCHSCRIPT_SUPPORTED: bool = cfg!(feature = "torch");

/// A loaded placement policy of either format.
#[derive(Debug)]
pub enum ServedPolicy {
    Native(PlacementPolicy),
    #[cfg(feature = "torch")]
    Torch(super::torch::TorchPolicy),
}

impl From<PlacementPolicy> for ServedPolicy {
    fn from(p: PlacementPolicy) -> Self {
        ServedPolicy::Native(p)
    }
}

impl ServedPolicy {
    /// Reads the policy at `path` in `format`. The error says why a file does not fit (and,
    /// for TorchScript in a build without the `torch` feature, how to get one that reads it).
    pub fn load(path: &Path, format: PolicyFormat) -> Result<ServedPolicy, TmoError> {
        match format {
            PolicyFormat::Safetensors => {
                // The crate's one file read, kept beside TorchScript's loader (libtorch opens
                // the path itself) so both formats load from a path; `from_bytes` is the pure
                // entry point.
                #[allow(clippy::disallowed_methods)]
                let bytes = std::fs::read(path)
                    .map_err(|e| TmoError::Policy(format!("reading {}: {e}", path.display())))?;
                Ok(ServedPolicy::Native(PlacementPolicy::from_bytes(&bytes)?))
            }
            #[cfg(feature = "torch")]
            PolicyFormat::Torchscript => {
                Ok(ServedPolicy::Torch(super::torch::TorchPolicy::load(path)?))
            }
            #[cfg(not(feature = "torch"))]
            PolicyFormat::Torchscript => Err(TmoError::Policy(
                "TorchScript policies need a build with the `torch` feature \
                 (cargo build --features torch, with libtorch 2.13.0; see the README's \
                 \"PyTorch (TorchScript) policies\"); this build reads safetensors policies only"
                    .into(),
            )),
        }
    }

    pub fn format(&self) -> PolicyFormat {
        match self {
            ServedPolicy::Native(_) => PolicyFormat::Safetensors,
            #[cfg(feature = "torch")]
            ServedPolicy::Torch(_) => PolicyFormat::Torchscript,
        }
    }

    /// Allowed actions when calls cost `prices` (live estimates): all for a plain policy, the
    /// budget mask for a constrained one.
    pub fn mask_at(&self, obs: &Observation, prices: &CallPrices) -> [bool; ACTIONS] {
        super::policy::mask_for(self.meta(), prices, obs)
    }

    /// The most probable action among those `mask` allows (local if the forward pass failed).
    pub fn act_masked(&self, obs: &Observation, mask: &[bool; ACTIONS]) -> Action {
        super::policy::most_probable(self.probabilities_masked(obs, mask))
    }
}

impl Serve for ServedPolicy {
    fn meta(&self) -> &PolicyMeta {
        match self {
            ServedPolicy::Native(p) => p.meta(),
            #[cfg(feature = "torch")]
            ServedPolicy::Torch(p) => p.meta(),
        }
    }

    fn costs(&self) -> &CostModel {
        match self {
            ServedPolicy::Native(p) => p.costs(),
            #[cfg(feature = "torch")]
            ServedPolicy::Torch(p) => p.costs(),
        }
    }

    fn probabilities_masked(
        &self,
        obs: &Observation,
        mask: &[bool; ACTIONS],
    ) -> Result<[f64; ACTIONS], TmoError> {
        match self {
            ServedPolicy::Native(p) => p.probabilities_masked(obs, mask),
            #[cfg(feature = "torch")]
            ServedPolicy::Torch(p) => p.probabilities_masked(obs, mask),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_follows_the_extension_and_torchscript_needs_the_feature() {
        for (f, want) in [
            ("p.safetensors", PolicyFormat::Safetensors),
            ("p", PolicyFormat::Safetensors),
            ("dir/p.PT", PolicyFormat::Torchscript),
            ("p.pth", PolicyFormat::Torchscript),
            ("p.torchscript", PolicyFormat::Torchscript),
        ] {
            assert_eq!(PolicyFormat::from_path(Path::new(f)), want, "{f}");
        }
        let r = ServedPolicy::load(Path::new("/nonexistent/p.pt"), PolicyFormat::Torchscript);
        let e = r.unwrap_err().to_string();
        if TORCHSCRIPT_SUPPORTED {
            assert!(e.contains("/nonexistent/p.pt"), "{e}");
        } else {
            assert!(e.contains("`torch` feature"), "{e}");
        }
    }
}
