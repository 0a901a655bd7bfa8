//! Element-wise and row-wise kernels of a transformer block.

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
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv_rms = 1.0 / (mean_square + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inv_rms * w;
        }
    }
}

/// The SwiGLU gate, in place: `gate = silu(gate) · up`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths differ");
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
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
