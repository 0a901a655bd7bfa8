//! anyq's MixQ layers ([`MixQLinear`], quantized in memory or loaded from a checkpoint) as the
//! GPU model's [`CudaLinear::Mixq`].
//!
//! The GPU runs the layers that read one input as one layer (q/k/v stacked, gate/up stacked) and
//! quantizes that input once, with one outlier set; CPU layers choose their outlier channels each.
//! The GPU layer takes the union of its layers' channels. Where a layer did not mark a channel of
//! the union, its f16 outlier column is its dequantized integer column, which is the weight the
//! CPU layer computes with there ([`Linear::dense_weight`]): the producer takes every union
//! channel out of the int8 activations (zeroed, and out of each token's amax), so the integer
//! product leaves that column out and the weights stay the CPU layer's; only the channel's
//! activation is f16 instead of int8. (Calibration gives q, k and v the statistics of one input,
//! hence one set: the union adds channels only to layers quantized with other thresholds, or to
//! sets that grew at run time before the conversion.)
//!
//! Run-time outliers: a CPU layer adds a channel to its set when |x| exceeds its calibration
//! threshold outside the set; the GPU's sets are fixed, and its producer counts the tokens whose
//! amax outside the set exceeds the threshold it is given ([`crate::cuda::MixqCounts`]). A stacked
//! layer counts with the lowest threshold of its layers: a token is counted when any of them would
//! have met a new outlier on the CPU (the union's channels are exact already).

use anyq_core::cpu::int8::{I4Weight, I8Weight};
use anyq_core::Linear;
use anyq_cuda::mixq::{MixqWeight, OutlierSet, K_TILE};
use anyq_cuda::CudaDevice;
use anyq_quant::methods::int_weight::IntWeight;
use anyq_quant::methods::mixq::{MixQ, MixQLinear};
use anyq_quant::methods::QuantMethod;
use half::f16;

use crate::cuda::{to_f16, CudaLinear, CudaModelError, GPU_MODELS};

/// The integer part of a GPU MixQ layer, as `MixqWeight::w8` and `MixqWeight::w4` take it.
#[derive(Clone, Debug, PartialEq)]
pub enum StackedInts {
    /// `q[n][k]` with per-row `scales[n]`: w = scale · q.
    W8 { q: Vec<i8>, scales: Vec<f32> },
    /// Unsigned `q[n][k]` in 0..=15 with `scales` and `zeros` per row and group of `group` k
    /// (`[n][⌈k/group⌉]`): w = scale · (q − zero).
    W4 { q: Vec<u8>, scales: Vec<f32>, zeros: Vec<u8>, group: usize },
}

/// MixQ layers that read one input, stacked on the host into one GPU layer `[n, k]` (their rows
/// in order).
#[derive(Clone, Debug, PartialEq)]
pub struct StackedMixq {
    pub n: usize,
    pub k: usize,
    pub ints: StackedInts,
    /// The union of the layers' outlier channels, increasing.
    pub channels: Vec<u32>,
    /// `[n][channels.len()]`: each row's weight at those channels.
    pub outlier_weight: Vec<f16>,
    /// The lowest of the layers' calibration thresholds on |x|.
    pub threshold: f32,
}

/// Whether the GPU's W4 kernels take groups of `group` k: they read a scale and zero point per
/// 128 k or a multiple.
fn check_group(group: usize) -> Result<(), String> {
    match group.is_multiple_of(K_TILE) {
        true => Ok(()),
        false => Err(format!("4-bit weights in groups of {group}: the GPU needs groups of a multiple of {K_TILE}")),
    }
}

fn describe(weight: &IntWeight) -> String {
    match weight {
        IntWeight::W8(_) => "8-bit weights".into(),
        IntWeight::W4(w) => format!("4-bit weights in groups of {}", w.group()),
    }
}

/// anyq's int4 values and zero points are signed, in [-8, 7]; the GPU's are unsigned, in [0, 15].
fn unsigned_nibbles(values: &[i8]) -> impl Iterator<Item = u8> + '_ {
    values.iter().map(|&v| (v + 8) as u8)
}

fn push_w8(q: &mut Vec<i8>, scales: &mut Vec<f32>, w: &I8Weight) {
    q.extend(w.values());
    scales.extend_from_slice(w.scales());
}

fn push_w4(q: &mut Vec<u8>, scales: &mut Vec<f32>, zeros: &mut Vec<u8>, w: &I4Weight) {
    q.extend(unsigned_nibbles(&w.values()));
    scales.extend(w.scales());
    match w.zeros() {
        Some(z) => zeros.extend(unsigned_nibbles(&z)),
        // Symmetric: the signed zero point is 0.
        None => zeros.extend(std::iter::repeat_n(8, w.n() * w.groups())),
    }
}

/// `layers` (named in errors, e.g. `layer 3 self_attn.k_proj`), which read one input, stacked
/// into one GPU layer. Refuses what the GPU kernels cannot take: 4-bit groups that are not a
/// multiple of 128 k, and layers of different bit widths or groups.
pub fn stack_mixq(layers: &[(&str, &MixQLinear)]) -> Result<StackedMixq, CudaModelError> {
    let unsupported = CudaModelError::Unsupported;
    let Some(&(first_name, first)) = layers.first() else {
        return Err(unsupported("no MixQ layer to stack".into()));
    };
    let k = first.in_features();
    if let Some((name, layer)) = layers.iter().find(|(_, l)| l.in_features() != k) {
        let message = format!("{name} reads {} inputs, {first_name} {k}: they are not one input", layer.in_features());
        return Err(unsupported(message));
    }
    let mut ints = match first.int_weight() {
        IntWeight::W8(_) => StackedInts::W8 { q: Vec::new(), scales: Vec::new() },
        IntWeight::W4(w) => {
            check_group(w.group()).map_err(|message| unsupported(format!("{first_name}: {message}")))?;
            StackedInts::W4 { q: Vec::new(), scales: Vec::new(), zeros: Vec::new(), group: w.group() }
        }
    };
    for (name, layer) in layers {
        match (&mut ints, layer.int_weight()) {
            (StackedInts::W8 { q, scales }, IntWeight::W8(w)) => push_w8(q, scales, w),
            (StackedInts::W4 { q, scales, zeros, group }, IntWeight::W4(w)) if w.group() == *group => {
                push_w4(q, scales, zeros, w)
            }
            (_, other) => {
                return Err(unsupported(format!(
                    "{name} has {}, {first_name} {}: the GPU runs them as one layer",
                    describe(other),
                    describe(first.int_weight())
                )))
            }
        }
    }
    let mut channels: Vec<usize> = layers.iter().flat_map(|(_, l)| l.outlier_set().channels().to_vec()).collect();
    channels.sort_unstable();
    channels.dedup();
    let n = layers.iter().map(|(_, l)| l.out_features()).sum();
    let mut outlier_weight = Vec::with_capacity(n * channels.len());
    if !channels.is_empty() {
        for (name, layer) in layers {
            // The layer's own channels hold its f32 columns, the union's others its dequantized
            // integers.
            let w = layer.dense_weight();
            let columns: Vec<f32> = w.chunks_exact(k.max(1)).flat_map(|row| channels.iter().map(|&c| row[c])).collect();
            outlier_weight.extend(to_f16(&format!("{name} outlier columns"), &columns)?);
        }
    }
    Ok(StackedMixq {
        n,
        k,
        ints,
        channels: channels.iter().map(|&c| c as u32).collect(),
        outlier_weight,
        threshold: layers.iter().map(|(_, l)| l.abs_threshold()).fold(f32::INFINITY, f32::min),
    })
}

impl StackedMixq {
    /// The layer on `device`.
    pub fn upload(&self, device: &CudaDevice) -> Result<CudaLinear, CudaModelError> {
        let outliers = OutlierSet::new(device, self.k, &self.channels)?;
        let shape = (self.n, self.k);
        let weight = match &self.ints {
            StackedInts::W8 { q, scales } => MixqWeight::w8(device, q, scales, shape, &outliers, &self.outlier_weight)?,
            StackedInts::W4 { q, scales, zeros, group } => {
                MixqWeight::w4(device, q, scales, zeros, shape, *group, &outliers, &self.outlier_weight)?
            }
        };
        Ok(CudaLinear::Mixq { weight, threshold: self.threshold })
    }
}

/// Refuses, before any quantizing, a method whose layers the GPU model cannot run: of the
/// quantization methods it runs MixQ's, with 4-bit groups of a multiple of 128.
pub fn check_gpu_method(name: &str) -> Result<(), CudaModelError> {
    let unsupported = |message: String| CudaModelError::Unsupported(format!("{name}: {message}"));
    let method = MixQ::from_name(name).map_err(|_| unsupported(GPU_MODELS.into()))?;
    method.group_size().map_or(Ok(()), check_group).map_err(unsupported)
}

#[cfg(test)]
mod tests {
    use anyq_core::testing::XorShift;
    use anyq_quant::methods::LayerToQuantize;

    use super::*;

    /// A MixQ layer of random weights `[n, k]` with `outliers` and `threshold`.
    fn mixq_layer(
        seed: u64,
        (n, k): (usize, usize),
        group: Option<usize>,
        outliers: &[usize],
        threshold: f32,
    ) -> MixQLinear {
        let weight = XorShift::new(seed).floats(n * k);
        let layer = LayerToQuantize { weight: &weight, bias: None, out_features: n, in_features: k, input_stats: None };
        MixQLinear::new(&layer, group, outliers, threshold, None).unwrap()
    }

    /// The weight `[n, k]` the GPU layer computes with, as mixq.cu's GEMM does: the integer
    /// product over the channels outside the set, the f16 product over those in it.
    fn gpu_weight(s: &StackedMixq) -> Vec<f32> {
        let k = s.k;
        let mut w: Vec<f32> = match &s.ints {
            StackedInts::W8 { q, scales } => q.iter().enumerate().map(|(i, &q)| q as f32 * scales[i / k]).collect(),
            StackedInts::W4 { q, scales, zeros, group } => {
                let groups = k.div_ceil(*group);
                let at = |i: usize| i / k * groups + i % k / group;
                q.iter().enumerate().map(|(i, &q)| scales[at(i)] * (q as f32 - zeros[at(i)] as f32)).collect()
            }
        };
        for (row, columns) in w.chunks_exact_mut(k).zip(s.outlier_weight.chunks_exact(s.channels.len().max(1))) {
            for (&c, v) in s.channels.iter().zip(columns) {
                row[c as usize] = v.to_f32();
            }
        }
        w
    }

    #[test]
    fn stacked_layers_compute_with_the_weights_of_the_cpu_layers() {
        let k = 256;
        for group in [None, Some(128)] {
            let a = mixq_layer(1, (5, k), group, &[3, 130], 2.0);
            let b = mixq_layer(2, (7, k), group, &[130, 200, 255], 1.5);
            let stacked = stack_mixq(&[("a", &a), ("b", &b)]).unwrap();
            assert_eq!((stacked.n, stacked.k), (12, k));
            assert_eq!(stacked.channels, [3, 130, 200, 255], "the union of the sets, increasing");
            assert_eq!(stacked.threshold, 1.5, "the lower threshold counts for both");
            // Channel 200 of a and 3 of b are outside their own sets: their f16 columns are the
            // dequantized integers, which is what the CPU layers compute with there. Integer
            // columns dequantize exactly; outlier columns are the CPU's rounded to f16.
            let want = [a.dense_weight(), b.dense_weight()].concat();
            for (i, (got, want)) in gpu_weight(&stacked).into_iter().zip(want).enumerate() {
                let want = match stacked.channels.contains(&((i % k) as u32)) {
                    true => f16::from_f32(want).to_f32(),
                    false => want,
                };
                assert_eq!(got, want, "{group:?}: row {}, column {}", i / k, i % k);
            }
        }
    }

    #[test]
    fn layers_without_outliers_stack_into_a_layer_without_outliers() {
        let a = mixq_layer(3, (4, 128), None, &[], 1.0);
        let stacked = stack_mixq(&[("a", &a)]).unwrap();
        assert!(stacked.channels.is_empty() && stacked.outlier_weight.is_empty());
        assert_eq!(gpu_weight(&stacked), a.dense_weight());
    }

    #[test]
    fn what_the_gpu_kernels_cannot_take_is_refused_with_the_layer_name() {
        let g64 = mixq_layer(4, (4, 256), Some(64), &[1], 1.0);
        let err = stack_mixq(&[("layer 2 mlp.down_proj", &g64)]).unwrap_err().to_string();
        assert!(err.contains("layer 2 mlp.down_proj") && err.contains("groups of a multiple of 128"), "{err}");
        let (w8, w4) = (mixq_layer(5, (4, 256), None, &[1], 1.0), mixq_layer(6, (4, 256), Some(128), &[1], 1.0));
        let err = stack_mixq(&[("q", &w8), ("k", &w4)]).unwrap_err().to_string();
        assert!(err.contains("k has 4-bit weights in groups of 128, q 8-bit weights"), "{err}");
        let narrow = mixq_layer(7, (4, 128), None, &[1], 1.0);
        assert!(stack_mixq(&[("q", &w8), ("k", &narrow)]).is_err(), "layers of one input have one width");
    }

    #[test]
    fn only_mixq_methods_with_whole_128_k_groups_run_on_the_gpu() {
        for name in ["mixq-w8a8", "mixq-w4a8-g128", "mixq-w4a8-g256-t6-gptq"] {
            check_gpu_method(name).unwrap();
        }
        let err = check_gpu_method("mixq-w4a8-g64").unwrap_err().to_string();
        assert!(err.contains("mixq-w4a8-g64") && err.contains("groups of a multiple of 128"), "{err}");
        let err = check_gpu_method("rtn-w8a8").unwrap_err().to_string();
        assert!(err.contains("only FP16 and MixQ models run on the GPU"), "{err}");
    }
}
