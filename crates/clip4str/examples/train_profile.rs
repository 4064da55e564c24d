//! Where one training step's time goes (forward parts, backward, optimizer) for a training config's model,
//! on random images: `cargo run --release -p clip4str --example train_profile -- CONFIG.toml [BATCH] [PERMS]`.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use clip4str::train::init::{initial_weights, InitSource};
use clip4str::train::{
    clip_grad_norm, gen_tgt_perms, training_loss, AdamW, LossOptions, OptimizerConfig, ParamStore,
    TrainConfig,
};
use rand::{Rng, SeedableRng};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Same allocator settings as the `clip4str` binary (see its `keep_freed_memory`).
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    let args: Vec<String> = std::env::args().collect();
    let cfg = TrainConfig::from_toml(&std::fs::read_to_string(&args[1])?)?;
    let batch: usize = args.get(2).map_or(Ok(32), |s| s.parse())?;
    let perm_num: usize = args.get(3).map_or(Ok(4), |s| s.parse())?;
    let mc = cfg.model.resolve()?;
    let weights: HashMap<String, Tensor> = initial_weights(&InitSource::Scratch { seed: 1 }, &mc)?
        .into_iter()
        .collect();
    let store = ParamStore::new(&mc, &weights, DType::F32, &Device::Cpu)?;
    let model = store.build_model(&mc)?;
    let mut opt = AdamW::new(store.trainable(), &OptimizerConfig::default());
    let [h, w] = mc.vision.image_size;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let charset: Vec<char> = mc.charset_train.chars().collect();
    let opts = LossOptions::default();
    println!("batch {batch}, {perm_num} permutations, input {h}x{w}");
    for run in 0..4 {
        let images = Tensor::randn(0f32, 1.0, (batch, 3, h, w), &Device::Cpu)?;
        let labels: Vec<String> = (0..batch)
            .map(|_| {
                let n = rng.random_range(1..=6);
                (0..n)
                    .map(|_| charset[rng.random_range(0..charset.len())])
                    .collect()
            })
            .collect();
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        let perms = gen_tgt_perms(6, perm_num, true, true, &mut rng);
        let t0 = Instant::now();
        let memory = model.encode(&images)?;
        let encode = t0.elapsed();
        drop(memory);
        let t1 = Instant::now();
        let out = training_loss(&model, &images, &refs, &perms, &opts)?;
        let forward = t1.elapsed();
        let t2 = Instant::now();
        let mut grads = out.loss.backward()?;
        let backward = t2.elapsed();
        let t3 = Instant::now();
        let vars: Vec<&Var> = opt.vars().collect();
        clip_grad_norm(&mut grads, vars, 20.0)?;
        opt.step(&grads)?;
        let step = t3.elapsed();
        let total = t0.elapsed() - encode;
        println!(
            "run {run}: encoder fwd alone {:.0} ms | loss fwd {:.0} ms, backward {:.0} ms, clip+adamw {:.0} ms | {:.1} img/s",
            encode.as_secs_f64() * 1e3,
            forward.as_secs_f64() * 1e3,
            backward.as_secs_f64() * 1e3,
            step.as_secs_f64() * 1e3,
            batch as f64 / total.as_secs_f64()
        );
    }
    Ok(())
}
