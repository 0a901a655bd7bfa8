//! Element-wise and row-wise kernels of a transformer block.

use std::sync::Arc;

/// `Σ a[i]·b[i]`, in 16 independent lanes so the compiler vectorizes it without reassociating.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let (a_body, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_body, b_tail) = b.split_at(a_body.len());
    for (ca, cb) in a_body.chunks_exact(LANES).zip(b_body.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// Dot product of two equal-length vectors; uses AVX2 when the CPU has it (checked at run time,
/// so one binary serves every x86-64 machine).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

/// RMSNorm over each row of `x` (`[rows, weight.len()]`), in place: `x / rms(x) · weight`.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    assert_eq!(x.len() % dim, 0, "rms_norm: rows are not of length {dim}");
    for row in x.chunks_exact_mut(dim) {
        let inv_rms = inv_rms(row, eps);
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inv_rms * w;
        }
    }
}

/// `1 / rms(row)`, the sum of squares in order (a reordered sum would change the model's output).
#[inline(always)]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (mean_square + eps).sqrt()
}

/// The SwiGLU gate, in place: `gate = silu(gate) · up`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths differ");
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

#[inline(always)]
fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// A set of input channels, held as the mask that the scan kernels read: 0 for a member, all
/// ones otherwise, so `bits(x) & mask` is x outside the set and +0 on it. Clones share the mask
/// (a layer hands it out with each `ScanRequest`); `insert` copies it only while it is shared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelSet {
    mask: Arc<[u32]>,
}

impl ChannelSet {
    /// The set of `members` (each below `channels`).
    pub fn new(channels: usize, members: &[usize]) -> Self {
        let mut set = Self { mask: vec![!0; channels].into() };
        set.insert(members);
        set
    }

    /// Channels in all, members or not.
    pub fn channels(&self) -> usize {
        self.mask.len()
    }

    /// Whether channel j is a member (false past the last channel).
    pub fn contains(&self, j: usize) -> bool {
        self.mask.get(j) == Some(&0)
    }

    /// Adds `members` (each below `channels`).
    pub fn insert(&mut self, members: &[usize]) {
        if members.is_empty() {
            return;
        }
        let mask = Arc::make_mut(&mut self.mask);
        for &j in members {
            mask[j] = 0;
        }
    }

    /// Per channel, 0 for a member and all ones otherwise.
    pub(crate) fn mask(&self) -> &[u32] {
        &self.mask
    }
}

/// What a linear layer asks of its input x (`Linear::input_scan`), to be computed by the op
/// that writes x in the same pass: per token, the largest |x| outside the set `skip` that does
/// not exceed `threshold`, and the channels outside `skip` where some |x| exceeds it (MixQ: its
/// outlier channels and the run-time outlier threshold).
#[derive(Clone, Debug, PartialEq)]
pub struct ScanRequest {
    skip: ChannelSet,
    threshold: f32,
}

impl ScanRequest {
    /// `threshold` must be positive; +∞ asks for the plain amax outside `skip`.
    pub fn new(skip: ChannelSet, threshold: f32) -> Self {
        assert!(threshold > 0.0, "ScanRequest: threshold {threshold} is not positive");
        Self { skip, threshold }
    }

    pub fn skip(&self) -> &ChannelSet {
        &self.skip
    }

    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// The row length of the activation: `skip`'s channel count.
    pub fn channels(&self) -> usize {
        self.skip.channels()
    }
}

/// The result of a `ScanRequest` on x (`[m, k]`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActivationScan {
    /// `[m]`: per token, the largest |x_j| ≤ threshold over channels j outside the set (NaNs
    /// ignored; 0 for a row with none).
    pub amax: Vec<f32>,
    /// Channels outside the set where some |x| exceeds the threshold: sorted, no duplicates.
    pub outliers: Vec<usize>,
}

/// Clears the sign bit: `bits & ABS` is the bits of |x|. Bits of non-negative floats order as
/// the floats do, with NaNs above +∞, so the kernels take their maxima on integers.
const ABS: u32 = 0x7fff_ffff;

/// Builds an `ActivationScan` row by row from each row's largest `bits(|x|) & mask`, which the
/// kernels compute vectorized: only a row where that exceeds the threshold (rare: a new
/// outlier, or a NaN) is read again to find the channels and the amax below the threshold.
struct ScanBuilder<'a> {
    request: &'a ScanRequest,
    amax: Vec<f32>,
    /// Per channel, whether some |x| exceeded the threshold; empty until one did.
    over: Vec<bool>,
}

impl<'a> ScanBuilder<'a> {
    fn new(request: &'a ScanRequest, rows: usize) -> Self {
        Self { request, amax: Vec::with_capacity(rows), over: Vec::new() }
    }

    fn push(&mut self, row: &[f32], masked_amax: u32) {
        let threshold = self.request.threshold;
        if masked_amax <= threshold.to_bits() {
            self.amax.push(f32::from_bits(masked_amax));
            return;
        }
        if self.over.is_empty() {
            self.over = vec![false; row.len()];
        }
        let mut amax = 0.0f32;
        for ((v, m), over) in row.iter().zip(self.request.skip.mask()).zip(&mut self.over) {
            let v = f32::from_bits(v.to_bits() & m & ABS);
            if v > threshold {
                *over = true;
            } else {
                amax = amax.max(v);
            }
        }
        self.amax.push(amax);
    }

    fn finish(self) -> ActivationScan {
        let outliers = self.over.iter().enumerate().filter_map(|(j, &o)| o.then_some(j)).collect();
        ActivationScan { amax: self.amax, outliers }
    }
}

#[inline(always)]
fn masked_amax_portable(row: &[f32], mask: &[u32]) -> u32 {
    row.iter().zip(mask).fold(0, |a, (v, m)| a.max(v.to_bits() & m & ABS))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn masked_amax_avx2(row: &[f32], mask: &[u32]) -> u32 {
    masked_amax_portable(row, mask)
}

/// The largest `bits(|x|) & mask` of a row.
fn masked_amax(row: &[f32], mask: &[u32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { masked_amax_avx2(row, mask) };
    }
    masked_amax_portable(row, mask)
}

/// `request` on x (`[m, request.channels()]`), for an activation whose producer did not scan it.
pub fn scan_activations(x: &[f32], m: usize, request: &ScanRequest) -> ActivationScan {
    let k = request.channels();
    assert_eq!(x.len(), m * k, "scan_activations: x is not [m={m}, k={k}]");
    let mut scan = ScanBuilder::new(request, m);
    for row in (0..m).map(|r| &x[r * k..(r + 1) * k]) {
        scan.push(row, masked_amax(row, request.skip.mask()));
    }
    scan.finish()
}

#[inline(always)]
fn rms_norm_row_scanned_portable(row: &mut [f32], weight: &[f32], eps: f32, mask: &[u32]) -> u32 {
    let inv_rms = inv_rms(row, eps);
    let mut amax = 0;
    for ((v, w), m) in row.iter_mut().zip(weight).zip(mask) {
        *v = *v * inv_rms * w;
        amax = amax.max(v.to_bits() & m & ABS);
    }
    amax
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rms_norm_row_scanned_avx2(row: &mut [f32], weight: &[f32], eps: f32, mask: &[u32]) -> u32 {
    rms_norm_row_scanned_portable(row, weight, eps, mask)
}

/// RMSNorm of one row in place, returning the largest `bits(|x|) & mask` of its output.
fn rms_norm_row_scanned(row: &mut [f32], weight: &[f32], eps: f32, mask: &[u32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { rms_norm_row_scanned_avx2(row, weight, eps, mask) };
    }
    rms_norm_row_scanned_portable(row, weight, eps, mask)
}

/// `rms_norm` that also computes `scan_activations(x, rows, request)` of its output, in the
/// loop that writes it.
pub fn rms_norm_scanned(x: &mut [f32], weight: &[f32], eps: f32, request: &ScanRequest) -> ActivationScan {
    let dim = weight.len();
    assert_eq!(x.len() % dim, 0, "rms_norm_scanned: rows are not of length {dim}");
    assert_eq!(request.channels(), dim, "rms_norm_scanned: the request is for rows of {}", request.channels());
    let mut scan = ScanBuilder::new(request, x.len() / dim);
    for row in x.chunks_exact_mut(dim) {
        let masked_amax = rms_norm_row_scanned(row, weight, eps, request.skip.mask());
        scan.push(row, masked_amax);
    }
    scan.finish()
}

/// `silu_mul` that also computes `scan_activations` of its output (rows of
/// `request.channels()`), in the loop that writes it. The loop calls `exp` per element, so the
/// scan's mask and max add little to it.
pub fn silu_mul_scanned(gate: &mut [f32], up: &[f32], request: &ScanRequest) -> ActivationScan {
    let cols = request.channels();
    assert_eq!(gate.len(), up.len(), "silu_mul_scanned: lengths differ");
    assert_eq!(gate.len() % cols, 0, "silu_mul_scanned: rows are not of length {cols}");
    let mask = request.skip.mask();
    let mut scan = ScanBuilder::new(request, gate.len() / cols);
    for (gate, up) in gate.chunks_exact_mut(cols).zip(up.chunks_exact(cols)) {
        let mut amax = 0;
        for ((g, u), m) in gate.iter_mut().zip(up).zip(mask) {
            *g = silu(*g) * u;
            amax = amax.max(g.to_bits() & m & ABS);
        }
        scan.push(gate, amax);
    }
    scan.finish()
}

/// `x += y` (the residual connection).
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "add_inplace: lengths differ");
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Adds `bias` to every row of `out` (`[rows, bias.len()]`).
pub fn add_bias(out: &mut [f32], bias: &[f32]) {
    for row in out.chunks_exact_mut(bias.len()) {
        add_inplace(row, bias);
    }
}

/// Numerically stable softmax of one row, in place.
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Which pairs of a head's dimensions RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// `(2i, 2i+1)`: the original RoPE, and the layout llama.cpp's converter gives LLaMA Q/K weights.
    Interleaved,
    /// `(i, i + d/2)`: Hugging Face's "rotate half" (GPT-NeoX), and Qwen2 in GGUF.
    Neox,
}

/// Rotary position embedding for one head size: inverse frequencies, optionally divided by
/// per-frequency factors (LLaMA-3's long-context scaling).
#[derive(Clone, Debug)]
pub struct Rope {
    pub style: RopeStyle,
    pub head_dim: usize,
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(style: RopeStyle, head_dim: usize, theta: f32, freq_factors: Option<&[f32]>) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                // As Hugging Face computes it (in f32), so angles agree to the last bit.
                let base = 1.0 / theta.powf((2 * i) as f32 / head_dim as f32);
                base / freq_factors.map_or(1.0, |f| f[i])
            })
            .collect();
        Self { style, head_dim, inv_freq }
    }

    /// The `head_dim / 2` inverse frequencies (angle of pair i at position p = p · inv_freq[i]), for
    /// devices that compute the angles themselves.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// cos and sin of every angle for the given positions: `[positions.len(), head_dim / 2]` each.
    pub fn tables(&self, positions: std::ops::Range<usize>) -> (Vec<f32>, Vec<f32>) {
        let mut cos = Vec::with_capacity(positions.len() * self.inv_freq.len());
        let mut sin = Vec::with_capacity(cos.capacity());
        for p in positions {
            for f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        (cos, sin)
    }

    /// Rotates each head of each row of `x` (`[rows, n_heads · head_dim]`); row r uses row r of
    /// the tables.
    pub fn apply(&self, x: &mut [f32], n_heads: usize, cos: &[f32], sin: &[f32]) {
        let d = self.head_dim;
        let half = d / 2;
        for (r, row) in x.chunks_exact_mut(n_heads * d).enumerate() {
            let (cos, sin) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
            for head in row.chunks_exact_mut(d) {
                for i in 0..half {
                    let (a, b) = match self.style {
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        RopeStyle::Neox => (i, i + half),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[i] - x1 * sin[i];
                    head[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::XorShift;

    #[test]
    fn dot_matches_sum_on_all_lengths() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let expected: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - expected).abs() < 1e-5, "n = {n}");
        }
    }

    #[test]
    fn rms_norm_gives_unit_rms() {
        let mut x = vec![3.0, -4.0, 12.0, 0.5, 1.0, 2.0];
        rms_norm(&mut x, &[1.0, 1.0, 1.0], 0.0);
        for row in x.chunks(3) {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 3.0).sqrt();
            assert!((rms - 1.0).abs() < 1e-6);
        }
    }

    /// The scan as the plain loop that the vectorized kernels must reproduce exactly.
    fn scan_reference(x: &[f32], m: usize, skip: &ChannelSet, threshold: f32) -> ActivationScan {
        let k = skip.channels();
        let mut amax = vec![0.0f32; m];
        let mut over = vec![false; k];
        for (r, a) in amax.iter_mut().enumerate() {
            for (j, o) in over.iter_mut().enumerate().filter(|(j, _)| !skip.contains(*j)) {
                let v = x[r * k + j].abs();
                if v > threshold {
                    *o = true;
                } else {
                    *a = a.max(v);
                }
            }
        }
        ActivationScan { amax, outliers: (0..k).filter(|&j| over[j]).collect() }
    }

    /// `[m, k]` values in [-1, 1), times 8 on every fifth channel of even rows, and the set of
    /// every seventh channel: some large values are members, most are not, odd rows have none.
    fn spiky(rng: &mut XorShift, m: usize, k: usize) -> (Vec<f32>, ChannelSet) {
        let mut x = rng.floats(m * k);
        for (_, v) in x.iter_mut().enumerate().filter(|(i, _)| i % k % 5 == 2 && (i / k).is_multiple_of(2)) {
            *v *= 8.0;
        }
        let members: Vec<usize> = (0..k).filter(|j| j % 7 == 3).collect();
        (x, ChannelSet::new(k, &members))
    }

    const SHAPES: [(usize, usize); 6] = [(1, 1), (3, 7), (2, 33), (5, 100), (4, 577), (1, 1536)];

    #[test]
    fn scan_matches_the_plain_loop() {
        let mut rng = XorShift::new(3);
        let mut crossings = 0;
        for (m, k) in SHAPES {
            for threshold in [2.0, 0.5, f32::INFINITY] {
                let (mut x, skip) = spiky(&mut rng, m, k);
                let request = ScanRequest::new(skip.clone(), threshold);
                let scan = scan_activations(&x, m, &request);
                assert_eq!(scan, scan_reference(&x, m, &skip, threshold), "m={m} k={k} t={threshold}");
                crossings += scan.outliers.len();
                // NaN is ignored; ±∞ exceeds any finite threshold.
                x[0] = f32::NAN;
                x[m * k - 1] = f32::NEG_INFINITY;
                let scan = scan_activations(&x, m, &request);
                assert_eq!(scan, scan_reference(&x, m, &skip, threshold), "m={m} k={k} t={threshold}, NaN, ∞");
            }
        }
        assert!(crossings > 0, "the data must cross the threshold");
        let none = ScanRequest::new(ChannelSet::new(4, &[]), 1.0);
        assert_eq!(scan_activations(&[], 0, &none), ActivationScan::default());
    }

    #[test]
    fn fused_producers_equal_the_plain_ops_then_a_scan() {
        let mut rng = XorShift::new(4);
        let mut crossings = 0;
        for (m, k) in SHAPES {
            for threshold in [2.0, 0.7] {
                let (x, skip) = spiky(&mut rng, m, k);
                let request = ScanRequest::new(skip, threshold);
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();

                let weight: Vec<f32> = rng.floats(k).iter().map(|w| 1.0 + w).collect();
                let (mut plain, mut fused) = (x.clone(), x.clone());
                rms_norm(&mut plain, &weight, 1e-5);
                let scan = rms_norm_scanned(&mut fused, &weight, 1e-5, &request);
                assert_eq!(bits(&fused), bits(&plain), "rms_norm m={m} k={k}");
                assert_eq!(scan, scan_activations(&plain, m, &request), "rms_norm m={m} k={k} t={threshold}");
                crossings += scan.outliers.len();

                let up: Vec<f32> = rng.floats(m * k).iter().map(|u| 2.0 * u).collect();
                let (mut plain, mut fused) = (x.clone(), x);
                silu_mul(&mut plain, &up);
                let scan = silu_mul_scanned(&mut fused, &up, &request);
                assert_eq!(bits(&fused), bits(&plain), "silu_mul m={m} k={k}");
                assert_eq!(scan, scan_activations(&plain, m, &request), "silu_mul m={m} k={k} t={threshold}");
                crossings += scan.outliers.len();
            }
        }
        assert!(crossings > 0, "the outputs must cross the threshold");
    }

    #[test]
    fn channel_sets_copy_a_shared_mask_on_insert() {
        let mut set = ChannelSet::new(6, &[4, 1]);
        let shared = set.clone();
        set.insert(&[2]);
        assert_eq!((0..7).filter(|&j| set.contains(j)).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!((0..7).filter(|&j| shared.contains(j)).collect::<Vec<_>>(), [1, 4]);
        assert_ne!(set, shared);
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_inputs() {
        let mut x = vec![1000.0, 1001.0, 999.0];
        softmax_inplace(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[0] && x[0] > x[2]);
    }

    #[test]
    fn rope_styles_agree_up_to_a_permutation_of_dimensions() {
        // Interleaved RoPE on a permuted head equals Neox RoPE on the original head, permuted:
        // this is exactly the Q/K permutation llama.cpp's converter applies.
        let d = 8;
        let head: Vec<f32> = (0..d).map(|i| i as f32 + 1.0).collect();
        let permute =
            |h: &[f32]| (0..d).map(|j| if j % 2 == 0 { h[j / 2] } else { h[j / 2 + d / 2] }).collect::<Vec<_>>();
        let neox = Rope::new(RopeStyle::Neox, d, 10000.0, None);
        let inter = Rope::new(RopeStyle::Interleaved, d, 10000.0, None);
        let (cos, sin) = neox.tables(5..6);
        let mut a = head.clone();
        neox.apply(&mut a, 1, &cos, &sin);
        let mut b = permute(&head);
        inter.apply(&mut b, 1, &cos, &sin);
        assert_eq!(permute(&a), b);
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_position_zero() {
        let rope = Rope::new(RopeStyle::Interleaved, 4, 10000.0, None);
        let (cos, sin) = rope.tables(0..2);
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        rope.apply(&mut x, 1, &cos, &sin);
        assert_eq!(&x[..4], &[1.0, 2.0, 3.0, 4.0]);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x[4..]) - 30.0).abs() < 1e-4);
    }
}
