//! The FP16 model's kernels (`kernels/model.cu`) against plain host references on random inputs
//! of odd shapes. Every output buffer starts poisoned (NaN), so an element a kernel forgets to
//! write fails the comparison. On a machine without a GPU each test says so and returns, unless
//! ANYQ_REQUIRE_GPU is set, which turns a missing GPU into a failure.

use anyq_core::cpu::{causal_attention_reference, AttentionShape, Rope, RopeStyle};
use anyq_core::testing::XorShift;
use anyq_cuda::ops::{self, AttentionScratch, DecodeShape, RopeFrequencies};
use anyq_cuda::testing::gpu_or_skip as device;
use anyq_cuda::{BlasGemm, CudaDevice, CudaError};
use half::f16;

const F16_POISON: u16 = 0x7e00; // a quiet NaN
const F32_POISON: f32 = f32::NAN;

fn f16s(values: &[f32]) -> Vec<f16> {
    values.iter().map(|&v| f16::from_f32(v)).collect()
}

fn f32s(values: &[f16]) -> Vec<f32> {
    values.iter().map(|v| v.to_f32()).collect()
}

/// Random f16 values in [-scale, scale], and the same values in f32 (what the kernels read).
fn random_f16(rng: &mut XorShift, n: usize, scale: f32) -> (Vec<f16>, Vec<f32>) {
    let h = f16s(&rng.floats(n).iter().map(|v| v * scale).collect::<Vec<_>>());
    let f = f32s(&h);
    (h, f)
}

fn poisoned_f16(device: &CudaDevice, n: usize) -> cudarc::driver::CudaSlice<f16> {
    device.upload(&vec![f16::from_bits(F16_POISON); n]).unwrap()
}

/// Each element within `atol + rtol · |want|` (f16 outputs round at 2⁻¹¹ relative); NaN (an
/// unwritten, poisoned element) always fails.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= atol + rtol * w.abs();
        assert!(ok, "{what}: element {i}: got {g}, want {w}");
    }
}

#[test]
fn embedding_gathers_rows_of_the_table() {
    let Some(device) = device() else { return };
    let mut rng = XorShift::new(1);
    let (vocab, dim) = (101, 333);
    let (table_h, table) = random_f16(&mut rng, vocab * dim, 2.0);
    let tokens: Vec<u32> = vec![0, 100, 7, 7, 55];
    let table_d = device.upload(&table_h).unwrap();
    let tokens_d = device.upload(&tokens).unwrap();
    let mut x = device.upload(&vec![F32_POISON; tokens.len() * dim + 3]).unwrap();
    ops::embed(&device, &table_d, (vocab, dim), &tokens_d, tokens.len(), &mut x).unwrap();
    let got = device.download(&x).unwrap();
    let want: Vec<f32> = tokens.iter().flat_map(|&t| table[t as usize * dim..][..dim].to_vec()).collect();
    assert_close("embedding", &got[..want.len()], &want, 0.0, 0.0);
    assert!(got[want.len()..].iter().all(|v| v.is_nan()), "rows past `rows` must stay untouched");
}

fn rms_norm_reference(x: &[f32], gamma: &[f32], eps: f32) -> Vec<f32> {
    let dim = gamma.len();
    x.chunks_exact(dim)
        .flat_map(|row| {
            let mean_square = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let inv_rms = 1.0 / (mean_square + eps).sqrt();
            row.iter().zip(gamma).map(move |(v, g)| v * inv_rms * g)
        })
        .collect()
}

#[test]
fn rms_norm_and_the_fused_residual_add_match_the_host() {
    let Some(device) = device() else { return };
    let mut rng = XorShift::new(2);
    let eps = 1e-5;
    // A block holds a row in registers, 4 float4 (dim % 4 == 0) or 4 floats a thread, up to 1024
    // threads: rows of LLaMA-8B (4096) and up to 16384 floats, or 4096 odd ones; longer rows
    // loop. Odd and short rows leave threads and float4s partly empty.
    let cases = [(1, 576), (7, 333), (3, 1), (130, 2049), (2, 4100), (1, 4096), (3, 4095), (1, 16384)];
    let fallback = [(2, 16388), (1, 5001)];
    for (rows, dim) in cases.into_iter().chain(fallback) {
        // Large values in a few channels, as LLaMA residual streams hold.
        let x: Vec<f32> = rng
            .floats(rows * dim)
            .iter()
            .enumerate()
            .map(|(i, v)| v * if i % 97 == 5 { 3000.0 } else { 3.0 })
            .collect();
        let delta: Vec<f32> = rng.floats(rows * dim).iter().map(|v| v * 50.0).collect();
        let gamma: Vec<f32> = rng.floats(dim).iter().map(|v| 1.0 + 0.5 * v).collect();
        let gamma_d = device.upload(&gamma).unwrap();
        let delta_d = device.upload(&delta).unwrap();

        let mut x_d = device.upload(&x).unwrap();
        let mut out = poisoned_f16(&device, rows * dim);
        ops::rms_norm(&device, &mut x_d, None, &gamma_d, eps, (rows, dim), &mut out).unwrap();
        assert_close(&format!("x without a delta {rows}x{dim}"), &device.download(&x_d).unwrap(), &x, 0.0, 0.0);
        let want = rms_norm_reference(&x, &gamma, eps);
        assert_close(&format!("rms_norm {rows}x{dim}"), &f32s(&device.download(&out).unwrap()), &want, 1e-6, 1e-3);

        let mut x_d = device.upload(&x).unwrap();
        let mut out = poisoned_f16(&device, rows * dim);
        ops::rms_norm(&device, &mut x_d, Some(&delta_d), &gamma_d, eps, (rows, dim), &mut out).unwrap();
        let summed: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
        assert_close(&format!("x += delta {rows}x{dim}"), &device.download(&x_d).unwrap(), &summed, 0.0, 0.0);
        let want = rms_norm_reference(&summed, &gamma, eps);
        assert_close(&format!("add_rms_norm {rows}x{dim}"), &f32s(&device.download(&out).unwrap()), &want, 1e-6, 1e-3);
    }
}

#[test]
fn silu_mul_matches_the_host() {
    let Some(device) = device() else { return };
    let mut rng = XorShift::new(3);
    for (rows, ffn) in [(1, 1536), (5, 333), (67, 1000), (1, 1)] {
        let (gate_up_h, gate_up) = random_f16(&mut rng, rows * 2 * ffn, 12.0);
        let gate_up_d = device.upload(&gate_up_h).unwrap();
        let mut act = poisoned_f16(&device, rows * ffn);
        ops::silu_mul(&device, &gate_up_d, (rows, ffn), &mut act).unwrap();
        let want: Vec<f32> = gate_up
            .chunks_exact(2 * ffn)
            .flat_map(|row| {
                let (gate, up) = row.split_at(ffn);
                gate.iter().zip(up).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect::<Vec<_>>()
            })
            .collect();
        assert_close(&format!("silu_mul {rows}x{ffn}"), &f32s(&device.download(&act).unwrap()), &want, 1e-6, 1e-3);
    }
}

struct RopeCase {
    rows: usize,
    past: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    bias: bool,
    factors: bool,
}

#[test]
fn rope_qkv_rotates_both_styles_and_appends_to_the_cache() {
    let Some(device) = device() else { return };
    let mut rng = XorShift::new(4);
    let cases = [
        RopeCase { rows: 5, past: 0, heads: 9, kv_heads: 3, head_dim: 64, bias: false, factors: false },
        RopeCase { rows: 1, past: 37, heads: 9, kv_heads: 3, head_dim: 64, bias: false, factors: false },
        RopeCase { rows: 19, past: 5000, heads: 6, kv_heads: 2, head_dim: 16, bias: true, factors: false },
        RopeCase { rows: 3, past: 11, heads: 4, kv_heads: 4, head_dim: 128, bias: true, factors: true },
        RopeCase { rows: 70, past: 2, heads: 2, kv_heads: 1, head_dim: 8, bias: false, factors: true },
    ];
    for case in &cases {
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            let RopeCase { rows, past, heads, kv_heads, head_dim: d, bias, factors } = *case;
            let what = format!("{style:?} rows {rows} past {past} heads {heads}/{kv_heads} d {d}");
            let (q_width, kv_width) = (heads * d, kv_heads * d);
            let width = q_width + 2 * kv_width;
            let freq_factors: Vec<f32> = (0..d / 2).map(|i| 1.0 + i as f32 * 0.37).collect();
            let rope = Rope::new(style, d, 10000.0, factors.then_some(freq_factors.as_slice()));
            let (qkv_h, qkv) = random_f16(&mut rng, rows * width, 4.0);
            let bias_values: Vec<f32> = rng.floats(width);

            let frequencies = RopeFrequencies::new(&device, &rope).unwrap();
            let qkv_d = device.upload(&qkv_h).unwrap();
            let bias_d = device.upload(&bias_values).unwrap();
            let capacity = past + rows + 2;
            let mut q = poisoned_f16(&device, rows * q_width);
            let mut k_cache = poisoned_f16(&device, capacity * kv_width);
            let mut v_cache = poisoned_f16(&device, capacity * kv_width);
            let shape = AttentionShape { queries: rows, past, n_heads: heads, n_kv_heads: kv_heads, head_dim: d };
            let bias_arg = bias.then_some(&bias_d);
            ops::rope_qkv(&device, &qkv_d, bias_arg, &frequencies, shape, &mut q, &mut k_cache, &mut v_cache).unwrap();

            // The host: split, add the bias, rotate with the CPU's RoPE at positions past...
            let mut want_q = Vec::new();
            let (mut want_k, mut want_v) = (Vec::new(), Vec::new());
            for row in qkv.chunks_exact(width) {
                let biased: Vec<f32> =
                    row.iter().zip(&bias_values).map(|(x, b)| if bias { x + b } else { *x }).collect();
                want_q.extend_from_slice(&biased[..q_width]);
                want_k.extend_from_slice(&biased[q_width..q_width + kv_width]);
                want_v.extend_from_slice(&biased[q_width + kv_width..]);
            }
            let (cos, sin) = rope.tables(past..past + rows);
            rope.apply(&mut want_q, heads, &cos, &sin);
            rope.apply(&mut want_k, kv_heads, &cos, &sin);

            assert_close(&format!("{what}: q"), &f32s(&device.download(&q).unwrap()), &want_q, 1e-5, 1e-3);
            for (name, cache, want) in [("k", &k_cache, &want_k), ("v", &v_cache, &want_v)] {
                let got = f32s(&device.download(cache).unwrap());
                let (before, rest) = got.split_at(past * kv_width);
                let (new, after) = rest.split_at(rows * kv_width);
                assert_close(&format!("{what}: {name} cache"), new, want, 1e-5, 1e-3);
                assert!(before.iter().chain(after).all(|v| v.is_nan()), "{what}: {name} written outside its rows");
            }
        }
    }
}

struct AttentionCase {
    queries: usize,
    past: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

#[test]
fn attention_matches_the_host_for_prefill_and_decode_with_gqa() {
    let Some(device) = device() else { return };
    let mut rng = XorShift::new(5);
    let cases = [
        // SmolLM2's heads: a prompt, then decode steps short and long.
        AttentionCase { queries: 13, past: 0, heads: 9, kv_heads: 3, head_dim: 64 },
        AttentionCase { queries: 1, past: 13, heads: 9, kv_heads: 3, head_dim: 64 },
        AttentionCase { queries: 1, past: 1000, heads: 9, kv_heads: 3, head_dim: 64 },
        // A chunk after earlier chunks, crossing 32-key tiles.
        AttentionCase { queries: 33, past: 31, heads: 6, kv_heads: 2, head_dim: 16 },
        AttentionCase { queries: 70, past: 0, heads: 4, kv_heads: 4, head_dim: 128 },
        AttentionCase { queries: 3, past: 64, heads: 8, kv_heads: 1, head_dim: 256 },
        AttentionCase { queries: 2, past: 5, heads: 5, kv_heads: 5, head_dim: 8 },
        AttentionCase { queries: 1, past: 0, heads: 3, kv_heads: 1, head_dim: 80 },
        // Few queries over long contexts split their keys over warps (as does the 1000-key one):
        // LLaMA-8B's heads (on an H100, 66 splits of 64 keys, one ending 4 keys into its span,
        // the last empty) and heads of 256 dims.
        AttentionCase { queries: 1, past: 4099, heads: 32, kv_heads: 8, head_dim: 128 },
        AttentionCase { queries: 2, past: 200, heads: 4, kv_heads: 1, head_dim: 256 },
    ];
    for case in &cases[cases.len() - 2..] {
        let (tasks, keys) = (case.queries * case.heads, case.past + case.queries);
        assert!(ops::attention_splits(&device, tasks, keys) > 1, "{tasks} tasks of {keys} keys must split");
    }
    let mut scratch = AttentionScratch::new(&device).unwrap();
    for case in &cases {
        let AttentionCase { queries, past, heads, kv_heads, head_dim: d } = *case;
        let what = format!("queries {queries} past {past} heads {heads}/{kv_heads} d {d}");
        let (q_width, kv_width) = (heads * d, kv_heads * d);
        let keys = past + queries;
        // Unit-scale q and k give peaked softmaxes as well as flat ones across heads.
        let (q_h, q) = random_f16(&mut rng, queries * q_width, 2.0);
        let (k_h, k) = random_f16(&mut rng, keys * kv_width, 2.0);
        let (v_h, v) = random_f16(&mut rng, keys * kv_width, 1.0);
        // Cache rows past the keys are NaN: reading one would poison the output.
        let capacity = keys + 5;
        let pad = vec![f16::from_bits(F16_POISON); (capacity - keys) * kv_width];
        let k_d = device.upload(&[k_h, pad.clone()].concat()).unwrap();
        let v_d = device.upload(&[v_h, pad].concat()).unwrap();
        let q_d = device.upload(&q_h).unwrap();
        let mut out = poisoned_f16(&device, queries * q_width);
        let shape = AttentionShape { queries, past, n_heads: heads, n_kv_heads: kv_heads, head_dim: d };
        ops::attention(&device, &q_d, &k_d, &v_d, shape, &mut scratch, &mut out).unwrap();
        let want = causal_attention_reference(&q, &k, &v, shape);
        assert_close(&what, &f32s(&device.download(&out).unwrap()), &want, 1e-3, 2e-3);
    }
}

#[test]
fn residual_adds_match_the_host_for_f32_and_f16_deltas() {
    let Some(device) = device() else { return };
    let mut rng = XorShift::new(7);
    for (rows, dim) in [(1, 4096), (3, 333), (130, 1)] {
        let x: Vec<f32> = rng.floats(rows * dim).iter().map(|v| v * 3000.0).collect();
        let delta: Vec<f32> = rng.floats(rows * dim).iter().map(|v| v * 50.0).collect();
        // One element past the rows: it must stay as it was.
        let mut x_d = device.upload(&[x.as_slice(), &[7.0]].concat()).unwrap();
        ops::add_residual(&device, &mut x_d, &device.upload(&delta).unwrap(), (rows, dim)).unwrap();
        let summed: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).chain([7.0]).collect();
        assert_close(&format!("x += f32 delta {rows}x{dim}"), &device.download(&x_d).unwrap(), &summed, 0.0, 0.0);

        // The f16 delta as MixQ's GEMMs leave it: raw bits.
        let (delta_h, delta) = random_f16(&mut rng, rows * dim, 60.0);
        let bits: Vec<u16> = delta_h.iter().map(|v| v.to_bits()).collect();
        let mut x_d = device.upload(&[x.as_slice(), &[7.0]].concat()).unwrap();
        ops::add_residual(&device, &mut x_d, &device.upload(&bits).unwrap(), (rows, dim)).unwrap();
        let summed: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).chain([7.0]).collect();
        assert_close(&format!("x += f16 delta {rows}x{dim}"), &device.download(&x_d).unwrap(), &summed, 0.0, 0.0);
    }
}

struct DecodeCase {
    sequences: usize,
    capacity: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    bias: bool,
}

const DECODE_CASES: &[DecodeCase] = &[
    // LLaMA-3-8B's heads over a short context.
    DecodeCase { sequences: 5, capacity: 40, heads: 32, kv_heads: 8, head_dim: 128, bias: false },
    // SmolLM2's heads, positions across 32-key tiles.
    DecodeCase { sequences: 7, capacity: 100, heads: 9, kv_heads: 3, head_dim: 64, bias: true },
    DecodeCase { sequences: 1, capacity: 1, heads: 2, kv_heads: 1, head_dim: 8, bias: false },
    DecodeCase { sequences: 33, capacity: 9, heads: 4, kv_heads: 4, head_dim: 256, bias: true },
];

/// Each sequence at its own position: the first at 0, the last at the cache's end, the others
/// anywhere.
fn decode_positions(rng: &mut XorShift, sequences: usize, capacity: usize) -> Vec<usize> {
    (0..sequences)
        .map(|b| match b {
            0 => 0,
            _ if b == sequences - 1 => capacity - 1,
            _ => (rng.next_u64() % capacity as u64) as usize,
        })
        .collect()
}

fn positions_u32(positions: &[usize]) -> Vec<u32> {
    positions.iter().map(|&p| p as u32).collect()
}

#[test]
fn batched_rope_appends_each_sequence_at_its_own_position_in_its_own_cache() {
    let Some(device) = device() else { return };
    let mut rng = XorShift::new(8);
    for case in DECODE_CASES {
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            let DecodeCase { sequences, capacity, heads, kv_heads, head_dim: d, bias } = *case;
            let what = format!("{style:?} {sequences} sequences of {capacity} heads {heads}/{kv_heads} d {d}");
            let (q_width, kv_width) = (heads * d, kv_heads * d);
            let width = q_width + 2 * kv_width;
            let rope = Rope::new(style, d, 500000.0, None);
            let positions = decode_positions(&mut rng, sequences, capacity);
            // The QKV projection as MixQ's GEMM writes it: f16 bits.
            let (qkv_h, qkv) = random_f16(&mut rng, sequences * width, 4.0);
            let qkv_bits: Vec<u16> = qkv_h.iter().map(|v| v.to_bits()).collect();
            let bias_values: Vec<f32> = rng.floats(width);

            let frequencies = RopeFrequencies::new(&device, &rope).unwrap();
            let bias_d = device.upload(&bias_values).unwrap();
            let positions_d = device.upload(&positions_u32(&positions)).unwrap();
            let mut q = poisoned_f16(&device, sequences * q_width);
            let mut k_cache = poisoned_f16(&device, sequences * capacity * kv_width);
            let mut v_cache = poisoned_f16(&device, sequences * capacity * kv_width);
            let shape = DecodeShape { sequences, capacity, n_heads: heads, n_kv_heads: kv_heads, head_dim: d };
            ops::rope_qkv_decode_batched(
                &device,
                &device.upload(&qkv_bits).unwrap(),
                bias.then_some(&bias_d),
                &frequencies,
                &positions_d,
                shape,
                &mut q,
                &mut k_cache,
                &mut v_cache,
            )
            .unwrap();

            let got_q = f32s(&device.download(&q).unwrap());
            let got_k = f32s(&device.download(&k_cache).unwrap());
            let got_v = f32s(&device.download(&v_cache).unwrap());
            let mut written = vec![false; sequences * capacity];
            for (b, row) in qkv.chunks_exact(width).enumerate() {
                let biased: Vec<f32> =
                    row.iter().zip(&bias_values).map(|(x, c)| if bias { x + c } else { *x }).collect();
                let (mut want_q, mut want_k) =
                    (biased[..q_width].to_vec(), biased[q_width..q_width + kv_width].to_vec());
                let (cos, sin) = rope.tables(positions[b]..positions[b] + 1);
                rope.apply(&mut want_q, heads, &cos, &sin);
                rope.apply(&mut want_k, kv_heads, &cos, &sin);
                let at = b * capacity + positions[b];
                written[at] = true;
                assert_close(&format!("{what}: q of {b}"), &got_q[b * q_width..][..q_width], &want_q, 1e-5, 1e-3);
                assert_close(&format!("{what}: k of {b}"), &got_k[at * kv_width..][..kv_width], &want_k, 1e-5, 1e-3);
                let want_v = &biased[q_width + kv_width..];
                assert_close(&format!("{what}: v of {b}"), &got_v[at * kv_width..][..kv_width], want_v, 1e-5, 1e-3);
            }
            for (row, _) in written.iter().enumerate().filter(|(_, &w)| !w) {
                let untouched = |cache: &[f32]| cache[row * kv_width..][..kv_width].iter().all(|v| v.is_nan());
                assert!(untouched(&got_k) && untouched(&got_v), "{what}: cache row {row} written");
            }
        }
    }
}

/// Sequence b's keys and values in its own region of the caches `[sequences][capacity][kv_width]`,
/// rows past its position poisoned; attention reads rows `0..=positions[b]` only.
fn check_decode_attention(
    device: &CudaDevice,
    rng: &mut XorShift,
    scratch: &mut AttentionScratch,
    case: &DecodeCase,
    positions: &[usize],
) {
    let DecodeCase { sequences, capacity, heads, kv_heads, head_dim: d, .. } = *case;
    let what = format!("{sequences} sequences of {capacity} heads {heads}/{kv_heads} d {d}");
    let (q_width, kv_width) = (heads * d, kv_heads * d);
    let (q_h, q) = random_f16(rng, sequences * q_width, 2.0);
    let (k_h, k) = random_f16(rng, sequences * capacity * kv_width, 2.0);
    let (v_h, v) = random_f16(rng, sequences * capacity * kv_width, 1.0);
    let poison = |mut cache: Vec<f16>| {
        for (b, &p) in positions.iter().enumerate() {
            let first_unused = (b * capacity + p + 1) * kv_width;
            cache[first_unused..(b + 1) * capacity * kv_width].fill(f16::from_bits(F16_POISON));
        }
        cache
    };
    let (k_d, v_d) = (device.upload(&poison(k_h)).unwrap(), device.upload(&poison(v_h)).unwrap());
    let positions_d = device.upload(&positions_u32(positions)).unwrap();
    // The output as MixQ's producer reads it: f16 bits.
    let mut out = device.upload(&vec![F16_POISON; sequences * q_width]).unwrap();
    let shape = DecodeShape { sequences, capacity, n_heads: heads, n_kv_heads: kv_heads, head_dim: d };
    let q_d = device.upload(&q_h).unwrap();
    ops::attention_decode_batched(device, &q_d, &k_d, &v_d, &positions_d, shape, scratch, &mut out).unwrap();
    let got: Vec<f32> = device.download(&out).unwrap().into_iter().map(|b| f16::from_bits(b).to_f32()).collect();
    for (b, &p) in positions.iter().enumerate() {
        let region = b * capacity * kv_width..(b * capacity + p + 1) * kv_width;
        let one = AttentionShape { queries: 1, past: p, n_heads: heads, n_kv_heads: kv_heads, head_dim: d };
        let want = causal_attention_reference(&q[b * q_width..][..q_width], &k[region.clone()], &v[region], one);
        assert_close(&format!("{what}: sequence {b} at {p}"), &got[b * q_width..][..q_width], &want, 1e-3, 2e-3);
    }
}

#[test]
fn batched_decode_attention_reads_each_sequence_own_cache_up_to_its_position() {
    let Some(device) = device() else { return };
    let mut rng = XorShift::new(9);
    let mut scratch = AttentionScratch::new(&device).unwrap();
    for case in DECODE_CASES {
        let positions = decode_positions(&mut rng, case.sequences, case.capacity);
        check_decode_attention(&device, &mut rng, &mut scratch, case, &positions);
    }
}

/// Few sequences over long contexts: each one's keys are split over warps in spans of multiples
/// of 32 keys and the parts merged. The cases end spans within a tile (tiles of 8 keys for heads
/// of 256 dims, 16 for 128, 256 for 8), leave splits without keys and lanes idle (a row of 80
/// dims is 10 chunks for 16 lanes), and put sequences of one split beside long ones.
#[test]
fn batched_decode_attention_splits_long_contexts_over_warps_and_merges_them_exactly() {
    let Some(device) = device() else { return };
    let mut rng = XorShift::new(10);
    let mut scratch = AttentionScratch::new(&device).unwrap();
    let case = |sequences, capacity, heads, kv_heads, head_dim| DecodeCase {
        sequences,
        capacity,
        heads,
        kv_heads,
        head_dim,
        bias: false,
    };
    let cases = [
        (case(1, 1000, 32, 8, 128), vec![999]),
        (case(3, 300, 9, 3, 64), vec![0, 100, 299]),
        (case(2, 129, 8, 1, 256), vec![128, 77]),
        (case(4, 200, 6, 2, 80), vec![199, 31, 32, 33]),
        (case(1, 600, 2, 1, 8), vec![599]),
    ];
    for (case, positions) in &cases {
        let tasks = case.sequences * case.heads;
        assert!(ops::attention_splits(&device, tasks, case.capacity) > 1, "{tasks} tasks of {} keys", case.capacity);
        check_decode_attention(&device, &mut rng, &mut scratch, case, positions);
    }
}

/// A position past the cache (which the model refuses before a launch) is no read or write
/// outside it: the sequence's outputs are NaN and its cache rows untouched, whether its keys would
/// take one warp or several (the second shape splits sequence 0's 300 keys).
#[test]
fn batched_decode_positions_past_the_cache_give_nans_not_stray_accesses() {
    let Some(device) = device() else { return };
    let mut scratch = AttentionScratch::new(&device).unwrap();
    for (capacity, heads, kv_heads, d, first, splits) in [(4, 2, 1, 8, 1, false), (300, 4, 2, 64, 299, true)] {
        let sequences = 3;
        assert_eq!(ops::attention_splits(&device, sequences * heads, capacity) > 1, splits, "capacity {capacity}");
        let (q_width, kv_width) = (heads * d, kv_heads * d);
        let rope = RopeFrequencies::new(&device, &Rope::new(RopeStyle::Neox, d, 10000.0, None)).unwrap();
        let shape = DecodeShape { sequences, capacity, n_heads: heads, n_kv_heads: kv_heads, head_dim: d };
        let positions = device.upload(&[first as u32, capacity as u32, 1 << 31]).unwrap();
        let qkv = device.upload(&vec![f16::ONE; sequences * (q_width + 2 * kv_width)]).unwrap();
        let mut q = poisoned_f16(&device, sequences * q_width);
        let mut k_cache = device.upload(&vec![f16::ZERO; sequences * capacity * kv_width]).unwrap();
        let mut v_cache = device.upload(&vec![f16::ZERO; sequences * capacity * kv_width]).unwrap();
        ops::rope_qkv_decode_batched(&device, &qkv, None, &rope, &positions, shape, &mut q, &mut k_cache, &mut v_cache)
            .unwrap();
        let mut out = poisoned_f16(&device, sequences * q_width);
        ops::attention_decode_batched(&device, &q, &k_cache, &v_cache, &positions, shape, &mut scratch, &mut out)
            .unwrap();
        let (q, out) = (f32s(&device.download(&q).unwrap()), f32s(&device.download(&out).unwrap()));
        let what = format!("capacity {capacity}");
        assert!(q[..q_width].iter().chain(&out[..q_width]).all(|v| v.is_finite()), "{what}: sequence 0 is in range");
        assert!(q[q_width..].iter().chain(&out[q_width..]).all(|v| v.is_nan()), "{what}: sequences 1 and 2 are not");
        let keys = f32s(&device.download(&k_cache).unwrap());
        let written: Vec<usize> =
            (0..sequences * capacity).filter(|&r| keys[r * kv_width..][..kv_width].iter().any(|&v| v != 0.0)).collect();
        assert_eq!(written, vec![first], "{what}: only sequence 0's position {first} is written");
    }
}

#[test]
fn bad_shapes_are_errors_not_launches() {
    let Some(device) = device() else { return };
    let small = device.upload(&[f16::ZERO; 64]).unwrap();
    let mut out = device.upload(&[f16::ZERO; 64]).unwrap();
    let shape = |n_heads, n_kv_heads, head_dim| AttentionShape { queries: 1, past: 0, n_heads, n_kv_heads, head_dim };
    let shape_error = |r: anyq_cuda::Result<()>| matches!(r, Err(CudaError::Shape(_)));
    // 3 heads over 2 KV heads, a head of 12, buffers too short for 2 heads of 64.
    let mut scratch = AttentionScratch::new(&device).unwrap();
    let s = &mut scratch;
    assert!(shape_error(ops::attention(&device, &small, &small, &small, shape(3, 2, 16), s, &mut out)));
    assert!(shape_error(ops::attention(&device, &small, &small, &small, shape(2, 1, 12), s, &mut out)));
    assert!(shape_error(ops::attention(&device, &small, &small, &small, shape(2, 1, 64), s, &mut out)));
    assert!(shape_error(ops::silu_mul(&device, &small, (1, 33), &mut out)));
    let mut x = device.upload(&vec![0.0f32; 64]).unwrap();
    let gamma = device.upload(&vec![1.0f32; 65]).unwrap();
    assert!(shape_error(ops::rms_norm(&device, &mut x, None, &gamma, 1e-5, (1, 65), &mut out)));
    let (mut x, short) = (device.upload(&vec![0.0f32; 65]).unwrap(), device.upload(&vec![0.0f32; 64]).unwrap());
    assert!(shape_error(ops::rms_norm(&device, &mut x, Some(&short), &gamma, 1e-5, (1, 65), &mut out)));
    let rope = RopeFrequencies::new(&device, &Rope::new(RopeStyle::Neox, 16, 10000.0, None)).unwrap();
    let (mut k, mut v) = (device.upload(&[f16::ZERO; 16]).unwrap(), device.upload(&[f16::ZERO; 16]).unwrap());
    // The cache holds one position; the second row does not fit.
    let two_rows = AttentionShape { queries: 2, past: 0, n_heads: 1, n_kv_heads: 1, head_dim: 16 };
    let qkv = device.upload(&[f16::ZERO; 2 * 48]).unwrap();
    assert!(shape_error(ops::rope_qkv(&device, &qkv, None, &rope, two_rows, &mut out, &mut k, &mut v)));
    // A RoPE for heads of 16 on heads of 8.
    let one = AttentionShape { queries: 1, past: 0, n_heads: 1, n_kv_heads: 1, head_dim: 8 };
    assert!(shape_error(ops::rope_qkv(&device, &qkv, None, &rope, one, &mut out, &mut k, &mut v)));

    // Batched decode: two sequences of one position each need two cache rows; these hold one.
    let positions = device.upload(&[0u32, 0]).unwrap();
    let two = DecodeShape { sequences: 2, capacity: 1, n_heads: 1, n_kv_heads: 1, head_dim: 16 };
    assert!(shape_error(ops::rope_qkv_decode_batched(
        &device, &qkv, None, &rope, &positions, two, &mut out, &mut k, &mut v
    )));
    assert!(shape_error(ops::attention_decode_batched(&device, &small, &k, &v, &positions, two, s, &mut out)));
    // Fewer positions than sequences.
    let one_position = device.upload(&[0u32]).unwrap();
    let (mut k2, mut v2) = (device.upload(&[f16::ZERO; 32]).unwrap(), device.upload(&[f16::ZERO; 32]).unwrap());
    assert!(shape_error(ops::attention_decode_batched(&device, &small, &k2, &v2, &one_position, two, s, &mut out)));
    assert!(shape_error(ops::rope_qkv_decode_batched(
        &device,
        &qkv,
        None,
        &rope,
        &one_position,
        two,
        &mut out,
        &mut k2,
        &mut v2
    )));
    let odd = DecodeShape { sequences: 1, capacity: 1, n_heads: 3, n_kv_heads: 2, head_dim: 16 };
    assert!(shape_error(ops::attention_decode_batched(&device, &small, &k2, &v2, &positions, odd, s, &mut out)));
    let mut x = device.upload(&vec![0.0f32; 64]).unwrap();
    assert!(shape_error(ops::add_residual(&device, &mut x, &gamma, (1, 65))));
    assert!(shape_error(ops::add_residual(&device, &mut x, &small, (2, 33))));
}

/// The f32-output GEMM that the model's residual deltas and logits use.
#[test]
fn f16_gemm_with_f32_outputs_matches_the_host() {
    let Some(device) = device() else { return };
    let blas = BlasGemm::new(&device).unwrap();
    let mut rng = XorShift::new(6);
    for (m, n, k) in [(1, 49152, 576), (7, 333, 130), (64, 576, 1536)] {
        let (x_h, x) = random_f16(&mut rng, m * k, 1.0);
        let (w_h, w) = random_f16(&mut rng, n * k, 1.0);
        let (x_d, w_d) = (device.upload(&x_h).unwrap(), device.upload(&w_h).unwrap());
        let mut y = device.upload(&vec![F32_POISON; m * n]).unwrap();
        blas.f16_to_f32(&x_d, &w_d, &mut y, (m, n, k)).unwrap();
        let want = anyq_core::cpu::matmul_xwt_reference(&x, &w, m, n, k);
        let tol = 1e-4 * (k as f32).sqrt();
        assert_close(&format!("gemm {m}x{n}x{k}"), &device.download(&y).unwrap(), &want, tol, 1e-4);
    }
}
