//! `anyq bench e2e`: decode throughput of a LLaMA-3-8B-shaped model with random weights, its
//! linear layers FP16 (cuBLAS), MixQ W8A8 and MixQ W4A8, measured in the same run on the same GPU
//! (the model and the measurement are `anyq_models::cuda_bench`).

use anyq_cuda::{CudaDevice, CudaError};
use anyq_models::cuda_bench::{self, DecodeBenchSettings, DecodeTiming, LinearKind};
use clap::Args;

#[derive(Args)]
pub struct E2eBenchArgs {
    /// Sequences decoded together, one token each per step.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256,512")]
    batch: Vec<usize>,
    /// Cached positions every sequence attends to besides its new token.
    #[arg(long, default_value_t = 128)]
    ctx: usize,
    /// Linear layers of the blocks: fp16 (cuBLAS), w8a8, w4a8 (MixQ, W4 in groups of 128).
    #[arg(long, value_delimiter = ',', default_value = "fp16,w8a8,w4a8")]
    variants: Vec<String>,
    /// MixQ outlier channels per linear input, in percent of its width.
    #[arg(long, default_value_t = 1.0)]
    outliers: f64,
    /// Timed steps per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps before each measurement.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Decoder layers (LLaMA-3-8B has 32; fewer for a quick look).
    #[arg(long, default_value_t = 32)]
    layers: usize,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
}

pub fn run(args: E2eBenchArgs) -> anyhow::Result<()> {
    let mut kinds = Vec::new();
    for name in &args.variants {
        let kind = LinearKind::parse(name.trim()).ok_or_else(|| {
            let known: Vec<&str> = LinearKind::ALL.iter().map(|k| k.name()).collect();
            anyhow::anyhow!("unknown variant {name:?}: expected {}", known.join(", "))
        })?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    let mut batches = Vec::new();
    for &batch in &args.batch {
        if !batches.contains(&batch) {
            batches.push(batch);
        }
    }
    let mut config = cuda_bench::llama3_8b();
    config.num_layers = args.layers;
    let settings = DecodeBenchSettings {
        config,
        batches,
        ctx: args.ctx,
        kinds,
        outlier_percent: args.outliers,
        warmup: args.warmup,
        steps: args.steps,
        seed: 1,
    };
    // Bad arguments are refused before the GPU is looked for.
    settings.check()?;
    let device = CudaDevice::open(args.gpu).map_err(|e| match e {
        // Its usual advice, `--device cpu`, does not apply here.
        CudaError::NoDriver => {
            anyhow::anyhow!("`bench e2e` needs an NVIDIA GPU: this machine has no CUDA driver (libcuda was not found)")
        }
        other => other.into(),
    })?;
    let c = &settings.config;
    let (major, minor) = device.compute_capability();
    println!("GPU: {} (sm_{major}{minor}, {} SMs)", device.name(), device.sm_count());
    println!(
        "Model: LLaMA-3-8B's shapes (hidden {}, {} layers, {}/{} heads of {}, FFN {}, vocab {}), random weights \
         made on the GPU; embedding and lm_head FP16 in every variant.",
        c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    );
    println!(
        "Decode: each sequence adds one token at position {ctx} over {ctx} cached positions (f16 KV cache, {:.1} GB \
         for {} sequences, shared by the variants).",
        settings.cache_bytes() as f64 / 1e9,
        settings.max_batch(),
        ctx = settings.ctx,
    );
    println!(
        "MixQ: {}% outlier channels per linear input in f16, INT8 activations per token made by the fused \
         producers; W4A8 in groups of 128.",
        settings.outlier_percent
    );
    println!(
        "Timing: median of {} steps after {} warm-up steps, CUDA events; tok/s = batch / step time.\n",
        settings.steps, settings.warmup
    );
    let timings = cuda_bench::bench_decode(&device, &settings, |t| {
        eprintln!(
            "{} batch {}: {:.2} ms/step ({:.2} ms to launch), {:.0} tok/s",
            t.kind.label(),
            t.batch,
            t.step_ms,
            t.launch_ms,
            t.tokens_per_second()
        );
    })?;
    println!("{}", table(&settings, &timings));

    let launch_bound: Vec<String> = timings
        .iter()
        .filter(|t| t.launch_ms > 0.9 * t.step_ms)
        .map(|t| format!("{} at batch {}", t.kind.label(), t.batch))
        .collect();
    if !launch_bound.is_empty() {
        println!(
            "\nLaunching the kernels took over 90% of the step for {}: there the GPU waited for the host.",
            launch_bound.join(", ")
        );
    }
    let broken: Vec<String> =
        timings.iter().filter(|t| !t.finite).map(|t| format!("{} at batch {}", t.kind.label(), t.batch)).collect();
    anyhow::ensure!(broken.is_empty(), "non-finite logits for {}", broken.join(", "));
    Ok(())
}

/// The results as a markdown table: a row per batch size, tokens/s of each variant, MixQ's speedups
/// over FP16 and the step times.
fn table(settings: &DecodeBenchSettings, timings: &[DecodeTiming]) -> String {
    let find = |kind: LinearKind, batch: usize| timings.iter().find(|t| t.kind == kind && t.batch == batch);
    let kinds = &settings.kinds;
    let has_fp16 = kinds.contains(&LinearKind::Fp16);
    let ratios: Vec<LinearKind> = kinds.iter().copied().filter(|&k| has_fp16 && k != LinearKind::Fp16).collect();
    let mut header = vec!["batch".to_string()];
    header.extend(kinds.iter().map(|k| format!("{} tok/s", k.label())));
    header.extend(ratios.iter().map(|k| format!("{}/FP16", k.label())));
    header.extend(kinds.iter().map(|k| format!("{} ms/step", k.label())));
    let mut lines =
        vec![format!("| {} |", header.join(" | ")), format!("| --- |{}", " ---: |".repeat(header.len() - 1))];
    for &batch in &settings.batches {
        let mut row = vec![batch.to_string()];
        row.extend(
            kinds.iter().map(|&k| find(k, batch).map_or("-".into(), |t| format!("{:.0}", t.tokens_per_second()))),
        );
        for &kind in &ratios {
            let ratio = find(kind, batch).zip(find(LinearKind::Fp16, batch)).map(|(t, fp16)| fp16.step_ms / t.step_ms);
            row.push(ratio.map_or("-".into(), |r| format!("{r:.2}")));
        }
        row.extend(kinds.iter().map(|&k| find(k, batch).map_or("-".into(), |t| format!("{:.2}", t.step_ms))));
        lines.push(format!("| {} |", row.join(" | ")));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_batch_and_speedups_over_fp16() {
        let settings = DecodeBenchSettings {
            config: cuda_bench::llama3_8b(),
            batches: vec![1, 16],
            ctx: 128,
            kinds: LinearKind::ALL.to_vec(),
            outlier_percent: 1.0,
            warmup: 2,
            steps: 5,
            seed: 1,
        };
        let timing = |kind, batch, step_ms| DecodeTiming { kind, batch, step_ms, launch_ms: 1.0, finite: true };
        let timings = [
            timing(LinearKind::Fp16, 1, 5.0),
            timing(LinearKind::W8A8, 1, 2.5),
            timing(LinearKind::W4A8, 1, 2.0),
            timing(LinearKind::Fp16, 16, 8.0),
            timing(LinearKind::W8A8, 16, 4.0),
        ];
        let table = table(&settings, &timings);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "| batch | FP16 tok/s | W8A8 tok/s | W4A8 tok/s | W8A8/FP16 | W4A8/FP16 | FP16 ms/step | W8A8 ms/step | \
             W4A8 ms/step |"
        );
        assert_eq!(lines[1], "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        assert_eq!(lines[2], "| 1 | 200 | 400 | 500 | 2.00 | 2.50 | 5.00 | 2.50 | 2.00 |");
        assert_eq!(lines[3], "| 16 | 2000 | 4000 | - | 2.00 | - | 8.00 | 4.00 | - |");
    }
}
