//! `anyq report`: the model as loaded and each named method side by side — checkpoint size,
//! perplexity, prefill and decode speed — as a markdown table and a chart of perplexity against
//! weight bits.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use anyq_engine::chat::strftime_now;
use anyq_engine::PerplexityReport;
use anyq_models::checkpoint::folder_size;
use anyq_models::{LlamaModel, LoadedModel};
use anyq_quant::methods::{method_by_name, QuantMethod};
use clap::Args;
use plotters::prelude::*;

use crate::bench::{decode_rate, synthetic_tokens};
use crate::progress::{
    bar, calibration_stats, ensure_float, load_with_progress, perplexity_with_progress, quantize_with_stats,
    read_calibration_text, save_with_progress,
};
use crate::CalibArgs;

/// The decode measurement: --decode-tokens after a short prompt, best of a few runs (the first
/// warms up).
const DECODE_PROMPT: usize = 16;
const DECODE_RUNS: usize = 2;
/// Pixels between the centres of stacked point labels (14 px text).
const LABEL_LINE: i32 = 16;

#[derive(Args)]
pub struct ReportArgs {
    /// A .gguf file, or a Hugging Face model folder (not a quantized checkpoint).
    model: PathBuf,
    /// Comma-separated methods, e.g. `rtn-w8a16,rtn-w4a16-g32,smoothquant-w8a8`.
    #[arg(long, value_delimiter = ',', required = true)]
    methods: Vec<String>,
    /// A UTF-8 text file for perplexity.
    #[arg(long)]
    text: PathBuf,
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Evaluate the first N windows of --ctx tokens.
    #[arg(long, default_value_t = 8)]
    max_windows: usize,
    /// Tokens decoded one at a time to measure decode speed.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    #[command(flatten)]
    calib: CalibArgs,
    /// Folder for report.md and ppl_vs_bits.svg (created if missing; those files are overwritten).
    #[arg(long)]
    out: PathBuf,
}

/// One row of the report.
struct Row {
    name: String,
    /// Weight and activation bits; `None` for the model as loaded.
    bits: Option<(u8, u8)>,
    size: u64,
    ppl: f64,
    prefill: f64,
    decode: f64,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    // Every input is checked before the first model loads.
    anyhow::ensure!(
        args.ctx >= 2 && args.max_windows > 0 && args.decode_tokens > 0,
        "--ctx must be at least 2, --max-windows and --decode-tokens at least 1"
    );
    let methods = args.methods.iter().map(|m| method_by_name(m)).collect::<Result<Vec<_>, _>>()?;
    let calib_text = match methods.iter().find(|m| m.needs_calibration()) {
        Some(method) => read_calibration_text(method.as_ref(), &args.calib)?,
        None => None,
    };
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("cannot read {}", args.text.display()))?;
    if args.out.exists() && !args.out.is_dir() {
        anyhow::bail!("--out {} is not a folder", args.out.display());
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;

    let total = methods.len() + 1;
    eprintln!("[1/{total}] fp (as loaded)");
    let fp = load_with_progress(&args.model)?;
    ensure_float(&fp)?;
    let tokenizer = &fp.tokenizer.as_ref().context("perplexity needs the model's tokenizer")?.tokenizer;
    let ids = tokenizer.encode(text, false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    let (fp_report, prefill, decode) = measure(&fp.model, &ids, &args)?;
    let (ppl, size) = (fp_report.ppl, path_size(&args.model)?);
    let mut rows = vec![Row { name: "fp".into(), bits: None, size, ppl, prefill, decode }];
    // One calibration serves every method: all of them start from the same float model.
    let hessians = methods.iter().any(|m| m.needs_hessian());
    let stats = calib_text.map(|text| calibration_stats(&fp, &text, &args.calib, hessians)).transpose()?;
    drop(fp);

    for (i, method) in methods.iter().enumerate() {
        let name = method.name();
        eprintln!("[{}/{total}] {name}", i + 2);
        let mut loaded = load_with_progress(&args.model)?;
        quantize_with_stats(&mut loaded, method.as_ref(), stats.as_ref())?;
        let size = checkpoint_size(&loaded, method.as_ref(), &args.out).with_context(|| name.clone())?;
        let (report, prefill, decode) = measure(&loaded.model, &ids, &args)?;
        rows.push(Row { name, bits: Some(method.bits()), size, ppl: report.ppl, prefill, decode });
    }

    let summary = format!(
        "model: {} | text: {} ({} windows x {} tokens) | threads: {} | date: {}",
        args.model.display(),
        args.text.display(),
        fp_report.nll_per_window.len(),
        args.ctx,
        rayon::current_num_threads(),
        strftime_now("%Y-%m-%d %H:%M UTC".into())
    );
    let report = format!("# anyq report\n\n{summary}\n\n{}", table(&rows));
    print!("{report}");
    let report_path = args.out.join("report.md");
    std::fs::write(&report_path, report).with_context(|| format!("cannot write {}", report_path.display()))?;
    let chart_path = args.out.join("ppl_vs_bits.svg");
    draw_chart(&chart_path, &rows).with_context(|| format!("cannot draw {}", chart_path.display()))?;
    eprintln!("wrote {} and {}", report_path.display(), chart_path.display());
    Ok(())
}

/// Perplexity with the prefill rate of its run, and the best decode rate of a few short runs.
fn measure(model: &LlamaModel, ids: &[u32], args: &ReportArgs) -> anyhow::Result<(PerplexityReport, f64, f64)> {
    let (report, prefill) = perplexity_with_progress(model, ids, args.ctx, Some(args.max_windows))?;
    let prompt = synthetic_tokens(model, DECODE_PROMPT);
    let progress = bar(DECODE_RUNS, "decode");
    let mut decode = 0f64;
    for run in 0..DECODE_RUNS {
        decode = decode.max(decode_rate(model, &prompt, args.decode_tokens)?);
        progress.set_position(run as u64 + 1);
    }
    progress.finish_and_clear();
    Ok((report, prefill, decode))
}

/// Bytes of the checkpoint that `save_quantized` writes, in a scratch folder under `out` (on
/// the disk the user chose, not a possibly small temporary file system) removed afterwards.
fn checkpoint_size(loaded: &LoadedModel, method: &dyn QuantMethod, out: &Path) -> anyhow::Result<u64> {
    let scratch = tempfile::Builder::new()
        .prefix(".checkpoint-")
        .tempdir_in(out)
        .with_context(|| format!("cannot create a scratch folder in {}", out.display()))?;
    save_with_progress(loaded, method, scratch.path())
}

/// Bytes of a model file, or of the files in a model folder.
fn path_size(path: &Path) -> anyhow::Result<u64> {
    if path.is_dir() {
        return Ok(folder_size(path)?);
    }
    Ok(std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len())
}

fn table(rows: &[Row]) -> String {
    let fp = rows[0].ppl;
    let mut table = String::from(
        "| method | W bits | A bits | size on disk (MiB) | ppl | Δppl % vs fp | prefill tok/s | decode tok/s |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for Row { name, bits, size, ppl, prefill, decode } in rows {
        let (w, a) = bits.map_or(("as loaded".into(), "as loaded".into()), |(w, a)| (w.to_string(), a.to_string()));
        let (mib, delta) = (*size as f64 / (1 << 20) as f64, 100.0 * (ppl / fp - 1.0));
        let line = format!("| {name} | {w} | {a} | {mib:.1} | {ppl:.4} | {delta:+.2} | {prefill:.1} | {decode:.1} |");
        table.push_str(&line);
        table.push('\n');
    }
    table
}

/// Perplexity (log scale) against weight bits: a labelled point per method, the model as loaded
/// as a dashed horizontal line. A method whose perplexity is not finite is left out.
fn draw_chart(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let finite: Vec<&Row> = rows.iter().filter(|r| r.ppl.is_finite()).collect();
    let points: Vec<(&str, i32, f64)> =
        finite.iter().filter_map(|r| r.bits.map(|(w, _)| (r.name.as_str(), i32::from(w), r.ppl))).collect();
    anyhow::ensure!(!points.is_empty(), "no method has a finite perplexity");
    let (lo, hi) = finite.iter().fold((f64::INFINITY, 0f64), |(lo, hi), r| (lo.min(r.ppl), hi.max(r.ppl)));
    let (lo, hi) = (lo / 1.05, hi * 1.05);
    let (x0, x1) = points.iter().fold((i32::MAX, i32::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    // A spare bit left of the points and two right of them, where their labels go.
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Perplexity against weight bits", ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0 - 1..x1 + 2, (lo..hi).log_scale().with_key_points(ppl_ticks(lo, hi)))?;
    chart
        .configure_mesh()
        .x_desc("weight bits")
        .y_desc("perplexity (log scale)")
        .y_label_formatter(&|y| format!("{y}"))
        .draw()?;
    let fp = rows[0].ppl;
    if fp.is_finite() {
        chart
            .draw_series(DashedLineSeries::new([(x0 - 1, fp), (x1 + 2, fp)], 8, 5, BLACK.into()))?
            .label(format!("fp (as loaded): {fp:.2}"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    }
    // Dark, evenly spread hues: readable as text on white.
    let color = |i: usize| HSLColor(i as f64 / points.len() as f64 * 0.85, 0.8, 0.4);
    for (i, &(name, bits, ppl)) in points.iter().enumerate() {
        let (color, style) = (color(i), color(i).filled());
        chart
            .draw_series([Circle::new((bits, ppl), 5, style)])?
            .label(format!("{name}: {ppl:.2}"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
    }
    // Labels right of their points. In a column of equal bits they stay a line apart: pushed
    // down from the top, then up from the bottom where the lowest would leave the plot.
    let bottom = chart.plotting_area().get_pixel_range().1.end - LABEL_LINE / 2;
    for bits in points.iter().map(|p| p.1).collect::<BTreeSet<_>>() {
        let mut column: Vec<(usize, i32)> = (0..points.len())
            .filter(|&i| points[i].1 == bits)
            .map(|i| (i, chart.backend_coord(&(bits, points[i].2)).1))
            .collect();
        column.sort_by_key(|&(_, y)| y);
        let mut labels: Vec<i32> = column.iter().map(|&(_, y)| y).collect();
        for j in 1..labels.len() {
            labels[j] = labels[j].max(labels[j - 1] + LABEL_LINE);
        }
        let mut limit = bottom;
        for label in labels.iter_mut().rev() {
            *label = (*label).min(limit);
            limit = *label - LABEL_LINE;
        }
        for (&(i, y), label_y) in column.iter().zip(labels) {
            let (name, _, ppl) = points[i];
            let font = ("sans-serif", 14).into_font().color(&color(i));
            let label = Text::new(name.to_string(), (9, label_y - y - 7), font);
            chart.draw_series([EmptyElement::at((bits, ppl)) + label])?;
        }
    }
    // Lower left: few bits with a low perplexity, the corner that results rarely reach.
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Ticks of the perplexity axis. plotters's log ticks are powers of ten, which a narrow range
/// often lacks: there, evenly stepped values (a step of 1, 2 or 5 × 10^k, at least four ticks);
/// over a decade or more, the 1, 2, 5 × 10^k that fall in range.
fn ppl_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if hi / lo >= 10.0 {
        let decades = lo.log10().floor() as i32..=hi.log10().ceil() as i32;
        return decades
            .flat_map(|k| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(k)))
            .filter(|t| (lo..=hi).contains(t))
            .collect();
    }
    let mut step = 10f64.powf((hi - lo).log10().ceil());
    for factor in [2.0, 2.5, 2.0].into_iter().cycle() {
        if (hi / step).floor() - (lo / step).ceil() >= 3.0 {
            break;
        }
        step /= factor;
    }
    // Multiples of the step, rounded to its decimals so that labels print without float noise.
    let decimals = (-step.log10().floor()).max(0.0) as i32;
    let round = |v: f64| (v * 10f64.powi(decimals)).round() / 10f64.powi(decimals);
    ((lo / step).ceil() as i64..=(hi / step).floor() as i64).map(|k| round(k as f64 * step)).collect()
}
