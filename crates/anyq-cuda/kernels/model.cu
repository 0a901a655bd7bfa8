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

// Row elements (f32, or float4 when dim % 4 == 0) a thread of the norms holds in registers: the
// host sizes the block so that a row fits (up to 4096 floats per row, 16384 when dim % 4 == 0).
#define NORM_ITEMS 4

__device__ __forceinline__ float squares(float v) { return v * v; }
__device__ __forceinline__ float squares(float4 v) { return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w; }
__device__ __forceinline__ void add_to(float& v, float d) { v += d; }
__device__ __forceinline__ void add_to(float4& v, float4 d) {
    v.x += d.x;
    v.y += d.y;
    v.z += d.z;
    v.w += d.w;
}
__device__ __forceinline__ void store_normed(f16_t* out, int u, float v, float g, float inv_rms) {
    out[u] = f32_to_f16(v * inv_rms * g);
}
__device__ __forceinline__ void store_normed(f16_t* out, int u, float4 v, float4 g, float inv_rms) {
    const u32_t lo = f32_to_f16(v.x * inv_rms * g.x) | ((u32_t)f32_to_f16(v.y * inv_rms * g.y) << 16);
    const u32_t hi = f32_to_f16(v.z * inv_rms * g.z) | ((u32_t)f32_to_f16(v.w * inv_rms * g.w) << 16);
    ((uint2*)out)[u] = make_uint2(lo, hi);
}

// The row in registers: thread t holds units t, t + blockDim, ... (V = float or float4), all
// loaded before the first store (the compiler cannot move a load above a store to x, which may
// alias it) so that their latencies overlap; one reduction, then the writes. A row of 4096
// floats costs one round trip to memory instead of one per loop iteration.
template <bool ADD, typename V>
__device__ __forceinline__ void rms_norm_row_registers(float* x, const float* delta, const float* __restrict__ gamma,
                                                       float eps, int dim, float* scratch, f16_t* __restrict__ out) {
    const int units = dim / (int)(sizeof(V) / sizeof(float));
    const size_t base = (size_t)blockIdx.x * dim;
    V* xr = (V*)(x + base);
    const V* dr = (const V*)(delta + base);
    const V* gr = (const V*)gamma;
    V v[NORM_ITEMS], d[NORM_ITEMS], g[NORM_ITEMS];
#pragma unroll
    for (int i = 0; i < NORM_ITEMS; ++i) {
        const int u = threadIdx.x + i * blockDim.x;
        if (u < units) {
            v[i] = xr[u];
            g[i] = gr[u];
            if (ADD) d[i] = dr[u];
        }
    }
    float sum_sq = 0.0f;
#pragma unroll
    for (int i = 0; i < NORM_ITEMS; ++i) {
        const int u = threadIdx.x + i * blockDim.x;
        if (u < units) {
            if (ADD) {
                add_to(v[i], d[i]);
                xr[u] = v[i];
            }
            sum_sq += squares(v[i]);
        }
    }
    const float inv_rms = 1.0f / sqrtf(block_reduce<false>(sum_sq, scratch) / (float)dim + eps);
#pragma unroll
    for (int i = 0; i < NORM_ITEMS; ++i) {
        const int u = threadIdx.x + i * blockDim.x;
        if (u < units) store_normed(out + base, u, v[i], g[i], inv_rms);
    }
}

// Rows too long for the registers: a loop over the row, reading back what it wrote.
template <bool ADD>
__device__ __forceinline__ void rms_norm_row_loop(float* x, const float* delta, const float* __restrict__ gamma,
                                                  float eps, int dim, float* scratch, f16_t* __restrict__ out) {
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

// One block per row: out = x / rms(x) · gamma, after x += delta when ADD (the residual connection
// of the sub-layer that wrote delta). As anyq_core::cpu::rms_norm: 1 / sqrt(mean(x²) + eps), in
// f32. float4 accesses need dim % 4 == 0 (rows then start 16-byte aligned).
template <bool ADD>
__device__ __forceinline__ void rms_norm_row(float* x, const float* delta, const float* __restrict__ gamma, float eps,
                                             int dim, f16_t* __restrict__ out) {
    __shared__ float scratch[32];
    const int held = (int)blockDim.x * NORM_ITEMS;
    if (dim % 4 == 0 && dim / 4 <= held)
        rms_norm_row_registers<ADD, float4>(x, delta, gamma, eps, dim, scratch, out);
    else if (dim <= held)
        rms_norm_row_registers<ADD, float>(x, delta, gamma, eps, dim, scratch, out);
    else
        rms_norm_row_loop<ADD>(x, delta, gamma, eps, dim, scratch, out);
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

// Warps per block of the attention kernels. They take heads of up to 256 dims: a row's 16-byte
// chunks, one per lane of a warp.
#define ATTN_WARPS 4
// Key rows per lane and tile: their K and V loads are all issued before any is used, so that a
// tile costs one memory latency (a decode step's attention is made of latencies, not bandwidth).
#define ATTN_BATCH 8

// One warp's online softmax over a range of keys of one head: the running max of the scores, the
// sum of exp(score - max), and the lane's 8 dims of Σ exp(score - max) · v (see attend_keys).
struct SoftmaxPart {
    float max, sum;
    float acc[8];
};

__device__ __forceinline__ void f16x8_to_f32(uint4 h, float* f) {
    const u32_t words[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = f16_lo(words[i]);
        f[2 * i + 1] = f16_hi(words[i]);
    }
}

__device__ __forceinline__ uint4 f32x8_to_f16(const float* f, float scale) {
    const auto pair = [&](int i) {
        return (u32_t)f32_to_f16(f[i] * scale) | ((u32_t)f32_to_f16(f[i + 1] * scale) << 16);
    };
    return make_uint4(pair(0), pair(2), pair(4), pair(6));
}

// One warp's head over keys first..last (first < last): the scores qh · k_s · scale and the
// softmax state above, where key s's row of the head starts at kh + s · kv_width (and likewise
// vh), all in f32. A key's row is read by `row_lanes` consecutive lanes, 8 dims (16 bytes) each:
// the power of two covering the row, so that a warp load reads 32 / row_lanes rows and a score
// is a dot product of 8 dims folded over its lanes with xor shuffles. A tile is ATTN_BATCH such
// loads of K and of V; the output is rescaled by the running max as FlashAttention does. The
// lanes of different rows hold partial sums of the output until the end, when every lane gets
// the sums of its 8 dims (chunk lane % row_lanes). head_dim is a multiple of 8 (16-byte loads)
// and at most 256.
__device__ __forceinline__ SoftmaxPart attend_keys(const f16_t* __restrict__ qh, const f16_t* __restrict__ kh,
                                                   const f16_t* __restrict__ vh, int first, int last, int kv_width,
                                                   int head_dim, float scale) {
    const int lane = threadIdx.x & 31, chunks = head_dim / 8;
    int row_lanes = 1;
    while (row_lanes < chunks) row_lanes <<= 1;
    const int rows_per_load = 32 / row_lanes, tile = rows_per_load * ATTN_BATCH;
    const int row = lane / row_lanes, chunk = lane % row_lanes;
    // Loads need no guards: lanes past the row (head_dim / 8 not a power of two) read its last
    // chunk with a zero q, and keys past `last` read key last - 1 with a zero weight.
    const int read_chunk = min(chunk, chunks - 1);
    float q[8];
    f16x8_to_f32(((const uint4*)qh)[read_chunk], q);
    if (chunk != read_chunk)
#pragma unroll
        for (int e = 0; e < 8; ++e) q[e] = 0.0f;

    SoftmaxPart part;
    part.max = MODEL_NEG_INF;
    part.sum = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) part.acc[e] = 0.0f;

#pragma unroll 1
    for (int t0 = first; t0 < last; t0 += tile) {
        uint4 k8[ATTN_BATCH], v8[ATTN_BATCH];
#pragma unroll
        for (int b = 0; b < ATTN_BATCH; ++b) {
            const u64_t key = min(t0 + b * rows_per_load + row, last - 1);
            k8[b] = ((const uint4*)(kh + key * kv_width))[read_chunk];
            v8[b] = ((const uint4*)(vh + key * kv_width))[read_chunk];
        }
        float score[ATTN_BATCH];
#pragma unroll
        for (int b = 0; b < ATTN_BATCH; ++b) {
            float k[8];
            f16x8_to_f32(k8[b], k);
            score[b] = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) score[b] += q[e] * k[e];
        }
        for (int offset = 1; offset < row_lanes; offset <<= 1)
#pragma unroll
            for (int b = 0; b < ATTN_BATCH; ++b) score[b] += __shfl_xor_sync(0xffffffffu, score[b], offset);
        float tile_max = MODEL_NEG_INF;
#pragma unroll
        for (int b = 0; b < ATTN_BATCH; ++b) {
            score[b] = t0 + b * rows_per_load + row < last ? score[b] * scale : MODEL_NEG_INF;
            tile_max = fmaxf(tile_max, score[b]);
        }
        // Key t0 is always visible, so the new max is finite and exp(-inf - max) below is 0.
        const float new_max = fmaxf(part.max, warp_max(tile_max));
        const float correction = expf(part.max - new_max);
        float row_sum = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) part.acc[e] *= correction;
#pragma unroll
        for (int b = 0; b < ATTN_BATCH; ++b) {
            const float w = expf(score[b] - new_max);
            float v[8];
            f16x8_to_f32(v8[b], v);
            row_sum += w;
#pragma unroll
            for (int e = 0; e < 8; ++e) part.acc[e] += w * v[e];
        }
        // Each row's weights are in all its row_lanes lanes: count them once.
        part.sum = part.sum * correction + warp_sum(chunk == 0 ? row_sum : 0.0f);
        part.max = new_max;
    }
    for (int offset = row_lanes; offset < 32; offset <<= 1)
#pragma unroll
        for (int e = 0; e < 8; ++e) part.acc[e] += __shfl_xor_sync(0xffffffffu, part.acc[e], offset);
    return part;
}

// Keys per split when a query's `keys` keys are spread over `splits` warps (flash-decoding):
// multiples of 32 (whole tiles for heads of 64 to 256 dims), so that only the last split ends in
// a partial tile. The splits past the keys get none.
__device__ __forceinline__ int keys_per_split(int keys, int splits) {
    return splits == 1 ? keys : (((keys - 1) / splits + 32) & ~31);
}

// Split `split` of `splits` of task (query, head) number `task` of `tasks`, whose query sees
// `keys` keys: writes the normalized output oh when the keys took one split, else its part to
// `partials` for model_attention_combine: the parts' outputs ([tasks][splits][head_dim]) and then
// their (max, sum) pairs ([tasks][splits]). With several splits, split 0 also tells the combine
// how many parts the task has (0: none, oh is written).
__device__ __forceinline__ void attend_split(const f16_t* __restrict__ qh, const f16_t* __restrict__ kh,
                                             const f16_t* __restrict__ vh, int keys, int kv_width, int head_dim,
                                             float scale, int task, int tasks, int split, int splits,
                                             float* __restrict__ partials, u32_t* __restrict__ parts,
                                             f16_t* __restrict__ oh) {
    const int lane = threadIdx.x & 31;
    const int span = keys_per_split(keys, splits), used = (keys - 1) / span + 1;
    if (split == 0 && splits > 1 && lane == 0) parts[task] = used > 1 ? used : 0;
    if (split >= used) return;
    const int first = split * span;
    const SoftmaxPart part =
        attend_keys(qh, kh, vh, first, first + min(span, keys - first), kv_width, head_dim, scale);
    // Lanes 0..head_dim / 8 - 1 hold the sums of dims 8 · lane..; the others copies of them.
    if (lane >= head_dim / 8) return;
    if (used == 1) {
        ((uint4*)oh)[lane] = f32x8_to_f16(part.acc, 1.0f / part.sum);
        return;
    }
    const u64_t p = (u64_t)task * splits + split;
    float4* acc = (float4*)(partials + p * head_dim) + 2 * lane;
    acc[0] = make_float4(part.acc[0], part.acc[1], part.acc[2], part.acc[3]);
    acc[1] = make_float4(part.acc[4], part.acc[5], part.acc[6], part.acc[7]);
    if (lane == 0) ((float2*)(partials + (u64_t)tasks * splits * head_dim))[p] = make_float2(part.max, part.sum);
}

// Causal attention with grouped KV heads for prefill (many queries) and decode (one) alike:
// out[t][h] = softmax(q[t][h] · K_gᵀ · scale over keys 0..=past + t) · V_g, g = h / (heads /
// kv_heads). q and out are [queries][heads·d]; the caches [positions][kv_heads·d] hold at least
// past + queries rows. One warp per (query, split, head), see attend_split; a block's warps are
// consecutive heads of one query and split, so heads that share a KV head read the same rows at
// about the same time.
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)
    model_attention(const f16_t* __restrict__ q, const f16_t* __restrict__ k_cache, const f16_t* __restrict__ v_cache,
                    int queries, int past, int heads, int kv_heads, int head_dim, float scale, int splits,
                    float* __restrict__ partials, u32_t* __restrict__ parts, f16_t* __restrict__ out) {
    const int warp = threadIdx.x >> 5;
    const int w = blockIdx.x * ATTN_WARPS + warp;
    if (w >= queries * splits * heads) return; // whole warps leave: the shuffles see all 32 lanes
    const int h = w % heads, ts = w / heads, split = ts % splits, t = ts / splits;
    const int g = h / (heads / kv_heads), task = t * heads + h;
    const int kv_width = kv_heads * head_dim;
    const u64_t at = (u64_t)task * head_dim;
    attend_split(q + at, k_cache + g * head_dim, v_cache + g * head_dim, past + t + 1, kv_width, head_dim, scale, task,
                 queries * heads, split, splits, partials, parts, out + at);
}

// One decode step of a batch: sequence b's query (row b of q, [sequences][heads·d]) at
// positions[b] attends to keys 0..=positions[b] of its own cache, rows [b · capacity, (b + 1) ·
// capacity) of the layer's caches; out is [sequences][heads·d]. A position at or past
// `capacity` (which the host checks) gives NaNs and reads nothing. Warps as model_attention's.
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)
    model_attention_decode(const f16_t* __restrict__ q, const f16_t* __restrict__ k_cache,
                           const f16_t* __restrict__ v_cache, const u32_t* __restrict__ positions, int capacity,
                           int sequences, int heads, int kv_heads, int head_dim, float scale, int splits,
                           float* __restrict__ partials, u32_t* __restrict__ parts, f16_t* __restrict__ out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int w = blockIdx.x * ATTN_WARPS + warp;
    if (w >= sequences * splits * heads) return; // whole warps leave: the shuffles see all 32 lanes
    const int h = w % heads, bs = w / heads, split = bs % splits, b = bs / splits;
    const int g = h / (heads / kv_heads), task = b * heads + h;
    const int kv_width = kv_heads * head_dim;
    const u64_t at = (u64_t)task * head_dim;
    const u32_t position = positions[b];
    if (position >= (u32_t)capacity) {
        if (split == 0) {
            for (int i = lane; i < head_dim; i += 32) out[at + i] = (f16_t)0x7e00u;
            if (splits > 1 && lane == 0) parts[task] = 0;
        }
        return;
    }
    const u64_t first = (u64_t)b * capacity * kv_width + g * head_dim;
    attend_split(q + at, k_cache + first, v_cache + first, (int)position + 1, kv_width, head_dim, scale, task,
                 sequences * heads, split, splits, partials, parts, out + at);
}

// The splits of each task (query, head) that took several, merged exactly: with parts (m_i, l_i,
// acc_i), out = Σ_i e^(m_i − m) · acc_i / Σ_i e^(m_i − m) · l_i, m = max_i m_i, which is the
// softmax over all the task's keys times V. One warp per task, a lane per 8 dims; out is
// [tasks][head_dim].
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)
    model_attention_combine(const float* __restrict__ partials, const u32_t* __restrict__ parts, int tasks,
                            int head_dim, int splits, f16_t* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const int task = blockIdx.x * ATTN_WARPS + (threadIdx.x >> 5);
    if (task >= tasks) return; // whole warps leave: the shuffles see all 32 lanes
    const int used = (int)parts[task];
    if (used == 0) return;
    const u64_t first = (u64_t)task * splits;
    const float2* stats = (const float2*)(partials + (u64_t)tasks * splits * head_dim) + first;
    float m = MODEL_NEG_INF;
    for (int i = lane; i < used; i += 32) m = fmaxf(m, stats[i].x);
    m = warp_max(m);
    float total = 0.0f;
    for (int i = lane; i < used; i += 32) total += expf(stats[i].x - m) * stats[i].y;
    total = warp_sum(total);
    if (lane >= head_dim / 8) return;
    float o[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    const float* acc = partials + first * head_dim + 8 * lane;
#pragma unroll 4
    for (int i = 0; i < used; ++i) {
        const float weight = expf(stats[i].x - m);
        const float4 lo = ((const float4*)(acc + (u64_t)i * head_dim))[0];
        const float4 hi = ((const float4*)(acc + (u64_t)i * head_dim))[1];
        const float a[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] += weight * a[e];
    }
    ((uint4*)(out + (u64_t)task * head_dim))[lane] = f32x8_to_f16(o, 1.0f / total);
}
