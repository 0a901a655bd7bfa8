//! Integer GEMM for quantized linear layers: W8A8 (SmoothQuant) and W4A8 with group-wise weight
//! scales (the low-bit part of MixQ).
//!
//! Activations are quantized per token to symmetric i8 (`x ≈ s_x[m]·x_q[m, :]`), weights per
//! output channel (W8) or per group of k (W4: symmetric, or asymmetric with a zero point
//! `z_w[n, g]`, 0 when symmetric; the last group of a row is shorter when the group size does
//! not divide k). The products are summed exactly in i32 and turned into f32 only in the
//! epilogue, in registers, which writes `out` once:
//!
//! - W8A8: `out[m, n] = (Σ_k x_q·w_q) as f32 · s_w[n] · s_x[m] (+ bias[n]) (+ out[m, n])`
//! - W4A8: `out[m, n] = (Σ_g (Σ_{k∈g} x_q·(w_q − z_w)) as f32 · s_w[n, g]) · s_x[m] (+ bias[n])
//!   (+ out[m, n])`
//!
//! in exactly this order of f32 operations, which the references follow too.
//!
//! Weights are packed once into 64-byte lines of 16 output channels × 4 consecutive k, the
//! operand of one AVX-512 VNNI `vpdpbusd`. Each kernel keeps an `MR × 16·NB` tile of sums in
//! registers over all of k, broadcasting 4 bytes of a row of x against each line.
//!
//! `vpdpbusd` (and AVX2's `vpmaddubsw`) multiply unsigned by signed bytes. W8A8 feeds x + 128 as
//! the unsigned side and subtracts 128·Σ_k w (precomputed per channel); W4A8 stores w + 8 in
//! [0, 15], unsigned, and subtracts (z_w + 8)·Σ_{k∈g} x per token, group (and channel, with
//! zero points).

use std::ops::Range;

use rayon::prelude::*;

use super::ChannelSet;

/// Output channels per packed block: one 64-byte line holds 4 k of each.
const BLOCK: usize = 16;

/// Below this many multiply-adds a product runs on one thread: splitting costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// Tasks per thread: enough that work stealing evens out unequal tiles.
const TASKS_PER_THREAD: usize = 8;

/// Largest |k| whose i32 sums cannot overflow (127·128·k < 2³¹); intermediate sums of the
/// offset trick may wrap, which the final subtraction undoes.
const MAX_K: usize = 1 << 17;

/// 64 bytes on a cache-line boundary, so a line never straddles two cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Which implementation runs the integer kernels. `detect` picks the best the CPU has; tests run
/// every supported one against the references.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntKernel {
    /// AVX-512 VNNI `vpdpbusd` (u8 × i8 → i32, 64 products per instruction).
    Avx512Vnni,
    /// AVX2 `vpmaddubsw` + `vpmaddwd` (u8 × i8 → i16 pairs → i32).
    Avx2,
    /// Plain Rust, for any CPU.
    Portable,
}

impl IntKernel {
    pub const ALL: [IntKernel; 3] = [IntKernel::Avx512Vnni, IntKernel::Avx2, IntKernel::Portable];

    /// Whether this CPU can run the kernel (checked at run time).
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            IntKernel::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            IntKernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            IntKernel::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The fastest kernel this CPU supports.
    pub fn detect() -> Self {
        Self::ALL.into_iter().find(|k| k.is_supported()).unwrap_or(IntKernel::Portable)
    }

    /// Rows × 16-channel blocks of the W8A8 register tile. VNNI: 24 accumulators + 4 weight
    /// lines + 1 broadcast of the 32 zmm registers; AVX2: 8 of its 16 ymm.
    fn tile_w8(self) -> (usize, usize) {
        match self {
            IntKernel::Avx512Vnni => (6, 4),
            IntKernel::Avx2 => (4, 1),
            IntKernel::Portable => (1, 1),
        }
    }

    /// The W4A8 tile: fewer rows than W8A8, as each block needs two unpacked nibble planes and
    /// f32 group sums beside the i32 ones.
    fn tile_w4(self) -> (usize, usize) {
        match self {
            IntKernel::Avx512Vnni => (4, 4),
            IntKernel::Avx2 => (4, 1),
            IntKernel::Portable => (1, 1),
        }
    }
}

/// An int8 weight `[n, k]` with per-output-channel scales, packed for the kernels.
#[derive(Clone)]
pub struct I8Weight {
    n: usize,
    k: usize,
    /// Lines per block: ⌈k/4⌉.
    k4: usize,
    /// `[⌈n/16⌉ blocks][k4][16 channels][4 k]`, zero-padded in n and k.
    packed: Vec<Line>,
    /// `[⌈n/16⌉·16]`, zero-padded.
    scales: Vec<f32>,
    /// `128·Σ_k w_q[n, k]`: what feeding `x_q + 128` as u8 to `vpdpbusd` adds to each sum.
    offset: Vec<i32>,
}

impl I8Weight {
    /// `q` is row-major `[n, k]` in [-127, 127] (symmetric quantization: −128 would overflow the
    /// AVX2 kernel's sign trick), `scales` is `[n]`.
    pub fn new(q: &[i8], scales: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(q.len(), n * k, "I8Weight: q is not [n={n}, k={k}]");
        assert_eq!(scales.len(), n, "I8Weight: scales are not [n={n}]");
        assert!(k <= MAX_K, "I8Weight: k={k} is over {MAX_K}");
        assert!(q.iter().all(|&v| v != i8::MIN), "I8Weight: values must be in [-127, 127]");
        let (blocks, k4) = (n.div_ceil(BLOCK), k.div_ceil(4));
        let mut packed = vec![Line([0; 64]); blocks * k4];
        let mut offset = vec![0i32; blocks * BLOCK];
        for (row, values) in q.chunks_exact(k.max(1)).take(n).enumerate() {
            let (block, c) = (row / BLOCK, row % BLOCK);
            for (kk, &v) in values.iter().enumerate() {
                packed[block * k4 + kk / 4].0[c * 4 + kk % 4] = v as u8;
            }
            offset[row] = 128 * values.iter().map(|&v| v as i32).sum::<i32>();
        }
        let mut padded = scales.to_vec();
        padded.resize(blocks * BLOCK, 0.0);
        Self { n, k, k4, packed, scales: padded, offset }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held: packed values, scales and offsets.
    pub fn bytes(&self) -> usize {
        self.packed.len() * 64 + self.scales.len() * 4 + self.offset.len() * 4
    }

    /// The values, row-major `[n, k]` (to serialize).
    pub fn values(&self) -> Vec<i8> {
        let mut q = vec![0i8; self.n * self.k];
        for (row, values) in q.chunks_exact_mut(self.k.max(1)).take(self.n).enumerate() {
            for (kk, v) in values.iter_mut().enumerate() {
                *v = self.packed[row / BLOCK * self.k4 + kk / 4].0[row % BLOCK * 4 + kk % 4] as i8;
            }
        }
        q
    }

    /// Per-output-channel scales `[n]`.
    pub fn scales(&self) -> &[f32] {
        &self.scales[..self.n]
    }
}

/// An int4 weight `[n, k]` with one scale (and, when asymmetric, one zero point) per group of
/// `group` consecutive k of a channel, the last group shorter when `group` does not divide k;
/// packed two values per byte for the kernels.
#[derive(Clone)]
pub struct I4Weight {
    n: usize,
    k: usize,
    group: usize,
    /// Groups per channel: ⌈k/group⌉.
    groups: usize,
    /// `[⌈n/16⌉ blocks][k/8][64 bytes]`: byte `4c + j` of line `u` holds channel c's
    /// `w_q + 8` at k = 8u + j in its low nibble and at k = 8u + 4 + j in its high nibble, so the
    /// two nibble planes are two VNNI lines. Zero-padded channels hold 0 (they are never stored).
    packed: Vec<Line>,
    /// `[⌈n/16⌉ blocks][groups][16 channels]`: one vector load per block and group.
    scales: Vec<f32>,
    /// Zero points plus 8, in [0, 15], laid out as `scales` (asymmetric weights only).
    zeros: Option<Vec<u8>>,
}

impl I4Weight {
    /// `q` is row-major `[n, k]` in [-8, 7], `scales` and `zeros` (asymmetric weights, as the
    /// quantizer stores them: shifted into [-8, 7], `ŵ = s·(q − z)`) are row-major
    /// `[n, ⌈k/group⌉]`; `group` and k are multiples of 8 (32, 64 and 128 are the usual groups).
    pub fn new(q: &[i8], scales: &[f32], zeros: Option<&[i8]>, n: usize, k: usize, group: usize) -> Self {
        assert!(group > 0 && group.is_multiple_of(8), "I4Weight: group={group} is not a multiple of 8");
        assert!(k.is_multiple_of(8), "I4Weight: k={k} is not a multiple of 8");
        assert_eq!(q.len(), n * k, "I4Weight: q is not [n={n}, k={k}]");
        let groups = k.div_ceil(group);
        assert_eq!(scales.len(), n * groups, "I4Weight: scales are not [n={n}, {groups}]");
        assert!(k <= MAX_K, "I4Weight: k={k} is over {MAX_K}");
        assert!(q.iter().all(|v| (-8..=7).contains(v)), "I4Weight: values must be in [-8, 7]");
        if let Some(z) = zeros {
            assert_eq!(z.len(), n * groups, "I4Weight: zeros are not [n={n}, {groups}]");
            assert!(z.iter().all(|v| (-8..=7).contains(v)), "I4Weight: zeros must be in [-8, 7]");
        }
        let (blocks, k8) = (n.div_ceil(BLOCK), k / 8);
        let mut packed = vec![Line([0; 64]); blocks * k8];
        let mut packed_scales = vec![0.0f32; blocks * groups * BLOCK];
        let mut packed_zeros = zeros.map(|_| vec![0u8; blocks * groups * BLOCK]);
        for row in 0..n {
            let (block, c) = (row / BLOCK, row % BLOCK);
            for kk in 0..k {
                let nibble = (q[row * k + kk] + 8) as u8;
                let byte = &mut packed[block * k8 + kk / 8].0[c * 4 + kk % 4];
                *byte |= if kk % 8 < 4 { nibble } else { nibble << 4 };
            }
            for g in 0..groups {
                packed_scales[(block * groups + g) * BLOCK + c] = scales[row * groups + g];
                if let (Some(packed), Some(zeros)) = (&mut packed_zeros, zeros) {
                    packed[(block * groups + g) * BLOCK + c] = (zeros[row * groups + g] + 8) as u8;
                }
            }
        }
        Self { n, k, group, groups, packed, scales: packed_scales, zeros: packed_zeros }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn group(&self) -> usize {
        self.group
    }

    /// Bytes held: packed values, scales and zero points.
    pub fn bytes(&self) -> usize {
        self.packed.len() * 64 + self.scales.len() * 4 + self.zeros.as_ref().map_or(0, Vec::len)
    }

    /// The values, row-major `[n, k]` in [-8, 7] (to serialize).
    pub fn values(&self) -> Vec<i8> {
        let k8 = self.k / 8;
        let mut q = vec![0i8; self.n * self.k];
        for row in 0..self.n {
            for kk in 0..self.k {
                let byte = self.packed[row / BLOCK * k8 + kk / 8].0[row % BLOCK * 4 + kk % 4];
                let nibble = if kk % 8 < 4 { byte & 15 } else { byte >> 4 };
                q[row * self.k + kk] = nibble as i8 - 8;
            }
        }
        q
    }

    /// Groups per channel: ⌈k/group⌉.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// The scales, row-major `[n, ⌈k/group⌉]` (a copy: they are stored in the kernels' order).
    pub fn scales(&self) -> Vec<f32> {
        self.unpack_groups(&self.scales, |&s| s)
    }

    /// The zero points of asymmetric weights, row-major `[n, ⌈k/group⌉]` in [-8, 7] (a copy);
    /// `None` when symmetric.
    pub fn zeros(&self) -> Option<Vec<i8>> {
        self.zeros.as_ref().map(|z| self.unpack_groups(z, |&z| z as i8 - 8))
    }

    /// `[n, groups]` row-major from the kernels' `[blocks][groups][16]` order.
    fn unpack_groups<T, U>(&self, packed: &[T], f: impl Fn(&T) -> U) -> Vec<U> {
        let mut out = Vec::with_capacity(self.n * self.groups);
        for row in 0..self.n {
            for g in 0..self.groups {
                out.push(f(&packed[(row / BLOCK * self.groups + g) * BLOCK + row % BLOCK]));
            }
        }
        out
    }
}

/// Calls `$f::<MR, NB>(args)` (or `$f::<MR, NB, EXTRA>(args)`) for the run-time `mr` and `nb`,
/// from the lists of those compiled.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_macros))]
macro_rules! tiles {
    ($f:ident, $mr:expr, $nb:expr, $ms:tt, $nbs:tt, $args:tt) => {
        tiles!($f, $mr, $nb, $ms, $nbs, $args, [])
    };
    ($f:ident, $mr:expr, $nb:expr, [$($m:literal)*], $nbs:tt, $args:tt, $extra:tt) => {
        match $mr {
            $($m => tiles!(@nb $f, $m, $nb, $nbs, $args, $extra),)*
            _ => unreachable!(),
        }
    };
    (@nb $f:ident, $m:literal, $nb:expr, [$($n:literal)*], $args:tt, []) => {
        match $nb {
            $($n => $f::<$m, $n> $args,)*
            _ => unreachable!(),
        }
    };
    (@nb $f:ident, $m:literal, $nb:expr, [$($n:literal)*], $args:tt, $extra:tt) => {
        match $nb {
            $($n => $f::<$m, $n, $extra> $args,)*
            _ => unreachable!(),
        }
    };
}

/// Per-token symmetric int8 quantization of activations `x` (`[rows, cols]`):
/// `scales[r] = amax(row r)/127` (1 if the row is all zeros), `q = round(x / scales[r])` (ties to
/// even, computed as `x · (1/scale)`), in [-127, 127].
pub fn quantize_rows_i8(x: &[f32], rows: usize, cols: usize, q: &mut [i8], scales: &mut [f32]) {
    assert_eq!(x.len(), rows * cols, "quantize_rows_i8: x is not [rows={rows}, cols={cols}]");
    assert_eq!(q.len(), rows * cols, "quantize_rows_i8: q is not [rows={rows}, cols={cols}]");
    assert_eq!(scales.len(), rows, "quantize_rows_i8: scales are not [rows={rows}]");
    quantize_rows(x, cols, q, scales, None);
}

/// `quantize_rows_i8` of x with the channels of `skip` set to 0 (MixQ's outlier channels, whose
/// product runs in f32), from each row's amax outside `skip`, which a scan of x has found.
pub fn quantize_rows_i8_outside(
    x: &[f32],
    rows: usize,
    cols: usize,
    amax: &[f32],
    skip: &ChannelSet,
    q: &mut [i8],
    scales: &mut [f32],
) {
    assert_eq!(x.len(), rows * cols, "quantize_rows_i8_outside: x is not [rows={rows}, cols={cols}]");
    assert_eq!(q.len(), rows * cols, "quantize_rows_i8_outside: q is not [rows={rows}, cols={cols}]");
    assert_eq!(scales.len(), rows, "quantize_rows_i8_outside: scales are not [rows={rows}]");
    assert_eq!(amax.len(), rows, "quantize_rows_i8_outside: amax is not [rows={rows}]");
    assert_eq!(skip.channels(), cols, "quantize_rows_i8_outside: the set is not of {cols} channels");
    quantize_rows(x, cols, q, scales, Some((amax, skip.mask())));
}

/// Both of the above: `given` is each row's amax and the mask of the channels kept.
fn quantize_rows(x: &[f32], cols: usize, q: &mut [i8], scales: &mut [f32], given: Option<(&[f32], &[u32])>) {
    if x.is_empty() {
        scales.fill(1.0);
        return;
    }
    let quantize = |r: usize, x: &[f32], q: &mut [i8], s: &mut f32| {
        let given = given.map(|(amax, mask)| (amax[r], mask));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return *s = unsafe { quantize_row_avx512(x, q, given) };
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return *s = unsafe { quantize_row_avx2(x, q, given) };
        }
        *s = quantize_row(x, q, given);
    };
    let rows = scales.len();
    let rows_iter = x.par_chunks(cols).zip(q.par_chunks_mut(cols)).zip(scales.par_iter_mut()).enumerate();
    if rows * cols < PARALLEL_MIN_WORK / 4 {
        rows_iter.with_min_len(rows).for_each(|(r, ((x, q), s))| quantize(r, x, q, s));
    } else {
        rows_iter.for_each(|(r, ((x, q), s))| quantize(r, x, q, s));
    }
}

/// Quantizes a row with the scale of its amax, or of `given`'s amax with the channels outside
/// `given`'s mask read as 0 (`bits(x) & mask`).
#[inline(always)]
fn quantize_row(x: &[f32], q: &mut [i8], given: Option<(f32, &[u32])>) -> f32 {
    let amax = match given {
        Some((amax, _)) => amax,
        None => x.iter().fold(0.0f32, |a, v| a.max(v.abs())),
    };
    let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
    let inv = 1.0 / scale;
    // Adding and subtracting 1.5·2²³ rounds to an integer (ties to even) for |v| < 2²²; unlike
    // `round_ties_even` it vectorizes without SSE4.1.
    const ROUND: f32 = 12_582_912.0;
    let quantize = |v: f32| {
        // `max`/`min` also map NaN into range (unlike `clamp`).
        #[allow(clippy::manual_clamp)]
        let r = (v * inv).max(-127.0).min(127.0) + ROUND - ROUND;
        // SAFETY: r is an integer in [-127, 127]. A checked `as` cast would not vectorize.
        unsafe { r.to_int_unchecked::<i32>() as i8 }
    };
    match given {
        None => q.iter_mut().zip(x).for_each(|(q, v)| *q = quantize(*v)),
        Some((_, mask)) => {
            q.iter_mut().zip(x).zip(mask).for_each(|((q, v), m)| *q = quantize(f32::from_bits(v.to_bits() & m)))
        }
    }
    scale
}

/// The same code with 512-bit vectors, whose narrowing `vpmovdb` packs i32 to i8 in one step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(x: &[f32], q: &mut [i8], given: Option<(f32, &[u32])>) -> f32 {
    quantize_row(x, q, given)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i8], given: Option<(f32, &[u32])>) -> f32 {
    quantize_row(x, q, given)
}

/// `out[m, n] = x_q[m, k] · w_q[n, k]ᵀ` in i32, the plain triple loop.
pub fn gemm_i8_i32_reference(x_q: &[i8], w_q: &[i8], m: usize, n: usize, k: usize) -> Vec<i32> {
    assert_eq!(x_q.len(), m * k);
    assert_eq!(w_q.len(), n * k);
    let mut out = vec![0i32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|l| x_q[i * k + l] as i32 * w_q[j * k + l] as i32).sum();
        }
    }
    out
}

/// What `gemm_w8a8` must compute, from unpacked values: `w_q` is `[n, k]`, `w_scales` `[n]`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_w8a8_reference(
    x_q: &[i8],
    x_scales: &[f32],
    w_q: &[i8],
    w_scales: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    let sums = gemm_i8_i32_reference(x_q, w_q, m, n, k);
    for i in 0..m {
        for j in 0..n {
            let mut v = sums[i * n + j] as f32 * w_scales[j] * x_scales[i];
            if let Some(b) = bias {
                v += b[j];
            }
            if accumulate {
                v += out[i * n + j];
            }
            out[i * n + j] = v;
        }
    }
}

/// What `gemm_w4a8` must compute, from unpacked values: `w_q` is `[n, k]` in [-8, 7],
/// `w_scales` and `w_zeros` (asymmetric weights) `[n, ⌈k/group⌉]`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_w4a8_reference(
    x_q: &[i8],
    x_scales: &[f32],
    w_q: &[i8],
    w_scales: &[f32],
    w_zeros: Option<&[i8]>,
    group: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    let groups = k.div_ceil(group);
    for i in 0..m {
        for j in 0..n {
            let mut v = 0.0f32;
            for g in 0..groups {
                let z = w_zeros.map_or(0, |z| z[j * groups + g] as i32);
                let range = g * group..((g + 1) * group).min(k);
                let sum: i32 = range.map(|l| x_q[i * k + l] as i32 * (w_q[j * k + l] as i32 - z)).sum();
                v += sum as f32 * w_scales[j * groups + g];
            }
            v *= x_scales[i];
            if let Some(b) = bias {
                v += b[j];
            }
            if accumulate {
                v += out[i * n + j];
            }
            out[i * n + j] = v;
        }
    }
}

/// `out[m, n] (=|+=) (x_q · w_qᵀ)[m, n] · s_w[n] · s_x[m] (+ bias[n])`, with the best kernel the
/// CPU has. `x_q` is `[m, k]`, `x_scales` `[m]`, `out` `[m, n]`. `accumulate` adds into `out`
/// (MixQ's fused add: the FP product of the outlier channels already sits there).
pub fn gemm_w8a8(
    x_q: &[i8],
    x_scales: &[f32],
    w: &I8Weight,
    bias: Option<&[f32]>,
    out: &mut [f32],
    m: usize,
    accumulate: bool,
) {
    gemm_w8a8_with(IntKernel::detect(), x_q, x_scales, w, bias, out, m, accumulate);
}

/// `gemm_w8a8` on a chosen kernel; panics if the CPU lacks it.
#[allow(clippy::too_many_arguments)]
pub fn gemm_w8a8_with(
    kernel: IntKernel,
    x_q: &[i8],
    x_scales: &[f32],
    w: &I8Weight,
    bias: Option<&[f32]>,
    out: &mut [f32],
    m: usize,
    accumulate: bool,
) {
    let (n, k) = (w.n, w.k);
    check_args("gemm_w8a8", kernel, x_q, x_scales, bias, out, m, n, k);
    if m == 0 || n == 0 {
        return;
    }
    // Rows of x padded with zeros to whole lines (a copy only where k is not a multiple of 4).
    let stride = w.k4 * 4;
    let x: std::borrow::Cow<[i8]> = if k == stride { x_q.into() } else { pad_rows(x_q, m, k, stride).into() };
    let job = W8Job { x: &x, stride, w, ep: Epilogue::new(x_scales, bias, out, n, accumulate) };
    for_each_tile(m, n.div_ceil(BLOCK), k, kernel.tile_w8(), |r0, mr, b0, nb| match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `check_args` asserted that the CPU has the kernel's features; the tile lies
        // within the shapes asserted there.
        IntKernel::Avx512Vnni => unsafe { tiles!(w8_vnni, mr, nb, [1 2 3 4 5 6], [1 2 3 4], (&job, r0, b0)) },
        #[cfg(target_arch = "x86_64")]
        IntKernel::Avx2 => unsafe { tiles!(w8_avx2, mr, nb, [1 2 3 4], [1], (&job, r0, b0)) },
        _ => w8_portable(&job, r0..r0 + mr, b0..b0 + nb),
    });
}

/// `out[m, n] (=|+=) (Σ_g (x_q · (w_q − z_w)ᵀ)_g[m, n] · s_w[n, g]) · s_x[m] (+ bias[n])`, with the
/// best kernel the CPU has; shapes and `accumulate` as in `gemm_w8a8`.
pub fn gemm_w4a8(
    x_q: &[i8],
    x_scales: &[f32],
    w: &I4Weight,
    bias: Option<&[f32]>,
    out: &mut [f32],
    m: usize,
    accumulate: bool,
) {
    gemm_w4a8_with(IntKernel::detect(), x_q, x_scales, w, bias, out, m, accumulate);
}

/// `gemm_w4a8` on a chosen kernel; panics if the CPU lacks it.
#[allow(clippy::too_many_arguments)]
pub fn gemm_w4a8_with(
    kernel: IntKernel,
    x_q: &[i8],
    x_scales: &[f32],
    w: &I4Weight,
    bias: Option<&[f32]>,
    out: &mut [f32],
    m: usize,
    accumulate: bool,
) {
    let (n, k) = (w.n, w.k);
    check_args("gemm_w4a8", kernel, x_q, x_scales, bias, out, m, n, k);
    if m == 0 || n == 0 {
        return;
    }
    // The SIMD kernels multiply u8 `w_q + 8` by i8 x: each group's sum is then too large by
    // (z_w + 8)·Σ_{k∈g} x_q, subtracted before scaling.
    let x_sums: Vec<i32> = match kernel {
        IntKernel::Portable => Vec::new(),
        _ => x_q
            .chunks_exact(k.max(1))
            .flat_map(|row| row.chunks(w.group).map(|g| g.iter().map(|&v| v as i32).sum::<i32>()))
            .collect(),
    };
    let job = W4Job { x: x_q, x_sums: &x_sums, w, ep: Epilogue::new(x_scales, bias, out, n, accumulate) };
    // Kernels with and without zero points are compiled apart, so the symmetric one stays as lean.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    let zeros = w.zeros.is_some();
    for_each_tile(m, n.div_ceil(BLOCK), k, kernel.tile_w4(), |r0, mr, b0, nb| match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `gemm_w8a8_with`; the kernels' ZEROS says whether the weight has zeros.
        IntKernel::Avx512Vnni if zeros => unsafe {
            tiles!(w4_vnni, mr, nb, [1 2 3 4], [1 2 3 4], (&job, r0, b0), true)
        },
        #[cfg(target_arch = "x86_64")]
        IntKernel::Avx512Vnni => unsafe { tiles!(w4_vnni, mr, nb, [1 2 3 4], [1 2 3 4], (&job, r0, b0), false) },
        #[cfg(target_arch = "x86_64")]
        IntKernel::Avx2 if zeros => unsafe { tiles!(w4_avx2, mr, nb, [1 2 3 4], [1], (&job, r0, b0), true) },
        #[cfg(target_arch = "x86_64")]
        IntKernel::Avx2 => unsafe { tiles!(w4_avx2, mr, nb, [1 2 3 4], [1], (&job, r0, b0), false) },
        _ => w4_portable(&job, r0..r0 + mr, b0..b0 + nb),
    });
}

#[allow(clippy::too_many_arguments)]
fn check_args(
    name: &str,
    kernel: IntKernel,
    x_q: &[i8],
    x_scales: &[f32],
    bias: Option<&[f32]>,
    out: &[f32],
    m: usize,
    n: usize,
    k: usize,
) {
    assert!(kernel.is_supported(), "{name}: this CPU cannot run the {kernel:?} kernel");
    assert_eq!(x_q.len(), m * k, "{name}: x_q is not [m={m}, k={k}]");
    assert_eq!(x_scales.len(), m, "{name}: x_scales are not [m={m}]");
    assert_eq!(out.len(), m * n, "{name}: out is not [m={m}, n={n}]");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "{name}: bias is not [n={n}]");
    }
}

/// Rows of `x` (`[m, k]`), each padded with zeros to `stride`.
fn pad_rows(x: &[i8], m: usize, k: usize, stride: usize) -> Vec<i8> {
    let mut padded = vec![0; m * stride];
    for (dst, src) in padded.chunks_exact_mut(stride).zip(x.chunks_exact(k.max(1))) {
        dst[..k].copy_from_slice(src);
    }
    padded
}

/// Runs `tile(r0, mr, b0, nb)` over every tile of `m` rows × `blocks` 16-channel blocks, each
/// tile at most `mr_max × nb_max`, on rayon's pool when the product is large enough. Every
/// output element is computed by one tile in a fixed order, so results do not depend on the
/// number of threads.
fn for_each_tile(
    m: usize,
    blocks: usize,
    k: usize,
    (mr_max, nb_max): (usize, usize),
    tile: impl Fn(usize, usize, usize, usize) + Sync,
) {
    // Blocks outside, rows inside: a panel of W stays in cache while every row passes over it.
    let run = |rows: Range<usize>, bl: Range<usize>| {
        for b0 in bl.clone().step_by(nb_max) {
            let nb = nb_max.min(bl.end - b0);
            for r0 in rows.clone().step_by(mr_max) {
                tile(r0, mr_max.min(rows.end - r0), b0, nb);
            }
        }
    };
    let threads = rayon::current_num_threads();
    if threads == 1 || m * blocks * BLOCK * k < PARALLEL_MIN_WORK {
        return run(0..m, 0..blocks);
    }
    let target = TASKS_PER_THREAD * threads;
    let m_tiles = m.div_ceil(mr_max);
    // One row tile (decode): split W finely. More rows: whole panels, and rows too if the panels
    // are too few to keep every thread busy.
    let blocks_per_task = if m_tiles == 1 { blocks.div_ceil(target) } else { nb_max };
    let n_tasks = blocks.div_ceil(blocks_per_task);
    let m_tasks = target.div_ceil(n_tasks).min(m_tiles);
    let rows_per_task = m_tiles.div_ceil(m_tasks) * mr_max;
    let m_tasks = m.div_ceil(rows_per_task);
    (0..n_tasks * m_tasks).into_par_iter().for_each(|t| {
        let (bt, mt) = (t / m_tasks, t % m_tasks);
        let bl = bt * blocks_per_task..((bt + 1) * blocks_per_task).min(blocks);
        run(mt * rows_per_task..((mt + 1) * rows_per_task).min(m), bl);
    });
}

/// `out`, written by disjoint tiles from several threads.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tiles write disjoint elements, and the pointer outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// What turns a tile's f32 sums (before the token scale) into outputs.
struct Epilogue<'a> {
    x_scales: &'a [f32],
    bias: Option<&'a [f32]>,
    out: OutPtr,
    n: usize,
    accumulate: bool,
}

impl<'a> Epilogue<'a> {
    fn new(x_scales: &'a [f32], bias: Option<&'a [f32]>, out: &'a mut [f32], n: usize, accumulate: bool) -> Self {
        Self { x_scales, bias, out: OutPtr(out.as_mut_ptr()), n, accumulate }
    }

    /// Writes `v · s_x[row] (+ bias) (+ out)` to `out[row, col]`.
    ///
    /// # Safety
    /// `row < m`, `col < n`, and no other thread writes the element.
    #[inline(always)]
    unsafe fn store(&self, row: usize, col: usize, v: f32) {
        self.finish(row, col, v * self.x_scales[row]);
    }

    /// Writes `y (+ bias) (+ out)` to `out[row, col]`, `y` being already scaled by `s_x[row]`.
    ///
    /// # Safety
    /// As for `store`.
    #[inline(always)]
    unsafe fn finish(&self, row: usize, col: usize, mut y: f32) {
        if let Some(b) = self.bias {
            y += b[col];
        }
        let dst = self.out.0.add(row * self.n + col);
        if self.accumulate {
            y += *dst;
        }
        *dst = y;
    }
}

struct W8Job<'a> {
    /// Rows of `stride` values.
    x: &'a [i8],
    stride: usize,
    w: &'a I8Weight,
    ep: Epilogue<'a>,
}

struct W4Job<'a> {
    x: &'a [i8],
    /// `[m, groups]`: Σ_{k∈g} x_q (SIMD kernels only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    x_sums: &'a [i32],
    w: &'a I4Weight,
    ep: Epilogue<'a>,
}

fn w8_portable(job: &W8Job, rows: Range<usize>, blocks: Range<usize>) {
    let (k4, w) = (job.w.k4, job.w);
    for b in blocks {
        let lines = &w.packed[b * k4..(b + 1) * k4];
        for r in rows.clone() {
            let x = &job.x[r * job.stride..(r + 1) * job.stride];
            let mut acc = [0i32; BLOCK];
            for (line, x) in lines.iter().zip(x.chunks_exact(4)) {
                for (c, acc) in acc.iter_mut().enumerate() {
                    let dot: i32 = (0..4).map(|j| x[j] as i32 * line.0[4 * c + j] as i8 as i32).sum();
                    *acc = acc.wrapping_add(dot);
                }
            }
            for (c, &acc) in acc.iter().enumerate().take(job.ep.n - b * BLOCK) {
                let col = b * BLOCK + c;
                // SAFETY: row and column are in range, and this tile owns them.
                unsafe { job.ep.store(r, col, acc as f32 * w.scales[col]) };
            }
        }
    }
}

fn w4_portable(job: &W4Job, rows: Range<usize>, blocks: Range<usize>) {
    let (w, k) = (job.w, job.w.k);
    let (k8, lines_per_group) = (k / 8, w.group / 8);
    for b in blocks {
        let lines = &w.packed[b * k8..(b + 1) * k8];
        for r in rows.clone() {
            let x = &job.x[r * k..(r + 1) * k];
            let mut v = [0.0f32; BLOCK];
            for (g, (lines, x)) in lines.chunks(lines_per_group).zip(x.chunks(w.group)).enumerate() {
                let at = (b * w.groups + g) * BLOCK;
                // What a stored nibble is above its value minus the zero point: z_w + 8.
                let offset: [i32; BLOCK] = std::array::from_fn(|c| w.zeros.as_ref().map_or(8, |z| z[at + c] as i32));
                let mut acc = [0i32; BLOCK];
                for (line, x) in lines.iter().zip(x.chunks_exact(8)) {
                    for (c, (acc, &o)) in acc.iter_mut().zip(&offset).enumerate() {
                        for j in 0..4 {
                            let byte = line.0[4 * c + j];
                            *acc += ((byte & 15) as i32 - o) * x[j] as i32 + ((byte >> 4) as i32 - o) * x[4 + j] as i32;
                        }
                    }
                }
                let scales = &w.scales[at..][..BLOCK];
                for c in 0..BLOCK {
                    v[c] += acc[c] as f32 * scales[c];
                }
            }
            for (c, &v) in v.iter().enumerate().take(job.ep.n - b * BLOCK) {
                // SAFETY: row and column are in range, and this tile owns them.
                unsafe { job.ep.store(r, b * BLOCK + c, v) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
use x86::{w4_avx2, w4_vnni, w8_avx2, w8_vnni};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Epilogue, W4Job, W8Job, BLOCK};

    /// Reads 4 bytes of x as one i32 lane value, to broadcast.
    #[inline(always)]
    unsafe fn x4(p: *const u8) -> i32 {
        p.cast::<i32>().read_unaligned()
    }

    /// A W8A8 tile on AVX-512 VNNI: rows `r0..r0+MR` × blocks `b0..b0+NB`.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VNNI; the tile lies within the job's shapes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn w8_vnni<const MR: usize, const NB: usize>(job: &W8Job, r0: usize, b0: usize) {
        let (k4, w) = (job.w.k4, job.w);
        let lines = w.packed.as_ptr().add(b0 * k4);
        let x = job.x.as_ptr().add(r0 * job.stride).cast::<u8>();
        // `vpdpbusd` takes u8 × i8: x + 128 as u8 is x XOR 0x80, flipped in registers so x needs
        // no converted copy; the weight's `offset` takes the extra 128·Σw back out.
        let flip = _mm512_set1_epi8(-128);
        let mut acc = [[_mm512_setzero_si512(); NB]; MR];
        for s in 0..k4 {
            let mut wv = [_mm512_setzero_si512(); NB];
            for (b, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_load_si512(lines.add(b * k4 + s).cast());
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_xor_si512(_mm512_set1_epi32(x4(x.add(r * job.stride + 4 * s))), flip);
                for (acc, &wv) in acc.iter_mut().zip(&wv) {
                    *acc = _mm512_dpbusd_epi32(*acc, xv, wv);
                }
            }
        }
        // Scaling in loops that unroll fully, apart from the stores, keeps `acc` in registers
        // through the k loop: a rolled loop indexing it would pin it to the stack.
        let sx = token_scales::<MR>(&job.ep, r0);
        let mut y = [[_mm512_setzero_ps(); NB]; MR];
        for b in 0..NB {
            let c0 = (b0 + b) * BLOCK;
            let offset = _mm512_loadu_si512(w.offset.as_ptr().add(c0).cast());
            let scale = _mm512_loadu_ps(w.scales.as_ptr().add(c0));
            for r in 0..MR {
                let v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][b], offset)), scale);
                y[r][b] = _mm512_mul_ps(v, sx[r]);
            }
        }
        store_tile16(&job.ep, r0, b0, &y);
    }

    /// A W4A8 tile on AVX-512 VNNI. Each 64-byte line gives two VNNI lines (its nibble planes).
    ///
    /// # Safety
    /// As for `w8_vnni`; `ZEROS` says whether the weight has zero points.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn w4_vnni<const MR: usize, const NB: usize, const ZEROS: bool>(
        job: &W4Job,
        r0: usize,
        b0: usize,
    ) {
        let w = job.w;
        let (k, k8, lines_per_group) = (w.k, w.k / 8, w.group / 8);
        let lines = w.packed.as_ptr().add(b0 * k8);
        let x = job.x.as_ptr().add(r0 * k).cast::<u8>();
        let zeros = w.zeros.as_deref().unwrap_or_default().as_ptr();
        let nibble = _mm512_set1_epi8(15);
        let mut sum = [[_mm512_setzero_ps(); NB]; MR];
        for g in 0..w.groups {
            let mut acc = [[_mm512_setzero_si512(); NB]; MR];
            for u in g * lines_per_group..((g + 1) * lines_per_group).min(k8) {
                let (mut lo, mut hi) = ([_mm512_setzero_si512(); NB], [_mm512_setzero_si512(); NB]);
                for b in 0..NB {
                    let v = _mm512_load_si512(lines.add(b * k8 + u).cast());
                    lo[b] = _mm512_and_si512(v, nibble);
                    hi[b] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xa = _mm512_set1_epi32(x4(x.add(r * k + 8 * u)));
                    let xb = _mm512_set1_epi32(x4(x.add(r * k + 8 * u + 4)));
                    for b in 0..NB {
                        acc[b] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[b], lo[b], xa), hi[b], xb);
                    }
                }
            }
            let (mut scale, mut zero) = ([_mm512_setzero_ps(); NB], [_mm512_setzero_si512(); NB]);
            for b in 0..NB {
                let at = ((b0 + b) * w.groups + g) * BLOCK;
                scale[b] = _mm512_loadu_ps(w.scales.as_ptr().add(at));
                if ZEROS {
                    zero[b] = _mm512_cvtepu8_epi32(_mm_loadu_si128(zeros.add(at).cast()));
                }
            }
            for (r, (sum, acc)) in sum.iter_mut().zip(&acc).enumerate() {
                let x_sum = *job.x_sums.get_unchecked((r0 + r) * w.groups + g);
                let offset = _mm512_set1_epi32(8 * x_sum);
                for b in 0..NB {
                    // The sum's excess (z_w + 8)·Σx: the same for every channel when symmetric.
                    let excess = if ZEROS { _mm512_mullo_epi32(zero[b], _mm512_set1_epi32(x_sum)) } else { offset };
                    let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[b], excess));
                    sum[b] = _mm512_add_ps(sum[b], _mm512_mul_ps(v, scale[b]));
                }
            }
        }
        let sx = token_scales::<MR>(&job.ep, r0);
        let mut y = [[_mm512_setzero_ps(); NB]; MR];
        for r in 0..MR {
            for b in 0..NB {
                y[r][b] = _mm512_mul_ps(sum[r][b], sx[r]);
            }
        }
        store_tile16(&job.ep, r0, b0, &y);
    }

    /// `s_x` of rows `r0..r0+MR`, broadcast.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn token_scales<const MR: usize>(ep: &Epilogue, r0: usize) -> [__m512; MR] {
        let mut sx = [_mm512_setzero_ps(); MR];
        for (r, sx) in sx.iter_mut().enumerate() {
            *sx = _mm512_set1_ps(*ep.x_scales.get_unchecked(r0 + r));
        }
        sx
    }

    /// The rest of the epilogue (bias, accumulation) on a tile scaled by `s_x`, and the stores.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store_tile16<const MR: usize, const NB: usize>(
        ep: &Epilogue,
        r0: usize,
        b0: usize,
        y: &[[__m512; NB]; MR],
    ) {
        for (r, y) in y.iter().enumerate() {
            for (b, &y) in y.iter().enumerate() {
                store16(ep, r0 + r, (b0 + b) * BLOCK, y);
            }
        }
    }

    /// `y (+ bias) (+ out)` on 16 channels from `c0`, masked to those below n.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store16(ep: &Epilogue, row: usize, c0: usize, mut y: __m512) {
        let valid = (ep.n - c0).min(BLOCK);
        let mask = (u32::MAX >> (32 - valid)) as __mmask16;
        if let Some(bias) = ep.bias {
            y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(c0)));
        }
        let dst = ep.out.0.add(row * ep.n + c0);
        if ep.accumulate {
            y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, dst));
        }
        _mm512_mask_storeu_ps(dst, mask, y);
    }

    /// A W8A8 tile on AVX2. `vpmaddubsw` multiplies u8 by i8 into saturating i16 pairs, so x's
    /// sign moves onto w (`|x| · sign(x)·w`): each pair is then at most 2·128·127 < 2¹⁵.
    ///
    /// # Safety
    /// The CPU has AVX2; the tile lies within the job's shapes; no weight is −128.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn w8_avx2<const MR: usize, const NB: usize>(job: &W8Job, r0: usize, b0: usize) {
        let (k4, w) = (job.w.k4, job.w);
        let lines = w.packed.as_ptr().add(b0 * k4);
        let x = job.x.as_ptr().add(r0 * job.stride).cast::<u8>();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[[_mm256_setzero_si256(); 2]; NB]; MR];
        for s in 0..k4 {
            let mut wv = [[_mm256_setzero_si256(); 2]; NB];
            for (b, wv) in wv.iter_mut().enumerate() {
                let line = lines.add(b * k4 + s).cast::<__m256i>();
                *wv = [_mm256_load_si256(line), _mm256_load_si256(line.add(1))];
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_epi32(x4(x.add(r * job.stride + 4 * s)));
                let ax = _mm256_abs_epi8(xv);
                for (acc, wv) in acc.iter_mut().zip(&wv) {
                    for h in 0..2 {
                        let pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[h], xv));
                        acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
        }
        // As in `w8_vnni`: only fully unrolled loops index `acc`.
        let sx = token_scales8::<MR>(&job.ep, r0);
        let mut y = [[[_mm256_setzero_ps(); 2]; NB]; MR];
        for b in 0..NB {
            for h in 0..2 {
                let scale = _mm256_loadu_ps(w.scales.as_ptr().add((b0 + b) * BLOCK + 8 * h));
                for r in 0..MR {
                    y[r][b][h] = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][b][h]), scale), sx[r]);
                }
            }
        }
        store_tile8(&job.ep, r0, b0, &y);
    }

    /// A W4A8 tile on AVX2. `w_q + 8` ≤ 15 keeps each `vpmaddubsw` pair within ±2·15·128, so up
    /// to 8 of them (32 k) add up in i16 before one widening `vpmaddwd`.
    ///
    /// # Safety
    /// As for `w8_avx2`; `ZEROS` says whether the weight has zero points.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn w4_avx2<const MR: usize, const NB: usize, const ZEROS: bool>(
        job: &W4Job,
        r0: usize,
        b0: usize,
    ) {
        let w = job.w;
        let (k, k8, lines_per_group) = (w.k, w.k / 8, w.group / 8);
        let lines = w.packed.as_ptr().add(b0 * k8);
        let x = job.x.as_ptr().add(r0 * k).cast::<u8>();
        let zeros = w.zeros.as_deref().unwrap_or_default().as_ptr();
        let (nibble, ones) = (_mm256_set1_epi8(15), _mm256_set1_epi16(1));
        let mut sum = [[[_mm256_setzero_ps(); 2]; NB]; MR];
        for g in 0..w.groups {
            let mut acc = [[[_mm256_setzero_si256(); 2]; NB]; MR];
            let group = g * lines_per_group..((g + 1) * lines_per_group).min(k8);
            for u0 in group.clone().step_by(4) {
                let mut acc16 = [[[_mm256_setzero_si256(); 2]; NB]; MR];
                for u in u0..(u0 + 4).min(group.end) {
                    let (mut lo, mut hi) = ([[_mm256_setzero_si256(); 2]; NB], [[_mm256_setzero_si256(); 2]; NB]);
                    for b in 0..NB {
                        let line = lines.add(b * k8 + u).cast::<__m256i>();
                        for h in 0..2 {
                            let v = _mm256_load_si256(line.add(h));
                            lo[b][h] = _mm256_and_si256(v, nibble);
                            hi[b][h] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                        }
                    }
                    for (r, acc16) in acc16.iter_mut().enumerate() {
                        let xa = _mm256_set1_epi32(x4(x.add(r * k + 8 * u)));
                        let xb = _mm256_set1_epi32(x4(x.add(r * k + 8 * u + 4)));
                        for b in 0..NB {
                            for h in 0..2 {
                                let pairs = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(lo[b][h], xa),
                                    _mm256_maddubs_epi16(hi[b][h], xb),
                                );
                                acc16[b][h] = _mm256_add_epi16(acc16[b][h], pairs);
                            }
                        }
                    }
                }
                for (acc, acc16) in acc.iter_mut().zip(&acc16) {
                    for b in 0..NB {
                        for h in 0..2 {
                            acc[b][h] = _mm256_add_epi32(acc[b][h], _mm256_madd_epi16(acc16[b][h], ones));
                        }
                    }
                }
            }
            for (r, (sum, acc)) in sum.iter_mut().zip(&acc).enumerate() {
                let x_sum = *job.x_sums.get_unchecked((r0 + r) * w.groups + g);
                let offset = _mm256_set1_epi32(8 * x_sum);
                for b in 0..NB {
                    let at = ((b0 + b) * w.groups + g) * BLOCK;
                    for h in 0..2 {
                        let scale = _mm256_loadu_ps(w.scales.as_ptr().add(at + 8 * h));
                        // The sum's excess (z_w + 8)·Σx: the same for every channel when symmetric.
                        let excess = if ZEROS {
                            let zero = _mm256_cvtepu8_epi32(_mm_loadl_epi64(zeros.add(at + 8 * h).cast()));
                            _mm256_mullo_epi32(zero, _mm256_set1_epi32(x_sum))
                        } else {
                            offset
                        };
                        let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[b][h], excess));
                        sum[b][h] = _mm256_add_ps(sum[b][h], _mm256_mul_ps(v, scale));
                    }
                }
            }
        }
        let sx = token_scales8::<MR>(&job.ep, r0);
        let mut y = [[[_mm256_setzero_ps(); 2]; NB]; MR];
        for r in 0..MR {
            for b in 0..NB {
                for h in 0..2 {
                    y[r][b][h] = _mm256_mul_ps(sum[r][b][h], sx[r]);
                }
            }
        }
        store_tile8(&job.ep, r0, b0, &y);
    }

    /// `s_x` of rows `r0..r0+MR`, broadcast.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn token_scales8<const MR: usize>(ep: &Epilogue, r0: usize) -> [__m256; MR] {
        let mut sx = [_mm256_setzero_ps(); MR];
        for (r, sx) in sx.iter_mut().enumerate() {
            *sx = _mm256_set1_ps(*ep.x_scales.get_unchecked(r0 + r));
        }
        sx
    }

    /// The rest of the epilogue (bias, accumulation) on a tile scaled by `s_x`, and the stores.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store_tile8<const MR: usize, const NB: usize>(
        ep: &Epilogue,
        r0: usize,
        b0: usize,
        y: &[[[__m256; 2]; NB]; MR],
    ) {
        for (r, y) in y.iter().enumerate() {
            for (b, y) in y.iter().enumerate() {
                for (h, &y) in y.iter().enumerate() {
                    store8(ep, r0 + r, (b0 + b) * BLOCK + 8 * h, y);
                }
            }
        }
    }

    /// `y (+ bias) (+ out)` on 8 channels from `c0`; lanes at or past n are dropped.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store8(ep: &Epilogue, row: usize, c0: usize, mut y: __m256) {
        if c0 >= ep.n {
            return;
        }
        if ep.n - c0 < 8 {
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), y);
            for (c, &y) in lanes.iter().enumerate().take(ep.n - c0) {
                ep.finish(row, c0 + c, y);
            }
            return;
        }
        if let Some(bias) = ep.bias {
            y = _mm256_add_ps(y, _mm256_loadu_ps(bias.as_ptr().add(c0)));
        }
        let dst = ep.out.0.add(row * ep.n + c0);
        if ep.accumulate {
            y = _mm256_add_ps(y, _mm256_loadu_ps(dst));
        }
        _mm256_storeu_ps(dst, y);
    }
}
