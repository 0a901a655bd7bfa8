//! MixQ: outlier channels in f32, the rest on the integer kernels, the outlier set growing at
//! run time when a new outlier channel appears.

use anyq_core::cpu::int8::quantize_rows_i8;
use anyq_core::cpu::matmul_xwt_reference;
use anyq_core::testing::XorShift;
use anyq_core::Linear;
use anyq_quant::calibration::ChannelStats;
use anyq_quant::methods::int_weight::w4_spec;
use anyq_quant::methods::mixq::{calibration_outliers, MixQ, OutlierSet, OutlierStats, DEFAULT_THRESHOLD};
use anyq_quant::methods::{method_by_name, LayerToQuantize, QuantMethod};
use anyq_quant::quantizer::{fake_quantize, Granularity, QuantSpec};

const OUTLIERS: [usize; 3] = [5, 100, 200];

/// `[m, k]` uniform activations whose `channels` are `factor` times larger.
fn activations(rng: &mut XorShift, m: usize, k: usize, channels: &[usize], factor: f32) -> Vec<f32> {
    let mut x = rng.floats(m * k);
    for row in x.chunks_exact_mut(k) {
        for &j in channels {
            row[j] *= factor;
        }
    }
    x
}

fn layer<'a>(
    w: &'a [f32],
    bias: Option<&'a [f32]>,
    n: usize,
    k: usize,
    stats: &'a ChannelStats,
) -> LayerToQuantize<'a> {
    LayerToQuantize { weight: w, bias, out_features: n, in_features: k, input_stats: Some(stats) }
}

/// By hand: `x[:, S] · w_S + deq(q(x with S zeroed)) · ŵᵀ + b`, with `w_S` (`[n, |S|]`) the f32
/// columns of the sorted channels S and ŵ the dequantized integer weight.
fn reference(x: &[f32], m: usize, k: usize, set: &[usize], w_s: &[f32], w_hat: &[f32], bias: &[f32]) -> Vec<f32> {
    let n = bias.len();
    let x_s: Vec<f32> = x.chunks_exact(k).flat_map(|row| set.iter().map(|&j| row[j])).collect();
    let mut y = matmul_xwt_reference(&x_s, w_s, m, n, set.len());
    let mut rest = x.to_vec();
    for row in rest.chunks_exact_mut(k) {
        set.iter().for_each(|&j| row[j] = 0.0);
    }
    let (mut q, mut scales) = (vec![0i8; m * k], vec![0.0f32; m]);
    quantize_rows_i8(&rest, m, k, &mut q, &mut scales);
    let x_hat: Vec<f32> = q.iter().enumerate().map(|(i, &v)| v as f32 * scales[i / k]).collect();
    let y_int = matmul_xwt_reference(&x_hat, w_hat, m, n, k);
    for (i, (y, v)) in y.iter_mut().zip(&y_int).enumerate() {
        *y += v + bias[i % n];
    }
    y
}

fn columns(w: &[f32], k: usize, set: &[usize]) -> Vec<f32> {
    w.chunks_exact(k).flat_map(|row| set.iter().map(|&j| row[j])).collect()
}

fn assert_close(out: &[f32], expected: &[f32], what: &str) {
    let scale = expected.iter().fold(1.0f32, |a, v| a.max(v.abs()));
    for (i, (a, b)) in out.iter().zip(expected).enumerate() {
        assert!((a - b).abs() <= 1e-4 * scale, "{what} [{i}]: {a} vs {b}");
    }
}

/// Squared error against the f32 product.
fn error(out: &[f32], x: &[f32], w: &[f32], bias: &[f32], m: usize, k: usize) -> f64 {
    let n = bias.len();
    let exact = matmul_xwt_reference(x, w, m, n, k);
    out.iter().zip(&exact).enumerate().map(|(i, (a, e))| ((a - e - bias[i % n]) as f64).powi(2)).sum()
}

fn run(linear: &dyn Linear, x: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * linear.out_features()];
    linear.forward(x, m, &mut out);
    out
}

#[test]
fn mixq_computes_f32_outliers_plus_int_rest_and_beats_per_token_int8() {
    let mut rng = XorShift::new(21);
    for (name, spec, rtn) in [
        ("mixq-w8a8", QuantSpec::new(8, true, Granularity::PerChannel), "rtn-w8a8"),
        ("mixq-w4a8-g32", w4_spec(32), "rtn-w4a8-g32"),
    ] {
        let method = method_by_name(name).unwrap();
        assert_eq!(method.name(), name);
        assert!(method.needs_calibration());
        for (n, k, m) in [(48, 256, 7), (33, 256, 1), (70, 512, 20)] {
            let w = rng.floats(n * k);
            let bias = rng.floats(n);
            let calib = activations(&mut rng, 32, k, &OUTLIERS, 50.0);
            let mut stats = ChannelStats::new(k);
            stats.update(&calib);
            let linear = method.quantize(&layer(&w, Some(&bias), n, k, &stats)).unwrap();
            let x = activations(&mut rng, m, k, &OUTLIERS, 50.0);
            let out = run(linear.as_ref(), &x, m);
            let w_hat = fake_quantize(&w, n, k, &spec).unwrap();
            let expected = reference(&x, m, k, &OUTLIERS, &columns(&w, k, &OUTLIERS), &w_hat, &bias);
            assert_close(&out, &expected, &format!("{name} {n}x{k} m={m}"));
            // The effective weight: f32 outlier columns, dequantized integers elsewhere.
            let dense = linear.dense_weight();
            for (i, (d, (h, v))) in dense.iter().zip(w_hat.iter().zip(&w)).enumerate() {
                assert_eq!(*d, if OUTLIERS.contains(&(i % k)) { *v } else { *h }, "{name}: dense weight [{i}]");
            }
            // Outliers are what hurts per-token int8: keeping them in f32 cuts the error.
            let plain = method_by_name(rtn).unwrap().quantize(&layer(&w, Some(&bias), n, k, &stats)).unwrap();
            let (e_mixq, e_rtn) =
                (error(&out, &x, &w, &bias, m, k), error(&run(plain.as_ref(), &x, m), &x, &w, &bias, m, k));
            assert!(e_mixq * 10.0 < e_rtn, "{name} {n}x{k}: mixq {e_mixq} vs {rtn} {e_rtn}");
        }
    }
}

#[test]
fn a_new_outlier_channel_joins_the_set_once() {
    let (n, k, m) = (40, 256, 6);
    let mut rng = XorShift::new(5);
    let w = rng.floats(n * k);
    let bias = rng.floats(n);
    let mut stats = ChannelStats::new(k);
    stats.update(&activations(&mut rng, 64, k, &OUTLIERS, 50.0));
    let method = MixQ::from_name("mixq-w8a8").unwrap();
    let linear = method.quantize_layer(&layer(&w, Some(&bias), n, k, &stats)).unwrap();
    let mut sorted = stats.abs_max().to_vec();
    sorted.sort_by(f32::total_cmp);
    assert_eq!(linear.abs_threshold(), DEFAULT_THRESHOLD * sorted[k / 2], "threshold is T · median");
    let stats_now = |calls, new, now| OutlierStats {
        channels_at_calibration: 3,
        channels_now: now,
        calls,
        calls_with_new_outliers: new,
        calls_over_cap: 0,
    };
    assert_eq!(linear.outlier_set().channels(), OUTLIERS);

    // Known outliers only: nothing is added.
    let x = activations(&mut rng, m, k, &OUTLIERS, 50.0);
    run(&linear, &x, m);
    assert_eq!(linear.outlier_stats(), stats_now(1, 0, 3));

    // Channel 17 turns into an outlier in one token: it joins the set, in order.
    let mut x = activations(&mut rng, m, k, &OUTLIERS, 50.0);
    x[2 * k + 17] = 60.0;
    let out = run(&linear, &x, m);
    assert_eq!(linear.outlier_stats(), stats_now(2, 1, 4));
    let set = linear.outlier_set();
    let grown = [5, 17, 100, 200];
    assert_eq!(set.channels(), grown);
    // Its f32 column is the dequantized integer column; the others stay the original weight.
    let w_hat = fake_quantize(&w, n, k, &QuantSpec::new(8, true, Granularity::PerChannel)).unwrap();
    let mut w_s = columns(&w, k, &grown);
    for (row, cols) in w_s.chunks_exact_mut(4).enumerate() {
        cols[1] = w_hat[row * k + 17];
    }
    assert_eq!(set.weight(), w_s);
    let expected = reference(&x, m, k, &grown, &w_s, &w_hat, &bias);
    assert_close(&out, &expected, "after adding channel 17");

    // The same pattern again (locality): nothing new.
    let out = run(&linear, &x, m);
    assert_eq!(linear.outlier_stats(), stats_now(3, 1, 4));
    assert_close(&out, &expected, "second call");

    // Large but under the threshold: quantized with the rest.
    let mut x = activations(&mut rng, m, k, &OUTLIERS, 50.0);
    x[40] = 0.9 * linear.abs_threshold();
    run(&linear, &x, m);
    assert_eq!(linear.outlier_stats(), stats_now(4, 1, 4));

    // Concurrent callers meeting the same new outlier add it once.
    let mut x = activations(&mut rng, m, k, &OUTLIERS, 50.0);
    x[k + 230] = -70.0;
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| run(&linear, &x, m));
        }
    });
    assert_eq!(linear.outlier_stats(), stats_now(8, 1 + 1, 5));
    assert_eq!(linear.outlier_set().channels(), [5, 17, 100, 200, 230]);
}

#[test]
fn a_full_set_quantizes_further_outliers_with_the_rest() {
    // k = 64: the run-time cap is ⌈0.08 · 64⌉ = 6 channels.
    let (n, k, m) = (16, 64, 3);
    let mut rng = XorShift::new(9);
    let w = rng.floats(n * k);
    let bias = vec![0.0; n];
    let mut stats = ChannelStats::new(k);
    stats.update(&rng.floats(16 * k));
    let linear = MixQ::from_name("mixq-w8a8").unwrap().quantize_layer(&layer(&w, None, n, k, &stats)).unwrap();
    assert!(linear.outlier_set().is_empty());
    let new: Vec<usize> = (0..10).map(|i| 3 + 6 * i).collect();
    let x = activations(&mut rng, m, k, &new, 100.0);
    let out = run(&linear, &x, m);
    let st = linear.outlier_stats();
    assert_eq!((st.channels_now, st.calls_with_new_outliers, st.calls_over_cap), (6, 1, 1));
    let set = linear.outlier_set();
    let w_hat = fake_quantize(&w, n, k, &QuantSpec::new(8, true, Granularity::PerChannel)).unwrap();
    // The channels left out are quantized with the rest: their values enter the per-token scale.
    let expected = reference(&x, m, k, set.channels(), &columns(&w_hat, k, set.channels()), &w_hat, &bias);
    assert_close(&out, &expected, "over the cap");
}

#[test]
fn outlier_sets_are_sorted_and_gather_in_order() {
    let (n, k, m) = (3, 8, 2);
    let w: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
    let set = OutlierSet::new(&[6, 1, 4], &w, n, k);
    assert_eq!(set.channels(), [1, 4, 6]);
    assert!(set.contains(4) && !set.contains(5) && !set.contains(100));
    assert_eq!(set.weight(), [1.0, 4.0, 6.0, 9.0, 12.0, 14.0, 17.0, 20.0, 22.0]);
    let x: Vec<f32> = (0..m * k).map(|i| 100.0 + i as f32).collect();
    assert_eq!(set.gather(&x, m), [101.0, 104.0, 106.0, 109.0, 112.0, 114.0]);

    // Calibration: over T · median, the largest ⌈2%⌉ kept, returned in channel order.
    let mut abs_max = vec![1.0f32; 100];
    for (j, v) in [(90, 20.0), (3, 30.0), (50, 9.0), (70, 7.0)] {
        abs_max[j] = v;
    }
    let (channels, threshold) = calibration_outliers(&abs_max, 8.0, 0.02).unwrap();
    assert_eq!((channels, threshold), (vec![3, 90], 8.0));
    let (channels, _) = calibration_outliers(&abs_max, 8.0, 0.05).unwrap();
    assert_eq!(channels, [3, 50, 90]);
    let (channels, _) = calibration_outliers(&abs_max, 6.0, 0.05).unwrap();
    assert_eq!(channels, [3, 50, 70, 90]);
    assert!(calibration_outliers(&[0.0; 10], 8.0, 0.02).unwrap_err().contains("median"));
    assert!(calibration_outliers(&[1.0, f32::NAN], 8.0, 0.02).is_err());
}

#[test]
fn mixq_names_and_errors() {
    for (name, bits) in [("mixq-w8a8", (8, 8)), ("mixq-w8a8-t6", (8, 8)), ("mixq-w4a8-g128-t6.5", (4, 8))] {
        let method = method_by_name(name).unwrap();
        assert_eq!((method.name(), method.bits()), (name.to_string(), bits));
    }
    assert_eq!(method_by_name("mixq-w4a8-g64-t3").unwrap().name(), "mixq-w4a8-g64");
    assert_eq!(method_by_name("mixq-w4a8-g128-gptq-c5-t2").unwrap().name(), "mixq-w4a8-g128-t2-c5-gptq");
    for (name, expected) in [
        ("mixq-w4a8", "expected mixq"),
        ("mixq-w4a8-g12", "multiple of 8"),
        ("mixq-w4a8-gx", "group size must be a number"),
        ("mixq-w8a8-g32", "unknown option"),
        ("mixq-w8a8-t0", "positive"),
        ("mixq-w8a8-t-1", "positive"),
        ("mixq-w8a8-tx", "not a number"),
        ("mixq-w8a8-tinf", "positive"),
        ("mixq-w4a16", "expected mixq"),
        ("mixq", "unknown quantization method"),
    ] {
        let e = method_by_name(name).err().unwrap_or_else(|| panic!("{name} was accepted")).to_string();
        assert!(e.contains(expected), "{name}: {e}");
    }
    let (n, k) = (4, 64);
    let w = vec![0.5; n * k];
    let method = method_by_name("mixq-w8a8").unwrap();
    let no_stats = LayerToQuantize { weight: &w, bias: None, out_features: n, in_features: k, input_stats: None };
    let e = method.quantize(&no_stats).err().unwrap().to_string();
    assert!(e.contains("needs calibration"), "{e}");
    let mut narrow = ChannelStats::new(32);
    narrow.update(&[1.0; 32]);
    let e = method.quantize(&layer(&w, None, n, k, &narrow)).err().unwrap().to_string();
    assert!(e.contains("32 channels") && e.contains("64 inputs"), "{e}");
    let e = method.quantize(&layer(&w, None, n, k, &ChannelStats::new(k))).err().unwrap().to_string();
    assert!(e.contains("median"), "no tokens seen: {e}");
    let mut stats = ChannelStats::new(k);
    stats.update(&[1.0; 64]);
    // Groups may leave a shorter last one (64 = 48 + 16); the int4 kernels take k in multiples of 8.
    let g48 = method_by_name("mixq-w4a8-g48").unwrap();
    assert!(g48.quantize(&layer(&w, None, n, k, &stats)).is_ok());
    let mut stats60 = ChannelStats::new(60);
    stats60.update(&[1.0; 60]);
    let e = g48.quantize(&layer(&w[..n * 60], None, n, 60, &stats60)).err().unwrap();
    assert!(e.to_string().contains("60"), "{e}");
    let e = method.quantize(&layer(&w[..100], None, n, k, &stats)).err().unwrap();
    assert!(e.to_string().contains("100"), "{e}");
    let e = method.quantize(&layer(&w, Some(&[0.0; 3]), n, k, &stats)).err().unwrap();
    assert!(e.to_string().contains("bias"), "{e}");
}

#[test]
fn mixq_layers_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<anyq_quant::methods::mixq::MixQLinear>();
    let _: &dyn QuantMethod = &MixQ::from_name("mixq-w8a8").unwrap();
}
