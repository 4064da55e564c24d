//! Gradient guard: autograd through every building block used in training matches central finite
//! differences in f64, and every parameter receives a gradient. A module that switched to candle's fused
//! `layer_norm` / `softmax_last_dim` (which have no backward pass) fails here. The f32 modules, which run
//! clip4str's own fused kernels at inference, must still take the differentiable path when fed `Var`s.

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use clip4str::clip::transformer::ResidualAttentionBlock;
use clip4str::config::DecoderConfig;
use clip4str::decoder::{DecoderLayer, DecoderMasks};
use clip4str::nn::{quick_gelu, LayerNorm, MultiheadAttention};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const STEP: f64 = 1e-5;
const TOLERANCE: f64 = 1e-6;

fn random(rng: &mut ChaCha8Rng, dims: &[usize], scale: f64) -> Tensor {
    let n: usize = dims.iter().product();
    let data: Vec<f64> = (0..n)
        .map(|_| rng.random_range(-1.0..1.0) * scale)
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu).expect("tensor")
}

/// Fills every variable of `varmap` with non-trivial random values (LayerNorm gains != 1, biases != 0).
fn randomize(varmap: &VarMap, rng: &mut ChaCha8Rng) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &vars {
        let value = random(rng, var.dims(), 0.5);
        let is_gain = (name.contains("norm") || name.contains("ln_")) && name.ends_with("weight");
        let value = if is_gain {
            (value + 1.0).expect("shift")
        } else {
            value
        };
        var.set(&value.to_dtype(var.dtype()).expect("dtype"))
            .expect("set");
    }
    vars
}

/// Checks d loss / d var for every `(name, var)` against central differences of `loss`.
fn check<F: Fn() -> Tensor>(what: &str, vars: &[(String, Var)], loss: F) {
    let grads = loss().backward().expect("backward");
    let mut overall = 0f64;
    for (name, var) in vars {
        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| {
            panic!("{what}: {name} got no gradient (a fused op without backward?)")
        });
        let grad: Vec<f64> = grad.flatten_all().and_then(|g| g.to_vec1()).expect("grad");
        let base: Vec<f64> = var
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("values");
        let scale = grad.iter().fold(0f64, |m, g| m.max(g.abs())).max(1e-3);
        let mut worst = 0f64;
        for i in 0..base.len() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).expect("tensor"))
                    .expect("set");
                loss().to_scalar::<f64>().expect("scalar")
            };
            let numeric = (at(STEP) - at(-STEP)) / (2.0 * STEP);
            worst = worst.max((numeric - grad[i]).abs() / scale);
        }
        var.set(&Tensor::from_vec(base, var.dims(), &Device::Cpu).expect("tensor"))
            .expect("restore");
        assert!(
            worst < TOLERANCE,
            "{what}: {name} gradient off by {worst:.2e} (relative to max |grad|)"
        );
        overall = overall.max(worst);
    }
    eprintln!(
        "{what}: {} tensors, worst finite-difference error {overall:.2e} (relative to max |grad|)",
        vars.len()
    );
}

/// Scalar probe of an output: `sum(out * weights)` with fixed random weights.
fn probe(out: &Tensor, weights: &Tensor) -> Tensor {
    (out * weights).and_then(|t| t.sum_all()).expect("probe")
}

fn input_var(rng: &mut ChaCha8Rng, name: &str, dims: &[usize]) -> (String, Var) {
    (
        name.to_string(),
        Var::from_tensor(&random(rng, dims, 1.0)).expect("var"),
    )
}

#[test]
fn layer_norm_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let ln = LayerNorm::new(6, vb.pp("ln_1")).expect("layer norm");
    let mut vars = randomize(&varmap, &mut rng);
    let x = input_var(&mut rng, "x", &[2, 3, 6]);
    let w = random(&mut rng, &[2, 3, 6], 1.0);
    vars.push(x.clone());
    check("LayerNorm", &vars, || {
        probe(&ln.forward(x.1.as_tensor()).expect("ln"), &w)
    });
}

#[test]
fn quick_gelu_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = input_var(&mut rng, "x", &[4, 5]);
    let w = random(&mut rng, &[4, 5], 1.0);
    check("quick_gelu", std::slice::from_ref(&x), || {
        probe(
            &quick_gelu(&(x.1.as_tensor() * 3.0).expect("scale")).expect("gelu"),
            &w,
        )
    });
}

/// Additive mask with a few `-inf` entries but at least one visible key per row.
fn sparse_mask(rows: usize, cols: usize) -> Tensor {
    let data: Vec<f64> = (0..rows)
        .flat_map(|r| {
            (0..cols).map(move |c| {
                if c > 0 && (r + 2 * c) % 3 == 0 {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("mask")
}

#[test]
fn attention_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let mha = MultiheadAttention::new(8, 2, 0.0, vb).expect("mha");
    let mut vars = randomize(&varmap, &mut rng);
    let q = input_var(&mut rng, "q_in", &[2, 4, 8]);
    let kv = input_var(&mut rng, "kv_in", &[2, 5, 8]);
    let mask = sparse_mask(4, 5);
    let w = random(&mut rng, &[2, 4, 8], 1.0);
    vars.push(q.clone());
    vars.push(kv.clone());
    check("MultiheadAttention", &vars, || {
        let out = mha
            .forward(q.1.as_tensor(), kv.1.as_tensor(), Some(&mask), false)
            .expect("attention");
        probe(&out, &w)
    });
}

#[test]
fn decoder_layer_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let cfg = DecoderConfig {
        dim: 8,
        heads: 2,
        mlp_hidden: 16,
        depth: 1,
    };
    let layer = DecoderLayer::new(&cfg, 0.0, vb).expect("decoder layer");
    let mut vars = randomize(&varmap, &mut rng);
    let query = input_var(&mut rng, "query", &[2, 5, 8]);
    let content = input_var(&mut rng, "content", &[2, 5, 8]);
    let memory = input_var(&mut rng, "memory", &[2, 6, 8]);
    let query_mask = sparse_mask(5, 5);
    let content_mask = sparse_mask(5, 5);
    let padding = Tensor::from_vec(
        vec![
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            f64::NEG_INFINITY,
            f64::NEG_INFINITY,
        ],
        (2, 1, 1, 5),
        &Device::Cpu,
    )
    .expect("padding");
    let wq = random(&mut rng, &[2, 5, 8], 1.0);
    let wc = random(&mut rng, &[2, 5, 8], 1.0);
    for v in [&query, &content, &memory] {
        vars.push((*v).clone());
    }
    check("DecoderLayer", &vars, || {
        let masks = DecoderMasks {
            query: Some(&query_mask),
            content: Some(&content_mask),
            padding: Some(&padding),
        };
        let kv = layer.memory_kv(memory.1.as_tensor()).expect("memory kv");
        let (q, c) = layer
            .forward(
                query.1.as_tensor(),
                content.1.as_tensor(),
                &kv,
                &masks,
                true,
                false,
            )
            .expect("layer");
        (probe(&q, &wq) + probe(&c, &wc)).expect("sum")
    });
}

#[test]
fn residual_attention_block_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let block = ResidualAttentionBlock::new(8, 2, vb).expect("block");
    let mut vars = randomize(&varmap, &mut rng);
    let x = input_var(&mut rng, "x", &[2, 5, 8]);
    let causal = clip4str::nn::causal_mask(5, &Device::Cpu)
        .and_then(|m| m.to_dtype(DType::F64))
        .expect("mask");
    let w = random(&mut rng, &[2, 5, 8], 1.0);
    vars.push(x.clone());
    check("ResidualAttentionBlock", &vars, || {
        probe(
            &block
                .forward(x.1.as_tensor(), Some(&causal))
                .expect("block"),
            &w,
        )
    });
}

/// The modules that training differentiates must not call candle's fused ops (they have no backward pass
/// and silently cut the gradient). clip4str's own kernels live in `nn/fused.rs` and `nn/fused_grad.rs`:
/// every entry point that applies one is gated (`inference_only`, which must check `track_op`, or the
/// training gate), and every kernel applied with a backward pass defines `bwd` (candle's default errors).
#[test]
fn no_fused_ops_in_trained_modules() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = [
        "nn.rs",
        "nn/fused.rs",
        "nn/fused_grad.rs",
        "decoder.rs",
        "model.rs",
        "clip/transformer.rs",
        "clip/vision.rs",
        "clip/text.rs",
    ];
    let fused = [
        "ops::layer_norm",
        "ops::rms_norm",
        "softmax_last_dim",
        "candle_nn::LayerNorm",
        "candle_nn::layer_norm",
        "candle_nn::ops::softmax",
    ];
    let custom_op = ["apply_op", "_no_bwd"];
    let kernel_files = ["nn/fused.rs", "nn/fused_grad.rs"];
    for file in files {
        let text = std::fs::read_to_string(src.join(file)).expect("source file");
        // Unit tests never run in training; they may call the kernels directly.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            for op in fused {
                // Our own gated kernels of that name are called as `fused::softmax_last_dim(_trainable)`.
                let own =
                    code.contains(&format!("fused::{op}")) || code.contains(&format!("fn {op}"));
                assert!(
                    !code.contains(op) || own,
                    "{file}:{}: uses fused `{op}`",
                    i + 1
                );
            }
            if !kernel_files.contains(&file) {
                for op in custom_op {
                    assert!(
                        !code.contains(op),
                        "{file}:{}: applies a custom op outside the kernel files",
                        i + 1
                    );
                }
            }
        }
    }
    let kernels = std::fs::read_to_string(src.join("nn/fused.rs")).expect("nn/fused.rs");
    let kernels = kernels.split("#[cfg(test)]").next().unwrap_or_default();
    let mut gated = 0;
    for (name, body) in top_level_fns(kernels) {
        let code: String = body
            .lines()
            .map(|l| l.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        if name == "inference_only" {
            assert!(
                code.contains("!t.track_op()"),
                "inference_only must reject tensors that track gradients"
            );
        }
        if let Some(apply) = code.find("apply_op") {
            let gate = code
                .find("if !inference_only(")
                .or_else(|| code.find("if !gate("));
            assert!(
                gate.is_some_and(|gate| gate < apply),
                "nn/fused.rs: `{name}` applies a kernel without first checking its gate"
            );
            assert!(
                !code.contains("_no_bwd"),
                "nn/fused.rs: `{name}` applies a kernel without its backward pass"
            );
            gated += 1;
        }
    }
    assert!(
        gated >= 3,
        "expected the softmax, layer norm and QuickGELU entry points, found {gated}"
    );
    // Every kernel applied with a backward pass has one of its own.
    let mut differentiated: Vec<String> = Vec::new();
    for file in kernel_files {
        let text = std::fs::read_to_string(src.join(file)).expect("kernel file");
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for block in text.split("\nimpl ").skip(1) {
            let header = block.lines().next().unwrap_or_default();
            if !header.contains("CustomOp") {
                continue;
            }
            let body = block.split("\n}\n").next().unwrap_or_default();
            let op = header
                .split(" for ")
                .nth(1)
                .unwrap_or(header)
                .trim_end_matches(" {");
            let applied_with_bwd = text.contains(&format!("apply_op1({op}"))
                || text.contains(&format!("apply_op1(&{op}"))
                || text.contains(&format!(", {op})"))
                || text.contains(&format!(", {op} {{"))
                || text.contains(&format!("let op = {op} {{"));
            if applied_with_bwd {
                assert!(
                    body.contains("fn bwd"),
                    "{file}: {header} is differentiated but has no bwd"
                );
                differentiated.push(op.to_string());
            }
        }
    }
    // The search above must see the kernels training uses, or it checks nothing.
    for op in ["Softmax", "LayerNormOp", "QuickGelu", "BiasAdd"] {
        assert!(
            differentiated.iter().any(|d| d == op),
            "the guard no longer finds where {op} is applied (found {differentiated:?})"
        );
    }
}

/// `(name, text)` of every function that starts at column 0 (up to the next top-level item).
fn top_level_fns(text: &str) -> Vec<(String, String)> {
    let mut fns: Vec<(String, String)> = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let item = line.strip_prefix("pub ").unwrap_or(line);
        if let Some(rest) = item.strip_prefix("fn ") {
            let name = rest
                .split(['(', '<'])
                .next()
                .unwrap_or_default()
                .to_string();
            fns.push((name, String::new()));
            inside = true;
        } else if !line.starts_with([' ', '}', ')']) && !line.is_empty() {
            inside = false;
        }
        if inside {
            let body = &mut fns.last_mut().expect("a function started").1;
            body.push_str(line);
            body.push('\n');
        }
    }
    fns
}

#[test]
fn fused_ops_would_be_caught() {
    // Sanity check of the guard itself: candle's fused softmax gives no gradient to its input.
    let x = Var::from_tensor(&Tensor::new(&[[0.1f32, 0.7, -0.3]], &Device::Cpu).expect("t"))
        .expect("var");
    let w = Tensor::new(&[[1.0f32, -2.0, 0.5]], &Device::Cpu).expect("t");
    let fused = candle_nn::ops::softmax_last_dim(x.as_tensor()).and_then(|s| (s * &w)?.sum_all());
    let caught = match fused.and_then(|l| l.backward()) {
        Ok(grads) => grads.get(x.as_tensor()).is_none(),
        Err(_) => true,
    };
    assert!(
        caught,
        "fused softmax unexpectedly has a gradient; the guard's premise changed"
    );
}

/// Runs `forward` on f32 `Var`s (weights and inputs) and checks that autograd reaches every one of them with
/// the gradients of the f64 composite, and that the same values as plain tensors (the fused inference path)
/// give the same output.
fn check_f32_var_path<M>(
    what: &str,
    seed: u64,
    input_dims: &[&[usize]],
    build: impl Fn(VarBuilder) -> M,
    forward: impl Fn(&M, &[Tensor]) -> Tensor,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let varmap = VarMap::new();
    let module = build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu));
    let mut vars = randomize(&varmap, &mut rng);
    let inputs: Vec<Var> = input_dims
        .iter()
        .map(|dims| {
            Var::from_tensor(
                &random(&mut rng, dims, 1.0)
                    .to_dtype(DType::F32)
                    .expect("f32"),
            )
            .expect("var")
        })
        .collect();
    vars.extend(
        inputs
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("input{i}"), v.clone())),
    );
    let out_dims = {
        let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        forward(&module, &tensors).dims().to_vec()
    };
    let w = random(&mut rng, &out_dims, 1.0);

    // f32 Vars: must differentiate (a kernel without backward would make `backward` fail).
    let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let out32 = forward(&module, &tensors);
    let grads32 = probe(&out32, &w.to_dtype(DType::F32).expect("f32"))
        .backward()
        .unwrap_or_else(|e| panic!("{what}: f32 Var path is not differentiable: {e}"));

    // The same values in f64: the composite path checked against finite differences above.
    let varmap64 = VarMap::new();
    let module64 = build(VarBuilder::from_varmap(&varmap64, DType::F64, &Device::Cpu));
    let vars64: Vec<(String, Var)> = {
        let data = varmap64.data().lock().expect("varmap lock");
        vars.iter()
            .map(|(name, var)| {
                let value = var.as_tensor().to_dtype(DType::F64).expect("f64");
                let var64 = match data.get(name) {
                    Some(v) => {
                        v.set(&value).expect("set");
                        v.clone()
                    }
                    None => Var::from_tensor(&value).expect("var"),
                };
                (name.clone(), var64)
            })
            .collect()
    };
    let inputs64: Vec<Tensor> = vars64[vars64.len() - inputs.len()..]
        .iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    let grads64 = probe(&forward(&module64, &inputs64), &w)
        .backward()
        .expect("f64 backward");

    let mut worst = 0f64;
    for ((name, var), (_, var64)) in vars.iter().zip(&vars64) {
        let g32: Vec<f64> = grads32
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: {name} got no gradient in f32"))
            .to_dtype(DType::F64)
            .and_then(|g| g.flatten_all()?.to_vec1())
            .expect("grad");
        let g64: Vec<f64> = grads64
            .get(var64.as_tensor())
            .expect("f64 gradient")
            .flatten_all()
            .and_then(|g| g.to_vec1())
            .expect("grad");
        let scale = g64.iter().fold(0f64, |m, g| m.max(g.abs()));
        assert!(
            g32.iter().all(|g| g.is_finite()),
            "{what}: {name} has a non-finite gradient"
        );
        assert!(
            scale > 0.0 && g32.iter().any(|g| *g != 0.0),
            "{what}: {name} has a zero gradient"
        );
        let err = g32
            .iter()
            .zip(&g64)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(
            err < 1e-4,
            "{what}: {name} f32 gradient off by {err:.2e} from the f64 composite"
        );
        worst = worst.max(err);
    }

    // Plain tensors with the same values take the fused kernels: same output as the Var path.
    let plain: std::collections::HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let module_plain = build(VarBuilder::from_tensors(plain, DType::F32, &Device::Cpu));
    let plain_inputs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().detach()).collect();
    let out_plain = forward(&module_plain, &plain_inputs);
    assert!(
        !out_plain.track_op(),
        "{what}: plain inputs should give a plain output"
    );
    let diff = (&out_plain - &out32)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("diff");
    eprintln!(
        "{what}: f32 Var path grads within {worst:.2e} of f64; fused forward within {diff:.2e}"
    );
    assert!(
        diff < 1e-5,
        "{what}: fused forward differs from the Var path by {diff:.2e}"
    );
}

#[test]
fn f32_vars_take_the_differentiable_path() {
    check_f32_var_path(
        "LayerNorm f32",
        21,
        &[&[3, 4, 37]],
        |vb| LayerNorm::new(37, vb.pp("ln_1")).expect("ln"),
        |ln, x| ln.forward(&x[0]).expect("ln"),
    );
    check_f32_var_path(
        "quick_gelu f32",
        22,
        &[&[5, 33]],
        |_| (),
        |_, x| quick_gelu(&(&x[0] * 3.0).expect("scale")).expect("gelu"),
    );
    let causal = clip4str::nn::causal_mask(7, &Device::Cpu).expect("mask");
    check_f32_var_path(
        "ResidualAttentionBlock f32",
        23,
        &[&[2, 7, 16]],
        |vb| ResidualAttentionBlock::new(16, 2, vb).expect("block"),
        |block, x| {
            let mask = causal.to_dtype(x[0].dtype()).expect("mask");
            block.forward(&x[0], Some(&mask)).expect("block")
        },
    );
}
