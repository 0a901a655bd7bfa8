//! A linear layer whose weight stays in its GGML block format: `y = x·Wᵀ (+ b)` with f32
//! activations, computed from the stored blocks without ever holding the whole f32 weight.
//!
//! The result is the product with the dequantized weight (exactly the values
//! [`GgmlType::dequantize`] gives) up to the order of f32 summation; activations are never
//! quantized. Two kernels:
//!
//! * one row of x (decode) is a GEMV bound by reading W, so reading fewer bytes is the whole
//!   point: rows of W are split over rayon threads and each block is expanded in registers and
//!   dotted with x. Q4_0, Q4_1 and Q8_0 have AVX2/FMA/F16C kernels (detected at run time);
//!   every other type, and every type on other CPUs, dequantizes a row piece by piece into a
//!   small stack buffer and uses [`anyq_core::cpu::dot`].
//! * more rows (prefill) reuse each weight many times: panels of W rows are dequantized into a
//!   per-thread f32 buffer and multiplied with the `gemm` crate, panels in parallel.
//!
//! In the fast kernels, a block's weights are `d·q (+ m)` with small integers q and an f16
//! scale d, so `d·q` is exact in f32 and factoring d out of the block's sum only reorders the
//! rounding. Q4_1 also factors out its offset, `Σ (d·q + m)·x = d·Σ q·x + m·Σ x`, with the
//! sums of x per block computed once per call; that saves a quarter of the vector work but
//! skips the rounding of each `d·q + m`, so the result can differ from the dense product by a
//! few ulps of `(|d|·Σ q·|x| + |m|·Σ |x|)` per block, the same order as summation-order error
//! (for weights quantized by min and range, `|m|` and `|d|·q` are at most about twice the
//! largest weight of the block).

use std::cell::RefCell;

use anyq_core::cpu::dot;
use anyq_core::Linear;
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::ggml::{GgmlError, GgmlType};

/// Bytes of weight below which a GEMV task is not split further: smaller tasks cost more to
/// schedule than they save.
const MIN_TASK_BYTES: usize = 16 << 10;
/// GEMV tasks per thread, so that threads that finish early can take over work.
const TASKS_PER_THREAD: usize = 4;
/// Elements dequantized at a time by the generic GEMV (a multiple of every block size).
const GENERIC_CHUNK: usize = 1024;
/// Elements dequantized per call when filling a prefill panel: below the size at which
/// [`GgmlType::dequantize`] goes parallel (a nested parallel call could run another panel on
/// this thread while its buffer is borrowed), and a multiple of every block size.
const SEQUENTIAL_CHUNK: usize = 1 << 15;
/// Most weight rows in one prefill panel, and the granule panels are rounded to.
const MAX_PANEL_ROWS: usize = 128;
const PANEL_GRANULE: usize = 16;
/// Below this many multiply-adds a prefill runs its panels on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;

thread_local! {
    /// A prefill panel of dequantized weight rows, kept per thread across calls.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A `[out_features, in_features]` weight stored as GGML blocks (each row a whole number of
/// blocks, rows back to back, as in a GGUF file), with an optional f32 bias.
#[derive(Clone, Debug)]
pub struct GgmlLinear {
    ggml_type: GgmlType,
    bytes: Vec<u8>,
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
    row_bytes: usize,
}

impl GgmlLinear {
    /// Checks that rows are whole blocks, that `bytes` holds exactly `out_features` rows and
    /// that the bias (reported as an F32 tensor) has `out_features` values.
    pub fn new(
        ggml_type: GgmlType,
        bytes: Vec<u8>,
        bias: Option<Vec<f32>>,
        out_features: usize,
        in_features: usize,
    ) -> Result<Self, GgmlError> {
        let n_elements = out_features
            .checked_mul(in_features)
            .ok_or(GgmlError::TooLarge { ty: ggml_type, n_elements: usize::MAX })?;
        let row_bytes = ggml_type.bytes_for(in_features)?;
        let expected = ggml_type.bytes_for(n_elements)?;
        if bytes.len() != expected {
            return Err(GgmlError::LengthMismatch { ty: ggml_type, n_elements, expected, got: bytes.len() });
        }
        if let Some(b) = &bias {
            if b.len() != out_features {
                let f32_bytes = |n: usize| n.saturating_mul(4);
                return Err(GgmlError::LengthMismatch {
                    ty: GgmlType::F32,
                    n_elements: out_features,
                    expected: f32_bytes(out_features),
                    got: f32_bytes(b.len()),
                });
            }
        }
        Ok(Self { ggml_type, bytes, bias, out_features, in_features, row_bytes })
    }

    /// Whether `ggml_type` has a specialised kernel (on x86-64 CPUs with AVX2, FMA and F16C;
    /// elsewhere these types take the generic path too). Every type works; the others
    /// dequantize a row piece by piece in the GEMV, correct but slower.
    pub fn supports(ggml_type: GgmlType) -> bool {
        matches!(ggml_type, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
    }

    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// The stored blocks, rows back to back.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// Dequantizes weight row `row` (e.g. one token's embedding) into `out`, whose length must
    /// be `in_features`. Panics if `row >= out_features`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.out_features, "GgmlLinear::dequantize_row: row {row} of {}", self.out_features);
        assert_eq!(out.len(), self.in_features, "GgmlLinear::dequantize_row: out is not in_features long");
        dequantize_sequential(self.ggml_type, self.row(row), out);
    }

    fn row(&self, row: usize) -> &[u8] {
        &self.bytes[row * self.row_bytes..(row + 1) * self.row_bytes]
    }

    /// The decode product: `out[j] = x · W[j]`, rows split over threads.
    fn gemv(&self, x: &[f32], out: &mut [f32]) {
        let kernel = Kernel::select(self.ggml_type);
        let threads = rayon::current_num_threads();
        let min_rows = (MIN_TASK_BYTES / self.row_bytes.max(1)).max(1);
        let rows_per_task = self.out_features.div_ceil(TASKS_PER_THREAD * threads).max(min_rows);
        let sum_x = if kernel.uses_block_sums() { block_sums(x) } else { Vec::new() };
        out.par_chunks_mut(rows_per_task)
            .zip(self.bytes.par_chunks(rows_per_task * self.row_bytes))
            .for_each(|(out, w)| kernel.rows(self.ggml_type, w, self.row_bytes, x, &sum_x, out));
    }

    /// The prefill product: panels of weight rows dequantized and multiplied by `gemm`.
    fn gemm_panels(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.out_features, self.in_features);
        let threads = rayon::current_num_threads();
        // Panels of at most MAX_PANEL_ROWS, as many as a multiple of the thread count so that
        // threads get equal shares (where there are enough rows).
        let n_panels = n.div_ceil(MAX_PANEL_ROWS).next_multiple_of(threads).min(n.div_ceil(PANEL_GRANULE));
        let panel_rows = n.div_ceil(n_panels).next_multiple_of(PANEL_GRANULE);
        let n_panels = n.div_ceil(panel_rows);
        let out_ptr = SharedOut(out.as_mut_ptr());
        let panel = |p: usize| {
            let first = p * panel_rows;
            let rows = panel_rows.min(n - first);
            PANEL.with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.resize(rows * k, 0.0);
                let w = &self.bytes[first * self.row_bytes..(first + rows) * self.row_bytes];
                dequantize_sequential(self.ggml_type, w, &mut buf[..rows * k]);
                // SAFETY: x is m×k (row stride k) and the panel rows×k (row stride k), read as
                // its transpose k×rows; the destination is columns first..first + rows of the
                // m×n `out` (row stride n), which no other panel writes, and `out` outlives
                // every panel (the caller waits for them all).
                unsafe {
                    gemm(
                        m, rows, k,
                        out_ptr.get().add(first), 1, n as isize,
                        false,
                        x.as_ptr(), 1, k as isize,
                        buf.as_ptr(), k as isize, 1,
                        0.0, 1.0,
                        false, false, false,
                        Parallelism::None,
                    );
                }
            });
        };
        if m * n * k < PARALLEL_MIN_WORK {
            (0..n_panels).for_each(panel);
        } else {
            (0..n_panels).into_par_iter().for_each(panel);
        }
    }
}

impl Linear for GgmlLinear {
    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.out_features, self.in_features);
        assert_eq!(x.len(), m * k, "GgmlLinear: x is not [m={m}, k={k}]");
        assert_eq!(out.len(), m * n, "GgmlLinear: out is not [m={m}, n={n}]");
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            out.fill(0.0);
        } else if m == 1 {
            self.gemv(x, out);
        } else {
            self.gemm_panels(x, m, out);
        }
        if let Some(bias) = &self.bias {
            for row in out.chunks_exact_mut(n) {
                for (y, b) in row.iter_mut().zip(bias) {
                    *y += b;
                }
            }
        }
    }

    /// The stored blocks plus the f32 bias.
    fn weight_bytes(&self) -> usize {
        self.bytes.len() + self.bias.as_ref().map_or(0, |b| b.len() * std::mem::size_of::<f32>())
    }
}

/// The output pointer shared by prefill panels, each of which writes its own columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: panels write disjoint elements through the pointer, and the owner of the buffer
// waits for every panel before using it again.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Dequantizes whole blocks on the calling thread, in pieces small enough that
/// [`GgmlType::dequantize`] never goes parallel.
fn dequantize_sequential(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let elements_per_piece = SEQUENTIAL_CHUNK;
    let bytes_per_piece = SEQUENTIAL_CHUNK / ty.block_size() * ty.type_size();
    for (s, d) in src.chunks(bytes_per_piece).zip(dst.chunks_mut(elements_per_piece)) {
        ty.dequantize(s, d).expect("GgmlLinear: block lengths were checked at construction");
    }
}

/// The GEMV kernel for one type on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Q4_0Avx2,
    #[cfg(target_arch = "x86_64")]
    Q4_1Avx2,
    #[cfg(target_arch = "x86_64")]
    Q8_0Avx2,
}

impl Kernel {
    fn select(ty: GgmlType) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            match ty {
                GgmlType::Q4_0 => return Kernel::Q4_0Avx2,
                GgmlType::Q4_1 => return Kernel::Q4_1Avx2,
                GgmlType::Q8_0 => return Kernel::Q8_0Avx2,
                _ => {}
            }
        }
        let _ = ty;
        Kernel::Generic
    }

    /// Whether the kernel needs the sum of each block of x ([`block_sums`]).
    fn uses_block_sums(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Q4_1Avx2 {
            return true;
        }
        false
    }

    /// `out[j] = x · W[j]` for the rows stored in `w` (`out.len()` rows of `row_bytes`);
    /// `sum_x` is `block_sums(x)` where `uses_block_sums`, else may be empty.
    fn rows(self, ty: GgmlType, w: &[u8], row_bytes: usize, x: &[f32], sum_x: &[f32], out: &mut [f32]) {
        assert_eq!(w.len(), out.len() * row_bytes, "GgmlLinear: rows and outputs disagree");
        assert_eq!(ty.bytes_for(x.len()), Ok(row_bytes), "GgmlLinear: x is not one row long");
        if self.uses_block_sums() {
            assert_eq!(sum_x.len() * ty.block_size(), x.len(), "GgmlLinear: block sums of x");
        }
        match self {
            Kernel::Generic => generic_rows(ty, w, row_bytes, x, out),
            // SAFETY (all three): `select` checked the CPU features, `ty` is the kernel's type
            // and the asserts above give the lengths each kernel relies on.
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4_0Avx2 => unsafe { x86::q4_0_rows(w, row_bytes, x, sum_x, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Q4_1Avx2 => unsafe { x86::q4_1_rows(w, row_bytes, x, sum_x, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Q8_0Avx2 => unsafe { x86::q8_0_rows(w, row_bytes, x, sum_x, out) },
        }
    }
}

/// The sum of each 32 consecutive values of `x` (Q4_1's offset term).
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks(32).map(|c| c.iter().sum()).collect()
}

/// Any type: each row dequantized a piece at a time into a stack buffer and dotted with x.
fn generic_rows(ty: GgmlType, w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
    let mut buf = [0.0f32; GENERIC_CHUNK];
    let piece_bytes = GENERIC_CHUNK / ty.block_size() * ty.type_size();
    for (y, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
        let mut acc = 0.0;
        for (src, x) in row.chunks(piece_bytes).zip(x.chunks(GENERIC_CHUNK)) {
            let buf = &mut buf[..x.len()];
            ty.dequantize(src, buf).expect("GgmlLinear: block lengths were checked at construction");
            acc += dot(buf, x);
        }
        *y = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 kernels for the legacy 32-element formats. Each block's integers are widened to
    //! eight i32 lanes at a time, converted to f32 (exactly) and multiplied with x.
    //!
    //! Every function here is an `unsafe fn` with the target features, and the per-block code
    //! is expanded by a macro rather than passed as a closure, so that everything is compiled
    //! for AVX2 and inlined on every supported compiler.

    use std::arch::x86_64::*;

    const QK: usize = 32;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The f16 at `p`, as f32 in every lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_splat(p: *const u8) -> __m256 {
        let h = std::ptr::read_unaligned(p as *const u16);
        _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    /// Eight unsigned bytes at `p` widened to i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn u8x8(p: *const u8) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }

    /// Eight signed bytes at `p` widened to i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn i8x8(p: *const u8) -> __m256i {
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }

    /// The 32 nibbles of the 16 bytes at `qs` as four vectors of elements 0..8, 8..16,
    /// 16..24, 24..32 (element j in the low nibble of byte j, element j + 16 in its high one).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(qs: *const u8) -> [__m256i; 4] {
        let mask = _mm256_set1_epi32(0x0F);
        let (a, b) = (u8x8(qs), u8x8(qs.add(8)));
        [_mm256_and_si256(a, mask), _mm256_and_si256(b, mask), _mm256_srli_epi32::<4>(a), _mm256_srli_epi32::<4>(b)]
    }

    /// `Σ q[i]·x[i]` over one block, in eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_dot(q: [__m256i; 4], x: *const f32) -> __m256 {
        let s = _mm256_mul_ps(_mm256_cvtepi32_ps(q[0]), _mm256_loadu_ps(x));
        let s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[1]), _mm256_loadu_ps(x.add(8)), s);
        let s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[2]), _mm256_loadu_ps(x.add(16)), s);
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[3]), _mm256_loadu_ps(x.add(24)), s)
    }

    // Block functions: one block at `p` against x at `x` (32 values whose sum is at `sum_x`),
    // adding to a vector accumulator and a scalar one (lane 0) for terms that are per block.

    /// Q4_0 (d: f16, 16 bytes of nibbles; x = d·(q − 8)): `acc + d·Σ (q − 8)·x`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_block(p: *const u8, x: *const f32, _sum_x: *const f32, acc: __m256, acc1: __m128) -> (__m256, __m128) {
        let eight = _mm256_set1_epi32(8);
        let [a, b, c, d] = nibbles(p.add(2));
        let q = [_mm256_sub_epi32(a, eight), _mm256_sub_epi32(b, eight), _mm256_sub_epi32(c, eight), _mm256_sub_epi32(d, eight)];
        (_mm256_fmadd_ps(f16_splat(p), block_dot(q, x), acc), acc1)
    }

    /// Q4_1 (d, m: f16, 16 bytes of nibbles; x = d·q + m):
    /// `Σ (d·q + m)·x = d·Σ q·x + m·Σ x`, the second term from the precomputed block sum.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_block(p: *const u8, x: *const f32, sum_x: *const f32, acc: __m256, acc1: __m128) -> (__m256, __m128) {
        // [d, m, 0, 0] from the two f16 in one conversion.
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
        let acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dm), block_dot(nibbles(p.add(4)), x), acc);
        (acc, _mm_fmadd_ss(_mm_movehdup_ps(dm), _mm_load_ss(sum_x), acc1))
    }

    /// Q8_0 (d: f16, 32 i8; x = q·d): `acc + d·Σ q·x`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_block(p: *const u8, x: *const f32, _sum_x: *const f32, acc: __m256, acc1: __m128) -> (__m256, __m128) {
        let q = [i8x8(p.add(2)), i8x8(p.add(10)), i8x8(p.add(18)), i8x8(p.add(26))];
        (_mm256_fmadd_ps(f16_splat(p), block_dot(q, x), acc), acc1)
    }

    /// A row kernel: `out[j] = x · W[j]` over the rows in `w`, with two accumulators (even and
    /// odd blocks) so that consecutive blocks do not wait on each other.
    macro_rules! rows_kernel {
        ($(#[$doc:meta])* $name:ident, $block:ident, $block_bytes:expr) => {
            $(#[$doc])*
            ///
            /// # Safety
            /// The CPU has AVX2, FMA and F16C; `x.len()` is a multiple of 32, `row_bytes` is
            /// `x.len() / 32` blocks, `w.len() == out.len() · row_bytes`, and `sum_x` holds the
            /// sum of each 32 values of x if the block function reads it.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(w: &[u8], row_bytes: usize, x: &[f32], sum_x: &[f32], out: &mut [f32]) {
                const BLOCK_BYTES: usize = $block_bytes;
                let nb = x.len() / QK;
                debug_assert_eq!(nb * BLOCK_BYTES, row_bytes);
                debug_assert_eq!(w.len(), out.len() * row_bytes);
                let (x, s) = (x.as_ptr(), sum_x.as_ptr());
                for (j, y) in out.iter_mut().enumerate() {
                    // Row j's nb blocks lie within w, and x has nb·32 elements. `s` is only
                    // offset (wrapping), not read, by block functions that do not use it.
                    let row = w.as_ptr().add(j * row_bytes);
                    let (mut v0, mut v1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    let (mut s0, mut s1) = (_mm_setzero_ps(), _mm_setzero_ps());
                    let mut b = 0;
                    while b + 2 <= nb {
                        (v0, s0) = $block(row.add(b * BLOCK_BYTES), x.add(b * QK), s.wrapping_add(b), v0, s0);
                        (v1, s1) = $block(row.add((b + 1) * BLOCK_BYTES), x.add((b + 1) * QK), s.wrapping_add(b + 1), v1, s1);
                        b += 2;
                    }
                    if b < nb {
                        (v0, s0) = $block(row.add(b * BLOCK_BYTES), x.add(b * QK), s.wrapping_add(b), v0, s0);
                    }
                    *y = hsum(_mm256_add_ps(v0, v1)) + _mm_cvtss_f32(_mm_add_ss(s0, s1));
                }
            }
        };
    }

    rows_kernel!(/// Q4_0 rows (18-byte blocks).
        q4_0_rows, q4_0_block, 18);
    rows_kernel!(/// Q4_1 rows (20-byte blocks).
        q4_1_rows, q4_1_block, 20);
    rows_kernel!(/// Q8_0 rows (34-byte blocks).
        q8_0_rows, q8_0_block, 34);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 32) as u8
            })
            .collect()
    }

    /// Random blocks with finite f16 scales in [-1, 1) at the given offsets.
    fn blocks(ty: GgmlType, n_blocks: usize, scales: &[usize], seed: u64) -> Vec<u8> {
        let mut b = random_bytes(n_blocks * ty.type_size(), seed);
        for (i, block) in b.chunks_exact_mut(ty.type_size()).enumerate() {
            for (j, &o) in scales.iter().enumerate() {
                let v = half::f16::from_f32(((i * 7 + j * 3) % 17) as f32 / 8.5 - 1.0);
                block[o..o + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    /// The specialised kernels agree with the generic path, which other CPUs use for them.
    #[test]
    fn fast_kernels_match_generic_path() {
        let (n, k) = (37, 96);
        let x: Vec<f32> = (0..k).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        for (ty, scales) in [(GgmlType::Q4_0, &[0][..]), (GgmlType::Q4_1, &[0, 2]), (GgmlType::Q8_0, &[0])] {
            let w = blocks(ty, n * k / 32, scales, ty.id() as u64);
            let row_bytes = ty.bytes_for(k).unwrap();
            let mut generic = vec![0.0; n];
            Kernel::Generic.rows(ty, &w, row_bytes, &x, &[], &mut generic);
            let kernel = Kernel::select(ty);
            if kernel == Kernel::Generic {
                continue; // no fast kernel on this CPU
            }
            let mut fast = vec![0.0; n];
            kernel.rows(ty, &w, row_bytes, &x, &block_sums(&x), &mut fast);
            let scale = generic.iter().fold(1.0f32, |a, v| a.max(v.abs()));
            for (j, (a, b)) in fast.iter().zip(&generic).enumerate() {
                assert!((a - b).abs() <= 1e-5 * scale, "{ty} row {j}: {a} vs {b}");
            }
        }
    }
}
