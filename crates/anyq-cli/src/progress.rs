//! Progress bars for long work (loading, evaluation), drawn on stderr.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use anyq_engine::{
    calibrate_with, perplexity_with, quantize_model, CalibrationStats, PerplexityError, PerplexityReport,
};
use anyq_models::{load_model, save_quantized, CpuDecoder, Decoder, LlamaModel, LoadedModel};
use anyq_quant::methods::{method_by_name, QuantMethod};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{CalibArgs, QuantizeArgs};

pub fn bar(total: usize, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

/// Loads a model with a bar over its layers.
pub fn load_with_progress(path: &Path) -> anyhow::Result<LoadedModel> {
    let bar = bar(0, "loading");
    let loaded = load_model(path, &|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    Ok(loaded)
}

/// Loads a model and, when a method is named, quantizes it in memory (calibrating first where
/// the method needs it), with bars for each step.
pub fn load_quantized(path: &Path, args: &QuantizeArgs) -> anyhow::Result<LoadedModel> {
    let method = args.quantize.as_deref().map(method_by_name).transpose()?;
    let calib_text = match &method {
        Some(m) => read_calibration_text(m.as_ref(), &args.calib)?,
        None => None,
    };
    let mut loaded = load_with_progress(path)?;
    if let Some(method) = method {
        quantize_loaded(&mut loaded, method.as_ref(), calib_text.as_deref(), &args.calib)?;
    }
    Ok(loaded)
}

/// The calibration text, read before any long work so that a wrong path fails at once.
pub fn read_calibration_text(method: &dyn QuantMethod, args: &CalibArgs) -> anyhow::Result<Option<String>> {
    match &args.calib {
        Some(file) if method.needs_calibration() => {
            Ok(Some(std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?))
        }
        None if method.needs_calibration() => {
            anyhow::bail!("{} needs calibration text: --calib FILE", method.name())
        }
        _ => Ok(None),
    }
}

/// Quantizes `loaded` in place with `method`, calibrating on `calib_text` first when given.
pub fn quantize_loaded(
    loaded: &mut LoadedModel,
    method: &dyn QuantMethod,
    calib_text: Option<&str>,
    args: &CalibArgs,
) -> anyhow::Result<()> {
    let stats = calib_text.map(|text| calibration_stats(loaded, text, args, method.needs_hessian())).transpose()?;
    quantize_with_stats(loaded, method, stats.as_ref())
}

/// Methods start from float weights: quantizing a quantized checkpoint again would compound errors.
pub fn ensure_float(loaded: &LoadedModel) -> anyhow::Result<()> {
    if let Some(q) = &loaded.quantization {
        anyhow::bail!("{} is already quantized ({}); quantize its float source", loaded.source.display(), q.method);
    }
    Ok(())
}

/// Activation statistics of the float model `loaded` on windows of `text`, with a bar.
/// With `hessians`, each input's `XᵀX` too (GPTQ).
pub fn calibration_stats(
    loaded: &LoadedModel,
    text: &str,
    args: &CalibArgs,
    hessians: bool,
) -> anyhow::Result<CalibrationStats> {
    ensure_float(loaded)?;
    let tokenizer = &loaded.tokenizer.as_ref().context("calibration needs the model's tokenizer")?.tokenizer;
    let ids = tokenizer.encode(text, false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    let windows = args.calib_windows.min(ids.len() / args.calib_ctx.max(1));
    anyhow::ensure!(windows > 0, "the calibration text has {} tokens: not one window of {}", ids.len(), args.calib_ctx);
    let bar = bar(windows, "calibrate");
    let progress = |done, _| bar.set_position(done as u64);
    let stats = calibrate_with(&loaded.model, &ids, args.calib_ctx, windows, hessians, &progress)?;
    bar.finish_and_clear();
    Ok(stats)
}

/// Quantizes `loaded` in place with `method`, given the calibration statistics it needs.
pub fn quantize_with_stats(
    loaded: &mut LoadedModel,
    method: &dyn QuantMethod,
    stats: Option<&CalibrationStats>,
) -> anyhow::Result<()> {
    ensure_float(loaded)?;
    // Quantized layers are stored in Hugging Face's Q/K row order, in memory as in checkpoints.
    loaded.model.use_neox_rope();
    let bar = bar(loaded.model.config.num_layers, "quantize");
    quantize_model(&mut loaded.model, method, stats, &|done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    eprintln!(
        "quantized with {}: weights now {:.1} MiB",
        method.name(),
        loaded.model.weight_bytes() as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// Writes the quantized `loaded` to the new folder `dir` with a bar; returns its size in bytes.
pub fn save_with_progress(loaded: &LoadedModel, method: &dyn QuantMethod, dir: &Path) -> anyhow::Result<u64> {
    let bar = bar(loaded.model.config.num_layers, "save");
    let size = save_quantized(&loaded.model, method, loaded.tokenizer.as_ref(), dir, &|done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    Ok(size)
}

/// Perplexity on the first `max_windows` windows of `ids` with a bar, and the rate at which the
/// windows' tokens went through the model (prefill tokens/s, output logits included).
pub fn perplexity_with_progress(
    model: &LlamaModel,
    ids: &[u32],
    ctx: usize,
    max_windows: Option<usize>,
) -> anyhow::Result<(PerplexityReport, f64)> {
    perplexity_on_with_progress(&mut CpuDecoder::new(model), ids, ctx, max_windows)
}

/// [`perplexity_with_progress`] on any device.
pub fn perplexity_on_with_progress<D: Decoder>(
    decoder: &mut D,
    ids: &[u32],
    ctx: usize,
    max_windows: Option<usize>,
) -> anyhow::Result<(PerplexityReport, f64)>
where
    PerplexityError: From<D::Error>,
{
    if ctx > decoder.max_positions() {
        anyhow::bail!("--ctx {ctx} exceeds the model's context of {}", decoder.max_positions());
    }
    let progress = bar(0, "ppl");
    let started = Instant::now();
    let report = perplexity_with(decoder, ids, ctx, max_windows, &|done, total| {
        progress.set_length(total as u64);
        progress.set_position(done as u64);
    })?;
    progress.finish_and_clear();
    let rate = (report.nll_per_window.len() * report.ctx) as f64 / started.elapsed().as_secs_f64();
    Ok((report, rate))
}
