//! Progress bars for long work (loading, evaluation), drawn on stderr.

use std::path::Path;

use anyq_models::{load_model, LoadedModel};
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
