//! Inference cost of one CLIP ViT-B/16 encoder block and one visual-decoder step (batch 1), with the fused
//! CPU kernels on and off: `cargo bench -p clip4str --bench blocks`.

use std::collections::HashMap;
use std::hint::black_box;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clip4str::clip::transformer::ResidualAttentionBlock;
use clip4str::config::Clip4StrConfig;
use clip4str::decoder::ContentCache;
use clip4str::model::Clip4Str;
use clip4str::nn::Mode;
use criterion::{criterion_group, criterion_main, Criterion};

/// Builds a module on a `VarMap`, fills it with random values and rebuilds it from plain tensors, so that
/// it runs like an inference model loaded from a checkpoint.
fn plain<M>(build: impl Fn(VarBuilder) -> M) -> M {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu));
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(name, var)| {
            let value = Tensor::randn(0f32, 0.02, var.dims(), &Device::Cpu).expect("randn");
            let value = if name.ends_with("ln_1.weight") || name.ends_with("ln_2.weight") {
                (value + 1.0).expect("gain")
            } else {
                value
            };
            (name.clone(), value)
        })
        .collect();
    build(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
}

/// Runs `f(mode)` once with the fused kernels and once with the composites, as `{name}/fused` and
/// `/composite`.
fn both(c: &mut Criterion, name: &str, f: impl Fn(Mode) -> Tensor) {
    let mut group = c.benchmark_group(name);
    group.sample_size(20);
    for (label, fused) in [("fused", true), ("composite", false)] {
        let mode = Mode {
            fused,
            ..Mode::default()
        };
        group.bench_function(label, |b| b.iter(|| black_box(f(mode))));
    }
    group.finish();
}

fn vit_block(c: &mut Criterion) {
    let block = plain(|vb| ResidualAttentionBlock::new(768, 12, vb).expect("block"));
    let x = Tensor::randn(0f32, 1.0, (1, 197, 768), &Device::Cpu).expect("input");
    let fused = block.clone();
    let mut composite = block;
    composite.set_mode(Mode {
        fused: false,
        ..Mode::default()
    });
    both(c, "vit_b16_block", |mode| {
        let block = if mode.fused { &fused } else { &composite };
        block.forward(&x, None).expect("block")
    });
}

fn decoder_step(c: &mut Criterion) {
    let cfg = Clip4StrConfig::base16();
    let weights: HashMap<String, Tensor> = clip4str::train::init::init_weights(&cfg, 0)
        .expect("weights")
        .into_iter()
        .collect();
    let model = Clip4Str::from_tensors(&cfg, weights, &Device::Cpu).expect("model");
    let composite = model.with_mode(Mode {
        fused: false,
        ..Mode::default()
    });
    let decoder = &model.visual_decoder;
    let memory = Tensor::randn(0f32, 1.0, (1, 197, cfg.decoder.dim), &Device::Cpu).expect("memory");
    let memory = decoder.memory_kv(&memory).expect("memory kv");
    // Mid-sentence: 13 content positions decoded, predicting position 13.
    let mut cache = ContentCache::default();
    for pos in 0..13 {
        let token = Tensor::new(&[[(pos % 20) as u32 + 1]], &Device::Cpu).expect("token");
        decoder
            .extend_content(&mut cache, &token, pos)
            .expect("content");
    }
    let query = decoder.queries(1, 12, 1).expect("query");
    both(c, "b16_decoder_step", |mode| {
        let decoder = if mode.fused {
            decoder
        } else {
            &composite.visual_decoder
        };
        decoder.step(&cache, &memory, &query).expect("step")
    });
}

criterion_group!(benches, vit_block, decoder_step);
criterion_main!(benches);
