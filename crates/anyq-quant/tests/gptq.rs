//! The GPTQ method on a layer whose inputs are correlated, as activations are: it must need the
//! calibration Hessian, store RTN's format, and beat RTN on the layer's output error.

use anyq_core::testing::XorShift;
use anyq_quant::calibration::ChannelStats;
use anyq_quant::methods::{method_by_name, LayerToQuantize, MethodError};

/// `[t, k]` activations: four shared factors plus noise, and one channel ten times larger.
fn activations(t: usize, k: usize, rng: &mut XorShift) -> Vec<f32> {
    let factors: Vec<Vec<f32>> = (0..4).map(|_| rng.floats(k)).collect();
    let mut x = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mix = rng.floats(4);
        for j in 0..k {
            let v = 0.2 * rng.uniform() + mix.iter().zip(&factors).map(|(m, f)| m * f[j]).sum::<f32>();
            x.push(if j == 7 { 10.0 * v } else { v });
        }
    }
    x
}

fn output_error(x: &[f32], w: &[f32], w_hat: &[f32], n: usize, k: usize) -> f64 {
    x.chunks_exact(k)
        .flat_map(|row| {
            (0..n).map(move |r| {
                let e: f64 = (0..k).map(|j| row[j] as f64 * (w[r * k + j] - w_hat[r * k + j]) as f64).sum();
                e * e
            })
        })
        .sum()
}

#[test]
fn gptq_needs_the_hessian_and_beats_rtn_on_the_output() {
    let mut rng = XorShift::new(23);
    let (n, k, t) = (48, 160, 400);
    let x = activations(t, k, &mut rng);
    let w = rng.floats(n * k);
    let mut stats = ChannelStats::with_hessian(k);
    stats.update(&x);
    let layer = |stats| LayerToQuantize { weight: &w, bias: None, out_features: n, in_features: k, input_stats: stats };

    let gptq = method_by_name("gptq-w4a16-g64").unwrap();
    assert_eq!(gptq.name(), "gptq-w4a16-g64");
    assert!(gptq.needs_calibration() && gptq.needs_hessian());
    assert!(matches!(gptq.quantize(&layer(None)), Err(MethodError::NeedsCalibration(_))));
    let without_hessian = ChannelStats::new(k);
    assert!(matches!(gptq.quantize(&layer(Some(&without_hessian))), Err(MethodError::NeedsCalibration(_))));

    // 160 = 2·64 + 32: a shorter last group.
    let g = gptq.quantize(&layer(Some(&stats))).unwrap();
    let r = method_by_name("rtn-w4a16-g64").unwrap().quantize(&layer(None)).unwrap();
    let (e_gptq, e_rtn) =
        (output_error(&x, &w, &g.dense_weight(), n, k), output_error(&x, &w, &r.dense_weight(), n, k));
    assert!(e_gptq < 0.6 * e_rtn, "GPTQ {e_gptq} vs RTN {e_rtn}");
    // Same stored format: the arrays load back through either method.
    assert_eq!(g.weight_bytes(), r.weight_bytes());
    let reloaded = gptq.load(gptq.save(g.as_ref()).unwrap(), n, k).unwrap();
    assert!(reloaded.dense_weight() == g.dense_weight());
}
