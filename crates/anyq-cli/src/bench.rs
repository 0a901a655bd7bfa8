//! `anyq bench cpu`: llama-bench's two tests on our engine — prefill of P tokens in one batch
//! (pp) and decode of G tokens one at a time from an empty context (tg) — so the two engines
//! can be compared number for number.

use std::path::PathBuf;
use std::time::Instant;

use anyq_models::LlamaModel;
use clap::Args;

use crate::progress::load_quantized;
use crate::QuantizeArgs;

#[derive(Args)]
pub struct CpuBenchArgs {
    model: PathBuf,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print one JSON line instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    quantize: QuantizeArgs,
}

pub fn cpu(args: CpuBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.prompt_tokens > 0 && args.gen_tokens > 0 && args.repeats > 0,
        "token counts and repeats must be > 0"
    );
    let loaded = load_quantized(&args.model, &args.quantize)?;
    let model = &loaded.model;
    let tokens = synthetic_tokens(model, args.prompt_tokens);

    let run_prefill = || -> anyhow::Result<f64> {
        let mut cache = model.new_cache();
        let start = Instant::now();
        model.forward_last(&tokens, &mut cache)?;
        Ok(args.prompt_tokens as f64 / start.elapsed().as_secs_f64())
    };
    let run_decode = || decode_rate(model, &[], args.gen_tokens);
    // One warm-up of each, as llama-bench does, then the mean rate over the repeats.
    run_prefill()?;
    run_decode()?;
    let mean = |f: &dyn Fn() -> anyhow::Result<f64>| -> anyhow::Result<f64> {
        let mut sum = 0.0;
        for _ in 0..args.repeats {
            sum += f()?;
        }
        Ok(sum / args.repeats as f64)
    };
    let prefill = mean(&run_prefill)?;
    let decode = mean(&run_decode)?;
    let threads = rayon::current_num_threads();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "prefill_tok_s": prefill, "decode_tok_s": decode, "threads": threads,
                "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
            })
        );
    } else {
        println!("| test | tokens/s |\n| --- | ---: |");
        println!("| pp{} | {prefill:.1} |\n| tg{} | {decode:.1} |", args.prompt_tokens, args.gen_tokens);
        println!("threads: {threads}");
    }
    Ok(())
}

/// Token ids spread over the vocabulary; values do not change the work of a dense model.
pub fn synthetic_tokens(model: &LlamaModel, n: usize) -> Vec<u32> {
    let vocab = model.config.vocab_size as u32;
    (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect()
}

/// Decode tokens/s: `gen_tokens` tokens run one at a time after `context` (prefilled, untimed).
pub fn decode_rate(model: &LlamaModel, context: &[u32], gen_tokens: usize) -> anyhow::Result<f64> {
    let mut cache = model.new_cache();
    if !context.is_empty() {
        model.forward_last(context, &mut cache)?;
    }
    let tokens = synthetic_tokens(model, gen_tokens);
    let start = Instant::now();
    for &t in &tokens {
        model.forward_last(&[t], &mut cache)?;
    }
    Ok(gen_tokens as f64 / start.elapsed().as_secs_f64())
}
