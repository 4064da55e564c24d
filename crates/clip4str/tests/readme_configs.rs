//! The README's two `run.toml` examples (fine-tuning, from scratch) parse as training configurations and say what
//! their text says, so a copied example runs.
#![cfg(feature = "train")]

use clip4str::train::{InitSpec, PositionalInit, TrainConfig};

/// Every ```toml block of the README whose first line starts with `# run.toml`.
fn readme_run_configs() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .filter(|block| block.starts_with("# run.toml"))
        .map(str::to_string)
        .collect()
}

#[test]
fn readme_run_toml_examples_parse_and_differ_as_described() {
    let blocks = readme_run_configs();
    assert_eq!(
        blocks.len(),
        2,
        "expected the fine-tuning and the from-scratch example"
    );
    let configs: Vec<TrainConfig> = blocks
        .iter()
        .map(|b| TrainConfig::from_toml(b).unwrap_or_else(|e| panic!("{e}\n{b}")))
        .collect();
    let [finetune, scratch] = configs.as_slice() else {
        unreachable!()
    };
    assert!(matches!(finetune.init, InitSpec::Clip4str { .. }));
    assert_eq!(finetune.optim.coef_lr, 19.0);
    assert_eq!(finetune.data.repeat.len(), finetune.data.train.len());
    assert_eq!(finetune.run.val_limit, Some(2000));
    assert!(matches!(
        scratch.init,
        InitSpec::Scratch {
            positional: PositionalInit::Sincos
        }
    ));
    assert_eq!(scratch.data.repeat.len(), scratch.data.train.len());
    assert!(
        scratch.optim.lr >= 100.0 * finetune.optim.lr,
        "from scratch needs a far higher rate"
    );
    assert_eq!(scratch.optim.coef_lr, 1.0);
    assert!(
        scratch.model.resolve().is_ok(),
        "the model overrides hold together"
    );
}
