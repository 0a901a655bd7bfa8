// Kernels of the FP16 model: the activations between kernels are f16 (what the cuBLAS GEMMs
// read), the residual stream and the GEMM outputs added to it are f32 (SmolLM2's MLP writes
// values above 20000 into it: f16 would keep 3 digits of them and overflow not far above), and
// every kernel computes in f32. Each kernel has a plain host twin in tests/model_ops.rs.

#define MODEL_NEG_INF __int_as_float(0xff800000)
#define MODEL_NAN __int_as_float(0x7fc00000)

__device__ __forceinline__ float f16_lo(u32_t v) { return f16_to_f32((f16_t)(v & 0xffffu)); }
__device__ __forceinline__ float f16_hi(u32_t v) { return f16_to_f32((f16_t)(v >> 16)); }

// x[r] = table[tokens[r]] in f32; one block per row. The host checks the ids: an id outside the
// table gives NaNs rather than a read outside it.
extern "C" __global__ void model_embed(const f16_t* __restrict__ table, const u32_t* __restrict__ tokens, int vocab,
                                       int dim, float* __restrict__ x) {
    const u32_t id = tokens[blockIdx.x];
    float* out = x + (size_t)blockIdx.x * dim;
    const f16_t* row = table + (size_t)id * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[j] = id < (u32_t)vocab ? f16_to_f32(row[j]) : MODEL_NAN;
}

// One block per row: out = x / rms(x) · gamma, after x += delta when ADD (the residual connection
// of the sub-layer that wrote delta). As anyq_core::cpu::rms_norm: 1 / sqrt(mean(x²) + eps).
template <bool ADD>
__device__ __forceinline__ void rms_norm_row(float* x, const float* delta, const float* __restrict__ gamma, float eps,
                                             int dim, f16_t* __restrict__ out) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * dim;
    float sum_sq = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = x[base + j];
        if (ADD) {
            v += delta[base + j];
            x[base + j] = v;
        }
        sum_sq += v * v;
    }
    const float inv_rms = 1.0f / sqrtf(block_reduce<false>(sum_sq, scratch) / (float)dim + eps);
    // Each thread reads back only the elements it wrote itself.
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[base + j] = f32_to_f16(x[base + j] * inv_rms * gamma[j]);
}

extern "C" __global__ void model_rms_norm(const float* __restrict__ x, const float* __restrict__ gamma, float eps,
                                          int dim, f16_t* __restrict__ out) {
    rms_norm_row<false>(const_cast<float*>(x), nullptr, gamma, eps, dim, out);
}

extern "C" __global__ void model_add_rms_norm(float* __restrict__ x, const float* __restrict__ delta,
                                              const float* __restrict__ gamma, float eps, int dim,
                                              f16_t* __restrict__ out) {
    rms_norm_row<true>(x, delta, gamma, eps, dim, out);
}

// One token's row of the fused QKV projection, [q (heads·d) | k (kv_heads·d) | v (kv_heads·d)],
// at `position`: adds the bias (when not null), rotates each q and k head by RoPE (pairs (2i,
// 2i+1) when interleaved, (i, i + d/2) for NeoX; angle = position · inv_freq[i], as
// anyq_core::cpu::Rope) and writes q to q_row, k and v to the cache rows k_row and v_row. The
// block's threads share the work.
__device__ __forceinline__ void rope_qkv_row(const f16_t* __restrict__ src, const float* __restrict__ bias,
                                             const float* __restrict__ inv_freq, int heads, int kv_heads,
                                             int head_dim, int neox, u64_t position, f16_t* __restrict__ q_row,
                                             f16_t* __restrict__ k_row, f16_t* __restrict__ v_row) {
    const int half = head_dim / 2, q_width = heads * head_dim, kv_width = kv_heads * head_dim;
    // q heads and k heads are adjacent in a row: head `head` starts at column head · d in both.
    for (int p = threadIdx.x; p < (heads + kv_heads) * half; p += blockDim.x) {
        const int head = p / half, i = p - head * half;
        const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const int col = head * head_dim;
        float x0 = f16_to_f32(src[col + a]), x1 = f16_to_f32(src[col + b]);
        if (bias) {
            x0 += bias[col + a];
            x1 += bias[col + b];
        }
        float s, c;
        sincosf((float)position * inv_freq[i], &s, &c);
        f16_t* dst = head < heads ? q_row + col : k_row + (col - q_width);
        dst[a] = f32_to_f16(x0 * c - x1 * s);
        dst[b] = f32_to_f16(x0 * s + x1 * c);
    }
    const int v_col = q_width + kv_width;
    for (int j = threadIdx.x; j < kv_width; j += blockDim.x) {
        const float v = f16_to_f32(src[v_col + j]) + (bias ? bias[v_col + j] : 0.0f);
        v_row[j] = f32_to_f16(v);
    }
}

// The fused QKV projection of `rows` tokens of one sequence at positions past, past + 1, ...:
// writes q as [rows][heads·d] and k, v into rows past.. of the layer's cache ([positions]
// [kv_heads·d]). One block per token.
extern "C" __global__ void model_rope_qkv(const f16_t* __restrict__ qkv, const float* __restrict__ bias,
                                          const float* __restrict__ inv_freq, int heads, int kv_heads, int head_dim,
                                          int neox, int past, f16_t* __restrict__ q, f16_t* __restrict__ k_cache,
                                          f16_t* __restrict__ v_cache) {
    const int r = blockIdx.x;
    const int q_width = heads * head_dim, kv_width = kv_heads * head_dim, width = q_width + 2 * kv_width;
    const u64_t position = (u64_t)past + r;
    rope_qkv_row(qkv + (u64_t)r * width, bias, inv_freq, heads, kv_heads, head_dim, neox, position,
                 q + (u64_t)r * q_width, k_cache + position * kv_width, v_cache + position * kv_width);
}

// One decode step of a batch: sequence b's new token (row b of qkv) at positions[b], its k and v
// appended to the sequence's own cache, rows [b · capacity, (b + 1) · capacity) of the layer's
// caches. A position at or past `capacity` (which the host checks) gives a row of NaN queries
// and writes nothing to the cache. One block per sequence.
extern "C" __global__ void model_rope_qkv_decode(const f16_t* __restrict__ qkv, const float* __restrict__ bias,
                                                 const float* __restrict__ inv_freq, int heads, int kv_heads,
                                                 int head_dim, int neox, const u32_t* __restrict__ positions,
                                                 int capacity, f16_t* __restrict__ q, f16_t* __restrict__ k_cache,
                                                 f16_t* __restrict__ v_cache) {
    const int b = blockIdx.x;
    const int q_width = heads * head_dim, kv_width = kv_heads * head_dim, width = q_width + 2 * kv_width;
    const u32_t position = positions[b];
    f16_t* q_row = q + (u64_t)b * q_width;
    if (position >= (u32_t)capacity) {
        for (int j = threadIdx.x; j < q_width; j += blockDim.x) q_row[j] = (f16_t)0x7e00u;
        return;
    }
    const u64_t row = (u64_t)b * capacity + position;
    rope_qkv_row(qkv + (u64_t)b * width, bias, inv_freq, heads, kv_heads, head_dim, neox, position, q_row,
                 k_cache + row * kv_width, v_cache + row * kv_width);
}

// act[r][j] = silu(gate) · up where row r of gate_up is [gate (ffn) | up (ffn)] (the fused
// gate/up projection), silu(g) = g / (1 + e^-g) as the CPU computes it.
extern "C" __global__ void model_silu_mul(const f16_t* __restrict__ gate_up, int rows, int ffn,
                                          f16_t* __restrict__ act) {
    const size_t total = (size_t)rows * ffn;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / ffn, j = i - r * ffn;
        const float g = f16_to_f32(gate_up[r * 2 * ffn + j]), u = f16_to_f32(gate_up[r * 2 * ffn + ffn + j]);
        act[i] = f32_to_f16(g / (1.0f + expf(-g)) * u);
    }
}

// x += delta over `total` elements of the residual stream: the output of a sub-layer whose
// producer reads x itself (MixQ's fused RMSNorm), so the addition cannot wait for the next norm.
extern "C" __global__ void model_add_f32(float* __restrict__ x, const float* __restrict__ delta, u64_t total) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < total; i += (u64_t)gridDim.x * blockDim.x)
        x[i] += delta[i];
}

extern "C" __global__ void model_add_f16(float* __restrict__ x, const f16_t* __restrict__ delta, u64_t total) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < total; i += (u64_t)gridDim.x * blockDim.x)
        x[i] += f16_to_f32(delta[i]);
}

#define ATTN_WARPS 4
#define ATTN_MAX_DIM 256

// One warp's head: oh = softmax(qh · Kᵀ · scale over keys 0..keys) · V, where key s's row of the
// head starts at kh + s · kv_width (and likewise vh). Lane j scores key s0 + j from its whole K
// row, 32 keys at a time, then the warp folds the 32 weights into the output (each lane owning
// pairs of dims), rescaling by the running max as FlashAttention does, all in f32. qs is the
// warp's shared row of ATTN_MAX_DIM floats; keys >= 1. head_dim is a multiple of 8 (16-byte K
// loads) and at most ATTN_MAX_DIM.
__device__ __forceinline__ void attend_warp(const f16_t* __restrict__ qh, const f16_t* __restrict__ kh,
                                            const f16_t* __restrict__ vh, int keys, int kv_width, int head_dim,
                                            float scale, float* qs, f16_t* __restrict__ oh) {
    const int lane = threadIdx.x & 31, pairs = head_dim / 2;
    for (int i = lane; i < head_dim; i += 32) qs[i] = f16_to_f32(qh[i]);
    __syncwarp();

    float running_max = MODEL_NEG_INF, running_sum = 0.0f;
    float acc[ATTN_MAX_DIM / 64][2];
#pragma unroll
    for (int i = 0; i < ATTN_MAX_DIM / 64; ++i) acc[i][0] = acc[i][1] = 0.0f;

    for (int s0 = 0; s0 < keys; s0 += 32) {
        const int key = s0 + lane;
        float score = MODEL_NEG_INF;
        if (key < keys) {
            const uint4* k_row = (const uint4*)(kh + (u64_t)key * kv_width);
            float dot = 0.0f;
#pragma unroll 4
            for (int c = 0; c < head_dim / 8; ++c) {
                const uint4 kv = k_row[c];
                const float* qc = qs + c * 8;
                dot += qc[0] * f16_lo(kv.x) + qc[1] * f16_hi(kv.x) + qc[2] * f16_lo(kv.y) + qc[3] * f16_hi(kv.y) +
                       qc[4] * f16_lo(kv.z) + qc[5] * f16_hi(kv.z) + qc[6] * f16_lo(kv.w) + qc[7] * f16_hi(kv.w);
            }
            score = dot * scale;
        }
        // Key s0 is always visible, so the new max is finite and exp(-inf - max) below is 0.
        const float new_max = fmaxf(running_max, warp_max(score));
        const float correction = expf(running_max - new_max);
        const float weight = key < keys ? expf(score - new_max) : 0.0f;
        running_sum = running_sum * correction + warp_sum(weight);
        running_max = new_max;
#pragma unroll
        for (int i = 0; i < ATTN_MAX_DIM / 64; ++i) {
            acc[i][0] *= correction;
            acc[i][1] *= correction;
        }
        const int visible = min(32, keys - s0);
        // Unrolled so that several V rows are in flight at once: one at a time, the loop waits
        // out a cache latency per key.
#pragma unroll 8
        for (int j = 0; j < visible; ++j) {
            const float w = __shfl_sync(0xffffffffu, weight, j);
            const f16_t* v_row = vh + (u64_t)(s0 + j) * kv_width;
#pragma unroll
            for (int i = 0; i < ATTN_MAX_DIM / 64; ++i) {
                const int pair = lane + 32 * i;
                if (pair < pairs) {
                    const u32_t v2 = *(const u32_t*)(v_row + 2 * pair);
                    acc[i][0] += w * f16_lo(v2);
                    acc[i][1] += w * f16_hi(v2);
                }
            }
        }
    }
    const float inv_sum = 1.0f / running_sum;
#pragma unroll
    for (int i = 0; i < ATTN_MAX_DIM / 64; ++i) {
        const int pair = lane + 32 * i;
        if (pair < pairs) {
            oh[2 * pair] = f32_to_f16(acc[i][0] * inv_sum);
            oh[2 * pair + 1] = f32_to_f16(acc[i][1] * inv_sum);
        }
    }
}

// Causal attention with grouped KV heads for prefill (many queries) and decode (one) alike:
// out[t][h] = softmax(q[t][h] · K_gᵀ · scale over keys 0..=past + t) · V_g, g = h / (heads /
// kv_heads). q and out are [queries][heads·d]; the caches [positions][kv_heads·d] hold at least
// past + queries rows. One warp per (query, head).
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)
    model_attention(const f16_t* __restrict__ q, const f16_t* __restrict__ k_cache, const f16_t* __restrict__ v_cache,
                    int queries, int past, int heads, int kv_heads, int head_dim, float scale,
                    f16_t* __restrict__ out) {
    __shared__ float q_s[ATTN_WARPS][ATTN_MAX_DIM];
    const int warp = threadIdx.x >> 5;
    const int task = blockIdx.x * ATTN_WARPS + warp;
    if (task >= queries * heads) return; // whole warps leave: the shuffles see all 32 lanes
    const int t = task / heads, h = task - t * heads, g = h / (heads / kv_heads);
    const int q_width = heads * head_dim, kv_width = kv_heads * head_dim;
    const u64_t at = (u64_t)t * q_width + h * head_dim;
    attend_warp(q + at, k_cache + g * head_dim, v_cache + g * head_dim, past + t + 1, kv_width, head_dim, scale,
                q_s[warp], out + at);
}

// One decode step of a batch: sequence b's query (row b of q, [sequences][heads·d]) at
// positions[b] attends to keys 0..=positions[b] of its own cache, rows [b · capacity, (b + 1) ·
// capacity) of the layer's caches; out is [sequences][heads·d]. A position at or past
// `capacity` (which the host checks) gives NaNs and reads nothing. One warp per (sequence, head):
// a block's warps are consecutive heads, which share KV heads.
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)
    model_attention_decode(const f16_t* __restrict__ q, const f16_t* __restrict__ k_cache,
                           const f16_t* __restrict__ v_cache, const u32_t* __restrict__ positions, int capacity,
                           int sequences, int heads, int kv_heads, int head_dim, float scale,
                           f16_t* __restrict__ out) {
    __shared__ float q_s[ATTN_WARPS][ATTN_MAX_DIM];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int task = blockIdx.x * ATTN_WARPS + warp;
    if (task >= sequences * heads) return; // whole warps leave: the shuffles see all 32 lanes
    const int b = task / heads, h = task - b * heads, g = h / (heads / kv_heads);
    const int q_width = heads * head_dim, kv_width = kv_heads * head_dim;
    const u64_t at = (u64_t)b * q_width + h * head_dim;
    const u32_t position = positions[b];
    if (position >= (u32_t)capacity) {
        for (int i = lane; i < head_dim; i += 32) out[at + i] = (f16_t)0x7e00u;
        return;
    }
    const u64_t first = (u64_t)b * capacity * kv_width + g * head_dim;
    attend_warp(q + at, k_cache + first, v_cache + first, (int)position + 1, kv_width, head_dim, scale, q_s[warp],
                out + at);
}
