//! MixQ (mixed precision, SC'24): the few input channels whose activations are outliers run in
//! f32, the rest on the integer kernels (W8A8 or W4A8), and the two products are added in the
//! integer kernel's epilogue.
//!
//! - Outliers from calibration: channel j is one if `abs_max_j > T · median(abs_max)` (T = 3 by
//!   default: on SmolLM2, T = 2, 3, 4, 6 cost +0.13%, +0.24%, +1.04%, +1.44% perplexity at
//!   W8A8), keeping at most the 2% largest. A threshold relative to the median does not depend
//!   on the model's activation scale (an absolute one such as LLM.int8()'s 6.0 does); ordinary
//!   channels stay within a few times the median while outlier channels reach tens of times it.
//!   The cap bounds the f32 product, `m·n·n_outliers` multiply-adds beside the integer `m·n·k`.
//! - The outlier set is sorted: its columns of x are gathered in order into a small dense
//!   `[m, n_outliers]` matrix, and the matching f32 weight columns are kept as `[n_outliers, n]`,
//!   each column contiguous for the thin product (`matmul_small_k`).
//! - The integer product covers the other channels: outlier channels are left out of the
//!   per-token amax and zeroed in the int8 activations, so the integer weight stays the whole
//!   quantized weight of all columns.
//! - The per-token amax and the new outliers below come from one scan of x, which the op that
//!   writes x (RMSNorm, the SwiGLU product) computes in the same pass when the model asks the
//!   layer's `input_scan`; otherwise `forward` scans x itself.
//! - Locality: outlier channels recur from token to token, so a channel that exceeds the
//!   absolute threshold `T · median` at run time joins the set for good (its f32 column is the
//!   dequantized integer column, the original weight being gone). `outlier_stats` counts how
//!   often that happens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use anyq_core::cpu::int8::quantize_rows_i8_outside;
use anyq_core::cpu::{matmul_small_k, scan_activations, transpose, ActivationScan, ChannelSet, ScanRequest};
use anyq_core::Linear;

use super::int_weight::IntWeight;
use super::{own_layer, LayerToQuantize, MethodError, QuantMethod};
use crate::gptq::{gptq, GptqOptions};
use crate::layer_arrays::{ArrayError, LayerArrays};

pub const SYNTAX: &str = "mixq-w8a8[-t{T}][-c{percent}][-gptq] | mixq-w4a8-g{group}[-t{T}][-c{percent}][-gptq]";
/// Outlier threshold, as a multiple of the median channel's calibration abs max.
pub const DEFAULT_THRESHOLD: f32 = 3.0;
/// Largest share of input channels that calibration may mark as outliers.
pub const MAX_CALIBRATION_FRACTION: f64 = 0.02;
/// Largest share the set may grow to at run time: past it, new outliers are quantized with the
/// rest, so that a shifted distribution cannot turn the layer into an f32 product.
pub const MAX_RUNTIME_FRACTION: f64 = 0.08;

pub struct MixQ {
    /// `None`: 8-bit weights per output channel; `Some(g)`: 4-bit weights in groups of g.
    group: Option<usize>,
    threshold: f32,
    /// Largest share of input channels calibration may mark as outliers.
    max_fraction: f64,
    /// Integers by GPTQ, the outlier columns kept in f32 absorbing the rounding error.
    gptq: bool,
}

/// `mixq-w8a8`, `mixq-w4a8-g128`, optionally followed by `-t{threshold}` (e.g. `-t6`),
/// `-c{percent}` (the calibration cap, 2 by default) and `-gptq`.
pub fn parse(name: &str) -> Result<Box<dyn QuantMethod>, MethodError> {
    Ok(Box::new(MixQ::from_name(name)?))
}

impl MixQ {
    /// The method `name` selects, as its own type (to reach `MixQLinear` without a downcast).
    pub fn from_name(name: &str) -> Result<Self, MethodError> {
        let invalid = |message: String| MethodError::Invalid { name: name.to_string(), message };
        let rest = name.strip_prefix("mixq-").ok_or_else(|| invalid(format!("expected {SYNTAX}")))?;
        let (group, rest) = if let Some(rest) = rest.strip_prefix("w8a8") {
            (None, rest)
        } else if let Some(rest) = rest.strip_prefix("w4a8-g") {
            let end = rest.find('-').unwrap_or(rest.len());
            let g: usize = rest[..end].parse().map_err(|_| invalid("group size must be a number".into()))?;
            if g == 0 || !g.is_multiple_of(8) {
                return Err(invalid(format!("4-bit groups must be a positive multiple of 8, not {g}")));
            }
            (Some(g), &rest[end..])
        } else {
            return Err(invalid(format!("expected {SYNTAX}")));
        };
        let (mut threshold, mut max_fraction, mut gptq) = (DEFAULT_THRESHOLD, MAX_CALIBRATION_FRACTION, false);
        for option in rest.split('-').filter(|o| !o.is_empty()) {
            if let Some(t) = option.strip_prefix('t') {
                // Options are split at '-', so "-t-1" arrives as an empty threshold.
                let message = match t.is_empty() {
                    true => "threshold must be a positive number".to_string(),
                    false => format!("threshold {t:?} is not a number"),
                };
                threshold = t.parse().map_err(|_| invalid(message))?;
            } else if let Some(c) = option.strip_prefix('c') {
                let percent: f64 = c.parse().map_err(|_| invalid(format!("cap {c:?} is not a number")))?;
                if !(percent > 0.0 && percent <= 100.0) {
                    return Err(invalid(format!("cap {percent}% is outside (0, 100]")));
                }
                max_fraction = percent / 100.0;
            } else if option == "gptq" {
                gptq = true;
            } else {
                return Err(invalid(format!("unknown option {option:?}; expected {SYNTAX}")));
            }
        }
        if !(threshold.is_finite() && threshold > 0.0) {
            return Err(invalid(format!("threshold {threshold} must be a positive number")));
        }
        Ok(MixQ { group, threshold, max_fraction, gptq })
    }

    /// `quantize`, returning the layer's own type (for `outlier_stats`).
    pub fn quantize_layer(&self, layer: &LayerToQuantize) -> Result<MixQLinear, MethodError> {
        let stats = layer.input_stats.ok_or_else(|| MethodError::NeedsCalibration(self.name()))?;
        let invalid = |message: String| MethodError::Invalid { name: self.name(), message };
        let k = layer.in_features;
        if stats.channels() != k {
            return Err(invalid(format!("calibration has {} channels for a layer of {k} inputs", stats.channels())));
        }
        let (channels, abs_threshold) =
            calibration_outliers(stats.abs_max(), self.threshold, self.max_fraction).map_err(invalid)?;
        let hessian = match self.gptq {
            true => Some(stats.hessian().ok_or_else(|| MethodError::NeedsCalibration(self.name()))?),
            false => None,
        };
        MixQLinear::new(layer, self.group, &channels, abs_threshold, hessian)
    }
}

impl QuantMethod for MixQ {
    fn name(&self) -> String {
        let base = match self.group {
            None => "mixq-w8a8".to_string(),
            Some(g) => format!("mixq-w4a8-g{g}"),
        };
        let threshold = match self.threshold == DEFAULT_THRESHOLD {
            true => String::new(),
            false => format!("-t{}", self.threshold),
        };
        let cap = match self.max_fraction == MAX_CALIBRATION_FRACTION {
            true => String::new(),
            false => format!("-c{}", self.max_fraction * 100.0),
        };
        format!("{base}{threshold}{cap}{}", if self.gptq { "-gptq" } else { "" })
    }

    fn bits(&self) -> (u8, u8) {
        (if self.group.is_some() { 4 } else { 8 }, 8)
    }

    fn needs_calibration(&self) -> bool {
        true
    }

    fn needs_hessian(&self) -> bool {
        self.gptq
    }

    fn group_size(&self) -> Option<usize> {
        self.group
    }

    fn quantize(&self, layer: &LayerToQuantize) -> Result<Box<dyn Linear>, MethodError> {
        Ok(Box::new(self.quantize_layer(layer)?))
    }

    fn save(&self, layer: &dyn Linear) -> Result<LayerArrays, MethodError> {
        Ok(own_layer::<MixQLinear>(self, layer)?.save())
    }

    fn load(&self, arrays: LayerArrays, n: usize, k: usize) -> Result<Box<dyn Linear>, MethodError> {
        Ok(Box::new(MixQLinear::load(arrays, n, k, self.group)?))
    }
}

/// The calibration outliers of one layer, sorted, and the absolute threshold `T · median` that
/// run time compares |x| with: channels with `abs_max > T · median(abs_max)`, at most
/// `⌈max_fraction · k⌉` of them (the largest).
pub fn calibration_outliers(abs_max: &[f32], threshold: f32, max_fraction: f64) -> Result<(Vec<usize>, f32), String> {
    if abs_max.is_empty() {
        return Err("the layer has no input channels".into());
    }
    if let Some(j) = abs_max.iter().position(|v| !v.is_finite()) {
        return Err(format!("calibration abs max of channel {j} is {}", abs_max[j]));
    }
    let mut sorted = abs_max.to_vec();
    let mid = sorted.len() / 2;
    let median = *sorted.select_nth_unstable_by(mid, f32::total_cmp).1;
    if median <= 0.0 {
        return Err("the median channel's calibration abs max is 0 (were any tokens seen?)".into());
    }
    let abs_threshold = threshold * median;
    let mut outliers: Vec<usize> = (0..abs_max.len()).filter(|&j| abs_max[j] > abs_threshold).collect();
    let cap = (max_fraction * abs_max.len() as f64).ceil() as usize;
    if outliers.len() > cap {
        outliers.sort_by(|&a, &b| abs_max[b].total_cmp(&abs_max[a]));
        outliers.truncate(cap);
    }
    outliers.sort_unstable();
    Ok((outliers, abs_threshold))
}

/// The channels that run in f32, in increasing order, with their f32 weight columns.
#[derive(Clone, Debug)]
pub struct OutlierSet {
    channels: Vec<usize>,
    /// `[channels.len(), n]`: row c is the weight column of `channels[c]`.
    weight: Vec<f32>,
    n: usize,
    /// The same channels as the mask that scans and quantization of x read.
    member: ChannelSet,
}

impl OutlierSet {
    /// The set of `channels` (any order, no duplicates, each < k) with their columns taken from
    /// `w` (`[n, k]`).
    pub fn new(channels: &[usize], w: &[f32], n: usize, k: usize) -> Self {
        let mut set = Self { channels: Vec::new(), weight: Vec::new(), n, member: ChannelSet::new(k, &[]) };
        set.insert(channels, |row, j| w[row * k + j]);
        set
    }

    /// The set of `channels` (increasing, each < k) whose columns `weight` (`[n, len]`) holds.
    fn from_columns(channels: &[usize], weight: Vec<f32>, n: usize, k: usize) -> Self {
        let weight = transpose(&weight, n, channels.len());
        Self { channels: channels.to_vec(), weight, n, member: ChannelSet::new(k, channels) }
    }

    /// The channels, in increasing order.
    pub fn channels(&self) -> &[usize] {
        &self.channels
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    pub fn contains(&self, j: usize) -> bool {
        self.member.contains(j)
    }

    /// The f32 weight columns `[n, len]`, in the order of `channels`.
    pub fn weight(&self) -> Vec<f32> {
        transpose(&self.weight, self.len(), self.n)
    }

    /// The set's columns of `x` (`[m, k]`), in order: a dense `[m, len]` matrix.
    pub fn gather(&self, x: &[f32], m: usize) -> Vec<f32> {
        let k = self.member.channels();
        let mut out = Vec::with_capacity(m * self.len());
        for row in x.chunks_exact(k.max(1)).take(m) {
            out.extend(self.channels.iter().map(|&j| row[j]));
        }
        out
    }

    /// Adds the channels not yet in the set, each column from `column(row, j)`, keeping the order.
    fn insert(&mut self, new: &[usize], column: impl Fn(usize, usize) -> f32) -> usize {
        let mut new: Vec<usize> = new.iter().copied().filter(|&j| !self.member.contains(j)).collect();
        new.sort_unstable();
        new.dedup();
        if new.is_empty() {
            return 0;
        }
        let old = std::mem::take(&mut self.channels);
        let mut merged = Vec::with_capacity(old.len() + new.len());
        // `Ok(c)`: old column c; `Err(j)`: new channel j.
        let mut sources = Vec::with_capacity(old.len() + new.len());
        let (mut a, mut b) = (0, 0);
        while a < old.len() || b < new.len() {
            if b == new.len() || (a < old.len() && old[a] < new[b]) {
                merged.push(old[a]);
                sources.push(Ok(a));
                a += 1;
            } else {
                merged.push(new[b]);
                sources.push(Err(new[b]));
                b += 1;
            }
        }
        let mut weight = Vec::with_capacity(self.n * merged.len());
        for source in sources {
            match source {
                Ok(c) => weight.extend_from_slice(&self.weight[c * self.n..(c + 1) * self.n]),
                Err(j) => weight.extend((0..self.n).map(|row| column(row, j))),
            }
        }
        self.member.insert(&new);
        self.channels = merged;
        self.weight = weight;
        new.len()
    }
}

/// How the outlier set of a layer has evolved (the locality claim: new outliers are rare).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierStats {
    pub channels_at_calibration: usize,
    pub channels_now: usize,
    /// Forward calls so far.
    pub calls: u64,
    /// Calls that added at least one channel to the set.
    pub calls_with_new_outliers: u64,
    /// Calls that saw outliers the full set could not take (quantized with the rest).
    pub calls_over_cap: u64,
}

pub struct MixQLinear {
    weight: IntWeight,
    bias: Option<Vec<f32>>,
    outliers: RwLock<OutlierSet>,
    /// |x| above this (`T · median` of calibration) marks an outlier at run time.
    abs_threshold: f32,
    max_outliers: usize,
    channels_at_calibration: usize,
    calls: AtomicU64,
    calls_with_new_outliers: AtomicU64,
    calls_over_cap: AtomicU64,
    out_features: usize,
    in_features: usize,
}

impl MixQLinear {
    /// Quantizes the layer's weight (8 bits per output channel, or 4 bits per group of `group`)
    /// and keeps the f32 columns of `outliers` (channel indices < k).
    pub fn new(
        layer: &LayerToQuantize,
        group: Option<usize>,
        outliers: &[usize],
        abs_threshold: f32,
        gptq_hessian: Option<&[f64]>,
    ) -> Result<Self, MethodError> {
        let (n, k, w) = (layer.out_features, layer.in_features, layer.weight);
        let invalid = |message: String| MethodError::Invalid { name: "mixq".into(), message };
        if w.len() != n * k {
            return Err(invalid(format!("weight has {} values, not {n}x{k}", w.len())));
        }
        if let Some(b) = layer.bias.filter(|b| b.len() != n) {
            return Err(invalid(format!("bias has {} values for {n} outputs", b.len())));
        }
        if let Some(&j) = outliers.iter().find(|&&j| j >= k) {
            return Err(invalid(format!("outlier channel {j} is not below {k}")));
        }
        if !(abs_threshold.is_finite() && abs_threshold > 0.0) {
            return Err(invalid(format!("outlier threshold {abs_threshold} must be positive")));
        }
        let (weight, set) = match gptq_hessian {
            None => (IntWeight::quantize(w, n, k, group)?, OutlierSet::new(outliers, w, n, k)),
            Some(h) => {
                let mut outliers = outliers.to_vec();
                outliers.sort_unstable();
                outliers.dedup();
                let spec = IntWeight::spec(k, group)?;
                let result =
                    gptq(w, n, k, h, &spec, GptqOptions::default(), &outliers).map_err(|e| invalid(e.to_string()))?;
                let set = OutlierSet::from_columns(&outliers, result.float_columns, n, k);
                (IntWeight::from_quantized(&result.quantized), set)
            }
        };
        Ok(Self::from_parts(weight, set, abs_threshold, layer.bias.map(<[f32]>::to_vec), n, k))
    }

    fn from_parts(
        weight: IntWeight,
        set: OutlierSet,
        abs_threshold: f32,
        bias: Option<Vec<f32>>,
        n: usize,
        k: usize,
    ) -> Self {
        let channels_at_calibration = set.len();
        let max_outliers = channels_at_calibration.max((MAX_RUNTIME_FRACTION * k as f64).ceil() as usize);
        Self {
            weight,
            bias,
            outliers: RwLock::new(set),
            abs_threshold,
            max_outliers,
            channels_at_calibration,
            calls: AtomicU64::new(0),
            calls_with_new_outliers: AtomicU64::new(0),
            calls_over_cap: AtomicU64::new(0),
            out_features: n,
            in_features: k,
        }
    }

    /// `qweight`, `scales`, the outlier set (`outlier_channels`, increasing, and their f32
    /// columns `outlier_weight` `[n, len]`), `outlier_threshold` and `bias`.
    pub fn save(&self) -> LayerArrays {
        let (n, set) = (self.out_features, self.read_set());
        let mut arrays = LayerArrays::new();
        self.weight.save(&mut arrays);
        arrays.put_i32("outlier_channels", vec![set.len()], set.channels.iter().map(|&j| j as i32).collect());
        arrays.put_f32("outlier_weight", vec![n, set.len()], set.weight());
        arrays.put_f32("outlier_threshold", vec![1], vec![self.abs_threshold]);
        if let Some(bias) = &self.bias {
            arrays.put_f32("bias", vec![n], bias.clone());
        }
        arrays
    }

    /// The layer `save` wrote (4-bit weights in groups of `group`, or 8-bit with `None`).
    pub fn load(mut arrays: LayerArrays, n: usize, k: usize, group: Option<usize>) -> Result<Self, MethodError> {
        let invalid = |name: &str, message: String| ArrayError::Invalid { name: name.into(), message };
        let weight = IntWeight::load(&mut arrays, n, k, group)?;
        let count = arrays.vector_len("outlier_channels")?;
        let channels = arrays.take_i32("outlier_channels", &[count])?;
        if let Some(&j) = channels.iter().find(|&&j| j < 0 || j as usize >= k) {
            return Err(invalid("outlier_channels", format!("channel {j} is outside 0..{k}")).into());
        }
        if channels.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid("outlier_channels", "channels are not strictly increasing".into()).into());
        }
        let columns = arrays.take_f32("outlier_weight", &[n, count])?;
        let threshold = arrays.take_f32("outlier_threshold", &[1])?[0];
        if !(threshold.is_finite() && threshold > 0.0) {
            return Err(invalid("outlier_threshold", format!("{threshold} must be positive")).into());
        }
        let bias = arrays.take_f32_opt("bias", &[n])?;
        arrays.finish()?;
        let channels: Vec<usize> = channels.iter().map(|&j| j as usize).collect();
        let set = OutlierSet::from_columns(&channels, columns, n, k);
        Ok(Self::from_parts(weight, set, threshold, bias, n, k))
    }

    /// The integer weight `[n, k]` of every column: the outlier channels' int8 activations are 0,
    /// so their integer columns add nothing.
    pub fn int_weight(&self) -> &IntWeight {
        &self.weight
    }

    /// A copy of the current outlier set.
    pub fn outlier_set(&self) -> OutlierSet {
        self.read_set().clone()
    }

    /// The absolute run-time threshold on |x| (`T · median` of the calibration abs max).
    pub fn abs_threshold(&self) -> f32 {
        self.abs_threshold
    }

    pub fn outlier_stats(&self) -> OutlierStats {
        OutlierStats {
            channels_at_calibration: self.channels_at_calibration,
            channels_now: self.read_set().len(),
            calls: self.calls.load(Ordering::Relaxed),
            calls_with_new_outliers: self.calls_with_new_outliers.load(Ordering::Relaxed),
            calls_over_cap: self.calls_over_cap.load(Ordering::Relaxed),
        }
    }

    fn read_set(&self) -> RwLockReadGuard<'_, OutlierSet> {
        // The set is only written by `insert`, which leaves it whole even if a panic poisons the lock.
        self.outliers.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The scan of x that `forward` needs: amax outside the current set, and new outliers. A set
    /// that grows between the scan and `forward_with_scan` only makes the amax conservative.
    fn scan_request(&self) -> ScanRequest {
        ScanRequest::new(self.read_set().member.clone(), self.abs_threshold)
    }

    /// `forward` from a `scan` of x for `scan_request`: adds its new outliers to the set, then
    /// runs the f32 product of the set's columns and adds the integer product of the rest onto it.
    fn forward_with_scan(&self, x: &[f32], m: usize, scan: &ActivationScan, out: &mut [f32]) {
        let (n, k) = (self.out_features, self.in_features);
        assert_eq!(x.len(), m * k, "MixQLinear: x is not [m={m}, k={k}]");
        assert_eq!(out.len(), m * n, "MixQLinear: out is not [m={m}, n={n}]");
        assert_eq!(scan.amax.len(), m, "MixQLinear: the scan's amax is not [m={m}]");
        self.calls.fetch_add(1, Ordering::Relaxed);
        if m == 0 {
            return;
        }
        // Readers share the lock; only a call that meets a new outlier takes it for writing.
        let fresh = {
            let set = self.read_set();
            scan.outliers.iter().any(|&j| !set.contains(j))
        };
        if fresh {
            self.add_outliers(&scan.outliers);
        }
        let set = self.read_set();
        let dropped = scan.outliers.iter().any(|&j| !set.contains(j));
        let recomputed;
        let amax = if dropped {
            // The set is full: channels it could not take are quantized with the rest, so the
            // amax must cover them (rare; a second pass).
            self.calls_over_cap.fetch_add(1, Ordering::Relaxed);
            recomputed = scan_activations(x, m, &ScanRequest::new(set.member.clone(), f32::INFINITY)).amax;
            &recomputed
        } else {
            &scan.amax
        };
        // f32 product of the outlier columns (0 for none), then the integer product added in its
        // epilogue.
        matmul_small_k(&set.gather(x, m), &set.weight, out, m, n, set.len());
        let (mut x_q, mut x_scales) = (vec![0i8; m * k], vec![0.0f32; m]);
        quantize_rows_i8_outside(x, m, k, amax, &set.member, &mut x_q, &mut x_scales);
        self.weight.gemm(&x_q, &x_scales, self.bias.as_deref(), out, m, true);
    }

    /// Adds `channels` (those not yet in, up to the cap) with columns of the dequantized weight.
    fn add_outliers(&self, channels: &[usize]) {
        let k = self.in_features;
        let mut set = self.outliers.write().unwrap_or_else(|e| e.into_inner());
        let mut new: Vec<usize> = channels.iter().copied().filter(|&j| !set.contains(j)).collect();
        let room = self.max_outliers.saturating_sub(set.len());
        if new.is_empty() || room == 0 {
            return;
        }
        // Past the cap, the channels of this call's largest |x| are unknown here; keep the first.
        new.truncate(room);
        let w = self.weight.dequantize(k);
        if set.insert(&new, |row, j| w[row * k + j]) > 0 {
            self.calls_with_new_outliers.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Linear for MixQLinear {
    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.in_features, "MixQLinear: x is not [m={m}, k={}]", self.in_features);
        let scan = scan_activations(x, m, &self.scan_request());
        self.forward_with_scan(x, m, &scan, out);
    }

    fn input_scan(&self) -> Option<ScanRequest> {
        Some(self.scan_request())
    }

    fn forward_scanned(&self, x: &[f32], m: usize, scan: &ActivationScan, out: &mut [f32]) {
        self.forward_with_scan(x, m, scan, out);
    }

    fn weight_bytes(&self) -> usize {
        let set = self.read_set();
        self.weight.bytes()
            + 4 * set.weight.len()
            + std::mem::size_of::<usize>() * set.len()
            + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }

    fn weight_row(&self, row: usize, out: &mut [f32]) {
        let k = self.in_features;
        out.copy_from_slice(&self.dense_weight()[row * k..(row + 1) * k]);
    }

    /// The weight the layer computes with: the set's f32 columns, dequantized integers elsewhere.
    fn dense_weight(&self) -> Vec<f32> {
        let k = self.in_features;
        let mut w = self.weight.dequantize(k);
        let set = self.read_set();
        for (&j, column) in set.channels.iter().zip(set.weight.chunks_exact(set.n.max(1))) {
            for (row, &v) in w.chunks_exact_mut(k.max(1)).zip(column) {
                row[j] = v;
            }
        }
        w
    }

    fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
