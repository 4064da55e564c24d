//! Parity of one (and a second) training step with the PyTorch reference on the tiny model
//! (fixtures/tiny_train.*, dropout disabled, fixed permutations): masks, logits, CE terms, loss, every
//! gradient, clipping, AdamW and the one-cycle schedule. Also structural checks of `gen_tgt_perms`.
#![cfg(feature = "train")]

mod common;

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor};
use clip4str::config::Clip4StrConfig;
use clip4str::train::{
    clip_grad_norm, gen_tgt_perms, generate_attn_masks, training_loss, AdamW, LossOptions,
    OneCycleLr, OptimizerConfig, ParamStore, TrainingLoss,
};
use common::{fixtures, flat, max_abs, max_abs_diff};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

struct Fixture {
    tensors: HashMap<String, Tensor>,
    json: serde_json::Value,
}

fn fixture() -> Fixture {
    let tensors =
        candle_core::safetensors::load(fixtures().join("tiny_train.safetensors"), &Device::Cpu)
            .expect("tiny_train.safetensors");
    let json = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny_train.json")).expect("tiny_train.json"),
    )
    .expect("valid json");
    Fixture { tensors, json }
}

impl Fixture {
    fn get(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor {name}"))
    }

    fn perms(&self) -> Vec<Vec<usize>> {
        self.get("perms")
            .to_vec2::<i64>()
            .expect("perms")
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as usize).collect())
            .collect()
    }

    fn labels(&self) -> Vec<String> {
        self.json["labels"]
            .as_array()
            .expect("labels")
            .iter()
            .map(|v| v.as_str().expect("label").to_string())
            .collect()
    }
}

/// `-inf` pattern equality (and zeros elsewhere).
fn same_mask(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && flat(a)
            .iter()
            .zip(flat(b))
            .all(|(x, y)| (x.is_infinite() && *x < 0.0 && y.is_infinite() && y < 0.0) || *x == y)
}

fn load_store(cfg: &Clip4StrConfig) -> ParamStore {
    let weights = candle_core::safetensors::load(fixtures().join("tiny.safetensors"), &Device::Cpu)
        .expect("tiny.safetensors");
    ParamStore::new(cfg, &weights, DType::F32, &Device::Cpu).expect("weights fit the tiny config")
}

#[test]
fn masks_match_reference() {
    let fx = fixture();
    for k in 0..3 {
        let perm: Vec<usize> = fx
            .get(&format!("mask_example{k}/perm"))
            .to_vec1::<i64>()
            .expect("perm")
            .into_iter()
            .map(|x| x as usize)
            .collect();
        let (content, query) = generate_attn_masks(&perm, &Device::Cpu).expect("valid perm");
        assert!(same_mask(
            &content,
            fx.get(&format!("mask_example{k}/content_mask"))
        ));
        assert!(same_mask(
            &query,
            fx.get(&format!("mask_example{k}/query_mask"))
        ));
    }
    for (i, perm) in fx.perms().iter().enumerate() {
        let (content, query) = generate_attn_masks(perm, &Device::Cpu).expect("valid perm");
        assert!(
            same_mask(&content, fx.get(&format!("perm{i}/content_mask"))),
            "perm {i}"
        );
        assert!(
            same_mask(&query, fx.get(&format!("perm{i}/query_mask"))),
            "perm {i}"
        );
    }
}

/// Compares one step's loss, per-permutation outputs and raw gradients; returns the max relative gradient error.
fn check_step(
    fx: &Fixture,
    step: usize,
    out: &TrainingLoss,
    grads: &candle_core::backprop::GradStore,
    store: &ParamStore,
) -> f32 {
    let meta = &fx.json["steps"][step];
    let want_loss = meta["loss"].as_f64().expect("loss");
    let loss = out.loss.to_scalar::<f32>().expect("scalar loss") as f64;
    let rel = ((loss - want_loss) / want_loss).abs();
    eprintln!("step {step}: loss {loss} vs {want_loss} (rel diff {rel:.2e})");
    assert!(rel < 1e-5, "step {step} loss {loss} vs {want_loss}");

    for (i, p) in out.perms.iter().enumerate() {
        let want = &meta["per_perm"][i];
        assert_eq!(p.n as u64, want["n"].as_u64().expect("n"), "perm {i} n");
        let captions: Vec<&str> = want["captions"]
            .as_array()
            .expect("captions")
            .iter()
            .map(|c| c.as_str().expect("caption"))
            .collect();
        assert_eq!(p.captions, captions, "step {step} perm {i} captions");
        for (name, got) in [("visual_ce", p.visual_ce), ("cross_ce", p.cross_ce)] {
            let w = want[name].as_f64().expect("ce") as f32;
            assert!(
                (got - w).abs() < 1e-4 * w.abs().max(1.0),
                "step {step} perm {i} {name}: {got} vs {w}"
            );
        }
        if step == 0 {
            let dv = max_abs_diff(&p.visual_logits, fx.get(&format!("perm{i}/visual_logits")));
            let dc = max_abs_diff(&p.cross_logits, fx.get(&format!("perm{i}/cross_logits")));
            eprintln!("perm {i}: visual logits max diff {dv:.2e}, cross {dc:.2e}");
            assert!(dv < 1e-4 && dc < 1e-4, "perm {i} logits: {dv} {dc}");
            let ids = p.text_ids.to_dtype(DType::I64).expect("ids");
            let want_ids = fx
                .get(&format!("perm{i}/text_ids"))
                .to_dtype(DType::I64)
                .expect("ids");
            assert_eq!(
                ids.to_vec2::<i64>().expect("ids"),
                want_ids.to_vec2::<i64>().expect("ids"),
                "perm {i} text ids"
            );
        }
    }

    let mut worst = 0f32;
    if step == 0 {
        let mut with_grad = 0;
        for (name, var) in store.trainable() {
            let want = fx.get(&format!("grad_raw/{name}"));
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient"));
            with_grad += 1;
            let err = max_abs_diff(got, want) / max_abs(want).max(1e-12);
            worst = worst.max(err);
            assert!(err < 1e-4, "gradient of {name}: relative error {err:.2e}");
        }
        let fixture_grads = fx
            .tensors
            .keys()
            .filter(|k| k.starts_with("grad_raw/"))
            .count();
        assert_eq!(
            with_grad, fixture_grads,
            "every reference gradient is produced"
        );
    }
    worst
}

#[test]
fn training_steps_match_reference() {
    let fx = fixture();
    let cfg = Clip4StrConfig::tiny();
    let store = load_store(&cfg);
    let model = store.build_model(&cfg).expect("tiny model builds");

    // Freezing: exactly the reference's frozen tensors are constants.
    let frozen: HashSet<&str> = store.frozen_names().collect();
    let want_frozen: HashSet<&str> = fx.json["frozen_params"]
        .as_array()
        .expect("frozen")
        .iter()
        .map(|v| v.as_str().expect("name"))
        .collect();
    assert_eq!(frozen, want_frozen);
    let initial = store.state_dict();

    // Optimizer groups and learning rates of the fake trainer (8 devices x 128, 10000 steps).
    let opt_cfg = OptimizerConfig {
        base_lr: fx.json["lr_hparam"].as_f64().expect("lr"),
        batch_size: fx.json["batch_size_hparam"].as_u64().expect("bs") as usize,
        num_devices: 8,
        accumulate_grad_batches: 1,
        weight_decay: fx.json["weight_decay_hparam"].as_f64().expect("wd"),
        coef_lr: fx.json["coef_lr"].as_f64().expect("coef_lr"),
        coef_wd: fx.json["coef_wd"].as_f64().expect("coef_wd"),
        ..Default::default()
    };
    let mut opt = AdamW::new(store.trainable(), &opt_cfg);
    for (g, want) in fx.json["optimizer_groups"]
        .as_array()
        .expect("groups")
        .iter()
        .enumerate()
    {
        let mut names: Vec<&str> = opt.group_names(g);
        let mut want_names: Vec<&str> = want["params"]
            .as_array()
            .expect("params")
            .iter()
            .map(|v| v.as_str().expect("name"))
            .collect();
        names.sort_unstable();
        want_names.sort_unstable();
        assert_eq!(names, want_names, "group {g}");
        let settings = opt.groups()[g];
        let max_lr = want["max_lr"].as_f64().expect("max_lr");
        assert!(
            (settings.lr - max_lr).abs() <= 1e-12 * max_lr,
            "group {g} lr"
        );
        assert_eq!(
            settings.weight_decay,
            want["weight_decay"].as_f64().expect("wd")
        );
    }
    let mut sched = OneCycleLr::new(
        opt_cfg.max_lrs(),
        fx.json["fake_trainer"]["estimated_stepping_batches"]
            .as_u64()
            .expect("steps") as usize,
        fx.json["warmup_pct"].as_f64().expect("pct"),
    )
    .expect("schedule");

    let labels = fx.labels();
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let images = fx.get("batch/images");
    let perms = fx.perms();
    let opts = LossOptions {
        dropout: false,
        ..Default::default()
    };

    for step in 0..2 {
        let meta = &fx.json["steps"][step];
        let out = training_loss(&model, images, &labels, &perms, &opts).expect("loss");
        if step == 0 {
            let tgt: Vec<Vec<i64>> = out
                .tgt
                .iter()
                .map(|r| r.iter().map(|&x| x as i64).collect())
                .collect();
            assert_eq!(tgt, fx.get("batch/tgt").to_vec2::<i64>().expect("tgt"));
            let dm = max_abs_diff(&out.memory, fx.get("step0/memory"));
            eprintln!("memory max diff {dm:.2e}");
            assert!(dm < 1e-4);
        }
        let mut grads = out.loss.backward().expect("backward");
        let worst = check_step(&fx, step, &out, &grads, &store);
        if step == 0 {
            eprintln!("max gradient error relative to each tensor's max |grad|: {worst:.2e}");
        }

        let norm = clip_grad_norm(&mut grads, opt.vars(), 20.0).expect("clip");
        let want_norm = meta["grad_total_norm_before_clip"].as_f64().expect("norm");
        let want_coef = meta["clip_coef"].as_f64().expect("coef");
        eprintln!(
            "step {step}: grad norm {} vs {want_norm}, clip coef {} vs {want_coef}",
            norm.total_norm, norm.clip_coef
        );
        assert!((norm.total_norm - want_norm).abs() < 1e-5 * want_norm);
        assert!((norm.clip_coef - want_coef).abs() < 1e-5 * want_coef);
        if step == 0 {
            for (name, var) in store.trainable() {
                let got = grads.get(var.as_tensor()).expect("gradient");
                let want = fx.get(&format!("grad/{name}"));
                let err = max_abs_diff(got, want) / max_abs(want).max(1e-12);
                assert!(err < 1e-4, "clipped gradient of {name}: {err:.2e}");
            }
        }

        sched.apply(&mut opt).expect("lr in range");
        for (got, want) in opt
            .lrs()
            .iter()
            .zip(meta["lrs_used"].as_array().expect("lrs"))
        {
            let want = want.as_f64().expect("lr");
            assert!((got - want).abs() <= 1e-9 * want, "lr {got} vs {want}");
        }
        opt.step(&grads).expect("adamw step");
        sched.step();
        for (got, want) in sched
            .lrs()
            .expect("lr in range")
            .iter()
            .zip(meta["lrs_after_sched_step"].as_array().expect("lrs"))
        {
            let want = want.as_f64().expect("lr");
            assert!(
                (got - want).abs() <= 1e-9 * want,
                "scheduled lr {got} vs {want}"
            );
        }

        // The key third of an attention `in_proj_bias` has a mathematically zero gradient (softmax is
        // shift invariant): both sides hold rounding noise (~1e-9) that Adam's normalisation turns into
        // updates of up to `lr * |g| / (|g| + eps)` ~ 1e-6. Those slices get their own, looser bound.
        let prefix = format!("after_step{}", step + 1);
        let (mut worst_abs, mut worst_rel, mut worst_key_bias) = (0f32, 0f32, 0f32);
        for (name, var) in store.trainable() {
            let want = fx.get(&format!("{prefix}/{name}"));
            let got = var.as_detached_tensor();
            let (exact_parts, key_bias) = if name.ends_with("in_proj_bias") {
                let d = got.dim(0).expect("dim") / 3;
                let part = |t: &Tensor, k: usize| t.narrow(0, k * d, d).expect("narrow");
                (
                    vec![
                        (part(&got, 0), part(want, 0)),
                        (part(&got, 2), part(want, 2)),
                    ],
                    Some((part(&got, 1), part(want, 1))),
                )
            } else {
                (vec![(got.clone(), want.clone())], None)
            };
            for (g, w) in &exact_parts {
                let d = max_abs_diff(g, w);
                worst_abs = worst_abs.max(d);
                worst_rel = worst_rel.max(d / max_abs(w).max(1e-12));
            }
            if let Some((g, w)) = key_bias {
                worst_key_bias = worst_key_bias.max(max_abs_diff(&g, &w));
            }
        }
        eprintln!(
            "{prefix}: params max abs diff {worst_abs:.2e} (relative to tensor max {worst_rel:.2e}); \
             key in_proj_bias slices (zero-gradient noise) {worst_key_bias:.2e}"
        );
        assert!(worst_abs < 1e-6, "{prefix}: {worst_abs}");
        assert!(worst_key_bias < 5e-6, "{prefix}: key bias {worst_key_bias}");
        for name in &frozen {
            let now = store.get(name).expect("frozen tensor");
            assert_eq!(
                max_abs_diff(&now, &initial[*name]),
                0.0,
                "{name} must not change"
            );
        }
    }

    // Optimizer state survives a save/restore round trip.
    let state = opt.state_dict().expect("state");
    let mut restored = AdamW::new(store.trainable(), &opt_cfg);
    restored.load_state_dict(&state).expect("restore");
    let again = restored.state_dict().expect("state");
    assert_eq!(state.len(), again.len());
    for (k, v) in &state {
        assert_eq!(max_abs_diff(v, &again[k]), 0.0, "{k}");
    }
}

fn is_permutation(row: &[usize]) -> bool {
    let mut sorted = row.to_vec();
    sorted.sort_unstable();
    sorted.iter().copied().eq(0..row.len())
}

#[test]
fn perms_structure() {
    let mut rng = ChaCha8Rng::seed_from_u64(4242);
    for n in 2..=12 {
        for _ in 0..20 {
            let perms = gen_tgt_perms(n, 6, true, true, &mut rng);
            let expected_rows = match n {
                2 => 2,
                3 => 6,
                _ => 6,
            };
            assert_eq!(perms.len(), expected_rows, "n = {n}");
            for row in &perms {
                assert_eq!(row.len(), n + 2);
                assert!(is_permutation(row), "{row:?}");
                assert_eq!(row[0], 0, "BOS first");
            }
            // Row 0 forward; row 1 reverse with EOS predicted from the null context.
            assert_eq!(perms[0], (0..n + 2).collect::<Vec<_>>());
            let mut reverse = vec![0];
            reverse.extend((1..=n + 1).rev());
            assert_eq!(perms[1], reverse);
            // Other rows: EOS last, and each even row's characters mirrored by the next row's.
            for pair in perms[2..].chunks(2) {
                assert_eq!(pair[0][n + 1], n + 1);
                assert_eq!(pair[1][n + 1], n + 1);
                let mirrored: Vec<usize> = pair[0][1..=n].iter().rev().copied().collect();
                assert_eq!(pair[1][1..=n], mirrored[..]);
            }
            if n < 5 {
                // Drawn without replacement from the pool: no repeated character order.
                let orders: HashSet<&[usize]> = perms[2..].iter().map(|r| &r[1..=n]).collect();
                assert_eq!(orders.len(), perms.len() - 2, "n = {n}: {perms:?}");
                assert!(perms[2..].iter().all(|r| r[1..=n] != perms[0][1..=n]));
            }
        }
    }
    // n = 3: the pool (lexicographic first half minus forward) is {[0,2,1], [1,0,2]}.
    let perms = gen_tgt_perms(3, 6, true, true, &mut rng);
    let sampled: HashSet<Vec<usize>> = perms[2..]
        .iter()
        .step_by(2)
        .map(|r| r[1..=3].to_vec())
        .collect();
    assert_eq!(sampled, HashSet::from([vec![1, 3, 2], vec![2, 1, 3]]));
    // n = 4: each sampled order comes from the `selector` half of the 24 permutations.
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let perms = gen_tgt_perms(4, 6, true, true, &mut rng);
        for r in perms[2..].iter().step_by(2) {
            seen.insert(r[1..=4].to_vec());
        }
    }
    assert_eq!(
        seen.len(),
        11,
        "the 4-char pool holds 12 orders minus the forward one"
    );
    for order in &seen {
        let flipped: Vec<usize> = order.iter().rev().copied().collect();
        assert!(
            !seen.contains(&flipped),
            "pool must hold one order per mirrored pair"
        );
    }
    // One character: the single forward permutation.
    assert_eq!(
        gen_tgt_perms(1, 6, true, true, &mut rng),
        vec![vec![0, 1, 2]]
    );
    // Seeded generators are reproducible.
    let a = gen_tgt_perms(9, 6, true, true, &mut ChaCha8Rng::seed_from_u64(7));
    let b = gen_tgt_perms(9, 6, true, true, &mut ChaCha8Rng::seed_from_u64(7));
    assert_eq!(a, b);
    // Without mirroring: perm_num rows.
    assert_eq!(gen_tgt_perms(8, 6, true, false, &mut rng).len(), 6);
}
