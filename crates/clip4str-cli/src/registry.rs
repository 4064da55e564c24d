//! Model names the CLI accepts (`--model NAME`, `clip4str models`): the bundled model and the released
//! CLIP4STR checkpoints, with where each file lives.
//!
//! Sources, checked against the CLIP4STR README (github.com/VamosC/CLIP4STR, "Results"; the repository
//! behind mzhaoshuai/CLIP4STR):
//! * Hugging Face model repository `mzhaoshuai/CLIP4STR`, branch `main`: the README links
//!   `huggingface.co/mzhaoshuai/CLIP4STR/blob/main/<file>` for the four `.pt` files below (models trained on
//!   RBU 6.5M from DataComp-1B, LAION-2B and DFN-5B CLIP). Repository id, branch and file names are copied from
//!   those links; none of them has been downloaded from here (no network to the Hub).
//! * The OpenAI-CLIP models are not on the Hub: B/16 files are GitHub release assets (URLs from the README),
//!   L/14 files are on Zenodo record 8369439. The L/14 file names are NOT verified: the README only gives the
//!   record and the hashes `f125500adc` (real data) and `3544c362f0` (MJ+ST); `clip4str_large14x14_f125500adc.ckpt`
//!   is the name third-party code loads, and no name is given for the MJ+ST one.
//!
//! Sizes are estimates, not measurements: 4 bytes (f32) times the parameter totals of SPEC §14 (B/16 158.26M,
//! L/14 446.86M, H/14 1020.16M). The Lightning `.ckpt` files may also hold optimizer state, so no size is given.
//!
//! Test-only: the environment variable [`TEST_MODEL_ENV`] (`NAME=OWNER/REPO:FILE`) adds one Hub entry, so the
//! integration tests can point a name at a local fake Hub. It is not part of the user interface.

use serde::Serialize;

/// Test-only environment variable adding a Hub entry `NAME=OWNER/REPO:FILE` (branch `main`).
pub const TEST_MODEL_ENV: &str = "CLIP4STR_TEST_MODEL";

/// Name of the model compiled into the binary.
pub const BUNDLED: &str = "small";

/// A file in a Hugging Face model repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HubFile {
    /// Repository id, `owner/name`.
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// Path of the file inside the repository.
    pub file: String,
}

/// Where a named model's weights come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// Compiled into the binary; nothing to download.
    Bundled,
    /// A Hugging Face Hub file, fetched with hf-hub into the standard cache.
    Hub(HubFile),
    /// Published outside the Hub (GitHub release, Zenodo): listed for reference, downloaded by hand and used
    /// with `--checkpoint`.
    Manual {
        /// Download page or direct link.
        url: String,
        /// File name, when known.
        file: Option<String>,
    },
}

/// One named model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelEntry {
    /// What `--model` takes.
    pub name: String,
    /// Model family as the paper names it (`CLIP4STR-B`, ...).
    pub variant: &'static str,
    /// Image encoder.
    pub backbone: &'static str,
    /// Which pre-trained CLIP it starts from.
    pub pretraining: &'static str,
    /// Scene-text training data.
    pub train_data: &'static str,
    /// Approximate file size in bytes (an estimate, see the module docs); `None` when unknown.
    pub approx_bytes: Option<u64>,
    /// Where the weights are.
    pub source: Source,
    /// What is uncertain about this entry, if anything.
    pub note: Option<&'static str>,
}

const HF_REPO: &str = "mzhaoshuai/CLIP4STR";
const RBU: &str = "real RBU (6.5M)";
const REAL_3M: &str = "real (3.3M)";
const SYNTH: &str = "synthetic MJ+ST";
const ZENODO: &str = "https://zenodo.org/record/8369439";
const GITHUB_RELEASE: &str = "https://github.com/VamosC/CLIP4STR/releases/download/1.0.0";

fn hub(
    name: &str,
    variant: &'static str,
    backbone: &'static str,
    pretraining: &'static str,
    params_millions: f64,
    file: &str,
) -> ModelEntry {
    ModelEntry {
        name: name.into(),
        variant,
        backbone,
        pretraining,
        train_data: RBU,
        approx_bytes: Some((params_millions * 4e6).round() as u64),
        source: Source::Hub(HubFile {
            repo: HF_REPO.into(),
            revision: "main".into(),
            file: file.into(),
        }),
        note: None,
    }
}

fn manual(
    name: &str,
    variant: &'static str,
    backbone: &'static str,
    train_data: &'static str,
    url: String,
    file: Option<&str>,
    note: Option<&'static str>,
) -> ModelEntry {
    ModelEntry {
        name: name.into(),
        variant,
        backbone,
        pretraining: "OpenAI CLIP (WIT-400M)",
        train_data,
        approx_bytes: None,
        source: Source::Manual {
            url,
            file: file.map(str::to_string),
        },
        note,
    }
}

/// Every known model, the bundled one first, plus the test-only entry when [`TEST_MODEL_ENV`] is set.
pub fn models() -> Vec<ModelEntry> {
    let mut out = vec![
        ModelEntry {
            name: BUNDLED.into(),
            variant: "clip4str-small",
            backbone: "ViT 192x4, 4x8 patches, 32x128 input",
            pretraining: "none (trained from scratch)",
            train_data: "synthetic + small real sets (models/default)",
            approx_bytes: Some(19_395_286),
            source: Source::Bundled,
            note: None,
        },
        hub("base", "CLIP4STR-B", "ViT-B/16", "OpenCLIP DataComp-1B", 158.26, "clip4str_base_6e9fe947ac.pt"),
        hub("large", "CLIP4STR-L", "ViT-L/14", "OpenCLIP DataComp-1B", 446.86, "clip4str_large_3c9d881b88.pt"),
        hub("huge", "CLIP4STR-H", "ViT-H/14", "OpenCLIP LAION-2B", 1020.16, "clip4str_huge_5eef9f86e2.pt"),
        hub("huge-dfn", "CLIP4STR-H", "ViT-H/14", "Apple DFN-5B", 1020.16, "clip4str_huge_3e942729b1.pt"),
        manual(
            "base-openai",
            "CLIP4STR-B",
            "ViT-B/16",
            REAL_3M,
            format!("{GITHUB_RELEASE}/clip4str_base16x16_d70bde1f2d.ckpt"),
            Some("clip4str_base16x16_d70bde1f2d.ckpt"),
            None,
        ),
        manual(
            "base-openai-synth",
            "CLIP4STR-B",
            "ViT-B/16",
            SYNTH,
            format!("{GITHUB_RELEASE}/clip4str_base16x16_synth_a5e3386222.ckpt"),
            Some("clip4str_base16x16_synth_a5e3386222.ckpt"),
            None,
        ),
        manual(
            "large-openai",
            "CLIP4STR-L",
            "ViT-L/14",
            REAL_3M,
            ZENODO.into(),
            Some("clip4str_large14x14_f125500adc.ckpt"),
            Some("file name unverified: the README names only the Zenodo record and the hash f125500adc"),
        ),
        manual(
            "large-openai-synth",
            "CLIP4STR-L",
            "ViT-L/14",
            SYNTH,
            ZENODO.into(),
            None,
            Some("file name unknown: the README names only the Zenodo record and the hash 3544c362f0"),
        ),
    ];
    if let Some(entry) = test_entry() {
        out.push(entry);
    }
    out
}

/// The entry [`TEST_MODEL_ENV`] describes, if it is set and well formed.
fn test_entry() -> Option<ModelEntry> {
    let spec = std::env::var(TEST_MODEL_ENV).ok()?;
    let (name, location) = spec.split_once('=')?;
    let (repo, file) = location.split_once(':')?;
    Some(ModelEntry {
        name: name.into(),
        variant: "test",
        backbone: "test",
        pretraining: "test",
        train_data: "test",
        approx_bytes: None,
        source: Source::Hub(HubFile {
            repo: repo.into(),
            revision: "main".into(),
            file: file.into(),
        }),
        note: Some("test-only entry from CLIP4STR_TEST_MODEL"),
    })
}

/// A size in decimal units, as download sizes are usually given; `?` when unknown.
pub fn format_size(bytes: Option<u64>) -> String {
    let Some(bytes) = bytes else {
        return "?".to_string();
    };
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.0} MB", b / 1e6)
    }
}

/// The entry called `name`; the error lists the valid names.
pub fn find(name: &str) -> anyhow::Result<ModelEntry> {
    let all = models();
    match all.iter().find(|m| m.name == name) {
        Some(entry) => Ok(entry.clone()),
        None => {
            let names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
            anyhow::bail!(
                "unknown model {name:?}; known models: {} (see `clip4str models list`)",
                names.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_bundled_comes_first() {
        let all = models();
        assert_eq!(all[0].name, BUNDLED);
        assert_eq!(all[0].source, Source::Bundled);
        let mut names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
    }

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let err = find("nope").unwrap_err().to_string();
        assert!(err.contains("\"nope\""), "{err}");
        assert!(err.contains("small, base, large, huge"), "{err}");
    }

    #[test]
    fn size_estimates_follow_the_parameter_counts() {
        let base = find("base").unwrap();
        assert_eq!(base.approx_bytes, Some(633_040_000));
    }
}
