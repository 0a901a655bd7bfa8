//! Causal scaled-dot-product attention with grouped KV heads (GQA), for prefill and decode alike.

use rayon::prelude::*;

use super::matmul::gemm_rows;
use super::ops::softmax_inplace;

/// Queries per task: a block of scores `[QUERY_BLOCK, keys]` stays small while each task still
/// runs a real matrix product.
const QUERY_BLOCK: usize = 64;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// New queries, at positions `past..past + queries`.
    pub queries: usize,
    /// Positions already in the cache before these queries.
    pub past: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// `out[t, h·d..] = softmax(q_h · K_gᵀ / √d, causal) · V_g` for every query t and head h, where the
/// KV head g = h / (n_heads / n_kv_heads).
///
/// `q` and `out` are `[queries, n_heads · head_dim]`; `k` and `v` hold at least `past + queries`
/// rows of `[n_kv_heads · head_dim]`, the new positions included. Query t sees keys `0..=past + t`.
pub fn causal_attention(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], shape: AttentionShape) {
    let AttentionShape { queries, past, n_heads, n_kv_heads, head_dim: d } = shape;
    let (q_width, kv_width) = (n_heads * d, n_kv_heads * d);
    let keys = past + queries;
    assert!(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "attention: {n_heads} heads over {n_kv_heads} KV heads");
    assert_eq!(q.len(), queries * q_width, "attention: q shape");
    assert_eq!(out.len(), queries * q_width, "attention: out shape");
    assert!(k.len() >= keys * kv_width && v.len() >= keys * kv_width, "attention: cache too short");
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let blocks = queries.div_ceil(QUERY_BLOCK);

    let results: Vec<(usize, usize, Vec<f32>)> = (0..n_heads * blocks)
        .into_par_iter()
        .map(|task| {
            let (h, block) = (task / blocks, task % blocks);
            let g = h / group;
            let first = block * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(queries - first);
            // Only keys that the block's last query sees take part.
            let cols = past + first + rows;
            let mut scores = vec![0.0f32; rows * cols];
            // SAFETY: q rows first..first+rows of head h, K rows 0..cols of KV head g, and a
            // rows×cols score buffer: all within the lengths asserted above.
            unsafe {
                gemm_rows(
                    rows,
                    cols,
                    d,
                    scores.as_mut_ptr(),
                    cols,
                    q.as_ptr().add(first * q_width + h * d),
                    q_width,
                    k.as_ptr().add(g * d),
                    kv_width,
                    true,
                    scale,
                    false,
                )
            }
            for (r, row) in scores.chunks_exact_mut(cols).enumerate() {
                let visible = past + first + r + 1;
                softmax_inplace(&mut row[..visible]);
                row[visible..].fill(0.0);
            }
            let mut block_out = vec![0.0f32; rows * d];
            // SAFETY: scores is rows×cols, V rows 0..cols of KV head g, block_out rows×d.
            unsafe {
                gemm_rows(
                    rows,
                    d,
                    cols,
                    block_out.as_mut_ptr(),
                    d,
                    scores.as_ptr(),
                    cols,
                    v.as_ptr().add(g * d),
                    kv_width,
                    false,
                    1.0,
                    false,
                )
            }
            (h, first, block_out)
        })
        .collect();

    for (h, first, block_out) in results {
        for (r, row) in block_out.chunks_exact(d).enumerate() {
            let at = (first + r) * q_width + h * d;
            out[at..at + d].copy_from_slice(row);
        }
    }
}

/// Plain loops over (query, head, key), the definition `causal_attention` must agree with.
pub fn causal_attention_reference(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape) -> Vec<f32> {
    let AttentionShape { queries, past, n_heads, n_kv_heads, head_dim: d } = shape;
    let (q_width, kv_width) = (n_heads * d, n_kv_heads * d);
    let mut out = vec![0.0; queries * q_width];
    for t in 0..queries {
        for h in 0..n_heads {
            let g = h / (n_heads / n_kv_heads);
            let qh = &q[t * q_width + h * d..][..d];
            let mut scores: Vec<f32> = (0..=past + t)
                .map(|s| {
                    qh.iter().zip(&k[s * kv_width + g * d..][..d]).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                })
                .collect();
            softmax_inplace(&mut scores);
            for (s, p) in scores.iter().enumerate() {
                for i in 0..d {
                    out[t * q_width + h * d + i] += p * v[s * kv_width + g * d + i];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::XorShift;

    #[test]
    fn matches_reference_for_prefill_and_decode_with_gqa() {
        for &(queries, past, n_heads, n_kv_heads, head_dim) in
            &[(1, 0, 1, 1, 4), (5, 0, 4, 2, 8), (70, 3, 6, 2, 16), (1, 129, 9, 3, 64), (130, 0, 3, 3, 8)]
        {
            let shape = AttentionShape { queries, past, n_heads, n_kv_heads, head_dim };
            let keys = past + queries;
            let mut rng = XorShift::new((queries * 100 + past) as u64);
            let q = rng.floats(queries * n_heads * head_dim);
            let k = rng.floats(keys * n_kv_heads * head_dim);
            let v = rng.floats(keys * n_kv_heads * head_dim);
            let mut out = vec![f32::NAN; q.len()];
            causal_attention(&q, &k, &v, &mut out, shape);
            let reference = causal_attention_reference(&q, &k, &v, shape);
            for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
                assert!((a - b).abs() < 1e-5, "{shape:?} element {i}: {a} vs {b}");
            }
        }
    }
}
