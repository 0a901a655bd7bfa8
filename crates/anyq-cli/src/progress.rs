//! Progress bars for long work (loading, evaluation), drawn on stderr.

use std::path::Path;

use anyq_engine::quantize_model;
use anyq_models::{load_model, LoadedModel};
use anyq_quant::methods::method_by_name;
use indicatif::{ProgressBar, ProgressStyle};

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

/// Loads a model and, when a method is named, quantizes it in memory, with bars for both.
pub fn load_quantized(path: &Path, method: Option<&str>) -> anyhow::Result<LoadedModel> {
    let method = method.map(method_by_name).transpose()?;
    let mut loaded = load_with_progress(path)?;
    if let Some(method) = method {
        let bar = bar(loaded.model.config.num_layers, "quantize");
        quantize_model(&mut loaded.model, method.as_ref(), None, &|done, _| bar.set_position(done as u64))?;
        bar.finish_and_clear();
        eprintln!(
            "quantized with {}: weights now {:.1} MiB",
            method.name(),
            loaded.model.weight_bytes() as f64 / (1 << 20) as f64
        );
    }
    Ok(loaded)
}
