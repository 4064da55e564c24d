//! What both benchmarks report: medians and minima of named parts, the CPU and its SIMD level, text or JSON.

use std::time::Duration;

use clap::ValueEnum;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchFormat {
    /// A table.
    Text,
    /// One JSON document.
    Json,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A named part of a timed run and how to read its time.
pub(crate) type Part<R> = (&'static str, fn(&R) -> Duration);

/// The median and minimum of each named part over the timed runs, `total` last.
pub(crate) struct Summary(Vec<(&'static str, Duration, Duration)>);

impl Summary {
    pub(crate) fn of<R>(runs: &[R], parts: &[Part<R>]) -> Self {
        Self(
            parts
                .iter()
                .map(|(name, pick)| {
                    let v: Vec<Duration> = runs.iter().map(pick).collect();
                    let min = v.iter().copied().min().unwrap_or_default();
                    (*name, median(v), min)
                })
                .collect(),
        )
    }

    /// The median of part `name`.
    pub(crate) fn get(&self, name: &str) -> Duration {
        self.0
            .iter()
            .find(|s| s.0 == name)
            .map_or(Duration::ZERO, |s| s.1)
    }

    /// `{"part": {"median_ms", "min_ms"}, ..}`.
    pub(crate) fn json(&self) -> serde_json::Value {
        self.0
            .iter()
            .map(|(name, med, min)| {
                (
                    (*name).to_string(),
                    serde_json::json!({"median_ms": ms(*med), "min_ms": ms(*min)}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// One line per part with its share of the total.
    pub(crate) fn print_table(&self, heading: &str) {
        let total = self.get("total").as_secs_f64().max(1e-12);
        println!(
            "{heading:<14} {:>11} {:>11} {:>7}",
            "median ms", "min ms", "share"
        );
        for (name, med, min) in &self.0 {
            let share = 100.0 * med.as_secs_f64() / total;
            println!(
                "{name:<14} {:>11.2} {:>11.2} {share:>6.1}%",
                ms(*med),
                ms(*min)
            );
        }
    }

    /// One line per part, without shares (parts that are not a total's pieces).
    pub(crate) fn print_rows(&self) {
        for (name, med, min) in &self.0 {
            println!("{name:<17} {:>8.2} {:>11.2}", ms(*med), ms(*min));
        }
    }
}

pub(crate) fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The widest vector extension this CPU offers for the kernels (the speed of every figure depends on it).
pub(crate) fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = clip4str::nn::avx512_allowed();
        if avx512 && std::arch::is_x86_feature_detected!("avx512bf16") {
            return "AVX-512 with BF16";
        }
        if avx512 && std::arch::is_x86_feature_detected!("avx512f") {
            return "AVX-512";
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "AVX2 (AVX-512 turned off by CLIP4STR_NO_AVX512=1)";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "AVX2";
        }
        "SSE"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        std::env::consts::ARCH
    }
}
