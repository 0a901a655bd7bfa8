//! The `generate`, `quantize`, `eval ppl` and `info` subcommands.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use anyq_cuda::CudaDevice;
use anyq_engine::chat::{ChatMessage, ChatTemplate, CHATML_TEMPLATE};
use anyq_engine::{generate as run_generation, generate_with, outlier_report, Sampler, SamplingParams, TextStream};
use anyq_models::cuda::{CudaLlama, MixqCounts};
use anyq_models::cuda_mixq::check_gpu_method;
use anyq_models::{LoadedModel, TokenizerBundle};
use anyq_quant::methods::method_by_name;

use crate::progress::{
    load_quantized, load_with_progress, perplexity_on_with_progress, perplexity_with_progress, quantize_loaded,
    read_calibration_text, save_with_progress,
};
use crate::{DeviceKind, GenerateArgs, PplArgs, QuantizeArgs, QuantizeCommandArgs};

fn tokenizer_of<'a>(bundle: Option<&'a TokenizerBundle>, model: &Path) -> anyhow::Result<&'a TokenizerBundle> {
    bundle.with_context(|| format!("{} has no tokenizer (GGUF tokenizer metadata or tokenizer.json)", model.display()))
}

/// Prompt ids: the chat template's rendering as is (templates write their own BOS), or the raw
/// prompt with the tokenizer's special tokens.
fn prompt_ids(bundle: &TokenizerBundle, args: &GenerateArgs) -> anyhow::Result<Vec<u32>> {
    let tokenizer = &bundle.tokenizer;
    let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
    if args.chat {
        let source = bundle.chat_template.as_deref().unwrap_or(CHATML_TEMPLATE);
        let template = ChatTemplate::new(source, &token_text(bundle.special.bos), &token_text(bundle.special.eos))?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage { role: "system".into(), content: system.clone() });
        }
        messages.push(ChatMessage { role: "user".into(), content: args.prompt.clone() });
        let text = template.render(&messages, true)?;
        let encoding = tokenizer.encode(text, false).map_err(anyhow::Error::msg)?;
        return Ok(encoding.get_ids().to_vec());
    }
    // The tokenizer's post-processor adds BOS where the model asks for it.
    let encoding = tokenizer.encode(args.prompt.as_str(), true).map_err(anyhow::Error::msg)?;
    Ok(encoding.get_ids().to_vec())
}

pub fn quantize(args: QuantizeCommandArgs) -> anyhow::Result<()> {
    let method = method_by_name(&args.method)?;
    let calib_text = read_calibration_text(method.as_ref(), &args.calib)?;
    // Fail before hours of work, not after: save_quantized checks again.
    if std::fs::read_dir(&args.out).is_ok_and(|mut d| d.next().is_some()) {
        bail!("{} is not empty; choose a new folder", args.out.display());
    }
    let mut loaded = load_with_progress(&args.model)?;
    quantize_loaded(&mut loaded, method.as_ref(), calib_text.as_deref(), &args.calib)?;
    let size = save_with_progress(&loaded, method.as_ref(), &args.out)?;
    println!("{}: {} checkpoint, {:.1} MiB", args.out.display(), method.name(), size as f64 / (1 << 20) as f64);
    Ok(())
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    params.validate().map_err(anyhow::Error::msg)?;
    // A missing GPU fails before minutes of loading, not after.
    let device = open_gpu(args.device, &args.quantize)?;
    let loaded = load_quantized(&args.model, &args.quantize)?;
    let bundle = tokenizer_of(loaded.tokenizer.as_ref(), &args.model)?;
    let ids = prompt_ids(bundle, &args)?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    let gpu = device.map(|device| gpu_model(&device, &loaded)).transpose()?;
    let mut sampler = Sampler::new(params);
    let mut stream = TextStream::new(&bundle.tokenizer);
    let mut stdout = std::io::stdout();
    if !args.chat {
        write!(stdout, "{}", args.prompt)?;
    }
    let mut write_error = None;
    let mut on_token = |id| {
        let piece = match stream.push(id) {
            Ok(piece) => piece,
            Err(e) => {
                write_error = Some(anyhow::anyhow!("cannot decode token {id}: {e}"));
                return false;
            }
        };
        if let Err(e) = write!(stdout, "{piece}").and_then(|_| stdout.flush()) {
            write_error = Some(e.into());
            return false;
        }
        true
    };
    let stop = &bundle.special.stop;
    let generation = match &gpu {
        None => run_generation(&loaded.model, &ids, args.max_tokens, &mut sampler, stop, &mut on_token)?,
        Some(gpu) => {
            // Room for the prompt and every new token, within the model's context.
            let capacity = (ids.len() + args.max_tokens).clamp(1, gpu.config().max_position_embeddings);
            let mut decoder = gpu.decoder(capacity)?;
            generate_with(&mut decoder, &ids, args.max_tokens, &mut sampler, stop, &mut on_token)?
        }
    };
    if let Some(e) = write_error {
        return Err(e);
    }
    writeln!(stdout)?;
    let s = &generation.stats;
    eprintln!(
        "prefill: {} tokens, {:.1} tokens/s | decode: {} tokens, {:.1} tokens/s | stop: {:?}",
        s.prompt_tokens,
        s.prefill_tokens_per_sec(),
        s.generated_tokens,
        s.decode_tokens_per_sec(),
        generation.stop
    );
    Ok(())
}

/// GPU 0 when `device` is CUDA. Quantizing in memory with a method whose layers the GPU cannot
/// run is refused first, before minutes of calibration.
fn open_gpu(device: DeviceKind, quantize: &QuantizeArgs) -> anyhow::Result<Option<std::sync::Arc<CudaDevice>>> {
    if device == DeviceKind::Cpu {
        return Ok(None);
    }
    if let Some(method) = &quantize.quantize {
        method_by_name(method)?;
        if let Err(e) = check_gpu_method(method) {
            bail!("--quantize {e}; use --device cpu");
        }
    }
    let device = CudaDevice::open(0)?;
    eprintln!("GPU: {} (compute capability {:?})", device.name(), device.compute_capability());
    Ok(Some(device))
}

/// The loaded model on `device`: float layers in FP16, MixQ layers (quantized in memory or in a
/// checkpoint) on MixQ's kernels; other quantized layers are refused.
fn gpu_model(device: &std::sync::Arc<CudaDevice>, loaded: &LoadedModel) -> anyhow::Result<CudaLlama> {
    let gpu = CudaLlama::new(device, &loaded.model);
    match &loaded.quantization {
        Some(q) => gpu.with_context(|| format!("{} is a {} checkpoint", loaded.source.display(), q.method)),
        None => Ok(gpu?),
    }
}

pub fn perplexity(args: PplArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("cannot read {}", args.text.display()))?;
    let device = open_gpu(args.device, &args.quantize)?;
    let loaded = load_quantized(&args.model, &args.quantize)?;
    let bundle = tokenizer_of(loaded.tokenizer.as_ref(), &args.model)?;
    let ids = bundle.tokenizer.encode(text, false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    // MixQ's threshold counts on the GPU; `None` on the CPU (MixQ layers count there themselves)
    // and for models without MixQ layers.
    let (report, rate, gpu_counts) = match device {
        None => {
            let (report, rate) = perplexity_with_progress(&loaded.model, &ids, args.ctx, args.max_windows)?;
            (report, rate, None)
        }
        Some(device) => {
            let gpu = gpu_model(&device, &loaded)?;
            let mut decoder = gpu.decoder(args.ctx)?;
            let (report, rate) = perplexity_on_with_progress(&mut decoder, &ids, args.ctx, args.max_windows)?;
            (report, rate, decoder.mixq_counts()?)
        }
    };
    println!("text: {} ({} tokens)", args.text.display(), ids.len());
    println!(
        "windows: {} x {} tokens, {} tokens predicted, {rate:.1} tokens/s",
        report.nll_per_window.len(),
        report.ctx,
        report.tokens_predicted
    );
    println!("ppl: {:.4}", report.ppl);
    match gpu_counts {
        Some(counts) => print_gpu_outliers(counts),
        None => print_outliers(&loaded.model),
    }
    Ok(())
}

/// How often the GPU's fixed outlier sets met a new outlier (the CPU's sets would have grown).
fn print_gpu_outliers(counts: MixqCounts) {
    let rate = 100.0 * counts.over_threshold as f64 / counts.rows.max(1) as f64;
    println!(
        "\nMixQ on the GPU: {} of {} token rows of the layers' inputs ({rate:.2}%) had an activation above the \
         layer's threshold outside its outlier channels (quantized with the rest: the GPU's sets do not grow)",
        counts.over_threshold, counts.rows
    );
}

/// MixQ's outlier statistics after a run, per module summed over layers: how many channels the
/// set started with, how many it holds now, and how often a call met a channel not yet in it
/// (outlier locality: the rarer, the better the kept set serves).
fn print_outliers(model: &anyq_models::LlamaModel) {
    let report = outlier_report(model);
    if report.is_empty() {
        return;
    }
    println!("\nMixQ outlier channels ({} layers):", model.config.num_layers);
    println!("| module | at calibration | now | forward calls | calls adding a channel | rate |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for module in anyq_models::LINEAR_MODULES {
        let (mut start, mut now, mut calls, mut new) = (0, 0, 0, 0);
        for (_, _, s) in report.iter().filter(|(_, m, _)| *m == module) {
            (start, now, calls, new) = (
                start + s.channels_at_calibration,
                now + s.channels_now,
                calls + s.calls,
                new + s.calls_with_new_outliers,
            );
        }
        let rate = 100.0 * new as f64 / calls.max(1) as f64;
        println!("| {module} | {start} | {now} | {calls} | {new} | {rate:.2}% |");
    }
}

pub fn info(model: &Path) -> anyhow::Result<()> {
    let loaded = load_with_progress(model)?;
    let c = &loaded.model.config;
    println!("source: {}", loaded.source.display());
    println!("architecture: {:?}", c.architecture);
    println!(
        "layers {} | hidden {} | ffn {} | heads {} / kv {} | head dim {} | vocab {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    );
    println!(
        "rope theta {} ({:?}{}) | rms eps {} | context {} | tied embeddings {} | qkv bias {}",
        c.rope_theta,
        c.rope_style,
        if c.rope_freq_factors.is_some() { ", scaled" } else { "" },
        c.rms_norm_eps,
        c.max_position_embeddings,
        c.tie_word_embeddings,
        c.qkv_bias
    );
    println!("weights in memory: {:.1} MiB", loaded.model.weight_bytes() as f64 / (1 << 20) as f64);
    match &loaded.tokenizer {
        Some(b) => println!(
            "tokenizer: {} tokens, bos {:?}, eos {:?}, chat template: {}",
            b.tokenizer.get_vocab_size(true),
            b.special.bos,
            b.special.eos,
            if b.chat_template.is_some() { "yes" } else { "no (ChatML fallback)" }
        ),
        None => println!("tokenizer: none"),
    }
    Ok(())
}
