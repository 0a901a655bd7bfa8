// MixQ on NVIDIA tensor cores: INT8 MMA over the bulk of the channels, FP16 MMA over the few
// outlier channels, both accumulated into one set of registers and written once.
//
// Layouts (host side: src/mixq.rs builds them):
// - activations: xq int8 [m][k_pad] row-major, outlier channels zeroed, per-token scale sx[m];
//   outlier channels gathered in order into xo f16 [m][ko_pad].
// - weights, "fragment-major": for each 8-row tile of W and each 512-byte chunk of k, lane l's
//   16 bytes are exactly the B fragments lane l feeds to mma.sync, so a warp reads 512
//   contiguous bytes and needs no shuffle. A chunk holds 64 k of int8 (W8: two k32 steps),
//   128 k of packed int4 (W4: four k32 steps) or 32 k of f16 (outliers: two k16 steps).
//   Lane l = 4g + t serves weight row g; its registers hold k = 4t..4t+3 and 16+4t..16+4t+3
//   of each k32 step (f16: 2t, 2t+1 and 8+2t, 8+2t+1 of each k16 step).
// - W8: per-row scale sw[n_pad]. W4: scale sw and zero point wz per (row, group of 128·G k);
//   weights are unsigned nibbles, unpacked to q - zero in registers (Hopper's INT4 MMA is
//   emulated and slower than INT8: 4-bit weights always compute in INT8).

#define BK 128 // k per pipeline stage: 128 bytes of int8 activations per row
#define CHUNK 512

// ---------------------------------------------------------------------------------------------
// Producer: normalise (or SiLU-gate) a row, find its amax over the non-outlier channels,
// quantize those to int8 and gather the outliers into xo, in one kernel. One block per row.

enum { PRODUCE_PLAIN = 0, PRODUCE_RMSNORM = 1, PRODUCE_SILU_MUL = 2 };

template <int MODE>
__device__ __forceinline__ float produced(const f16_t* a, const f16_t* b, int k, float rinv) {
    const float x = f16_to_f32(a[k]);
    if (MODE == PRODUCE_RMSNORM) return x * rinv * f16_to_f32(b[k]);
    if (MODE == PRODUCE_SILU_MUL) return x / (1.0f + __expf(-x)) * f16_to_f32(b[k]);
    return x;
}

template <int MODE>
__device__ void mixq_produce(const f16_t* __restrict__ a, const f16_t* __restrict__ b, int lda, int k_len,
                             float eps, const int* __restrict__ slot, int ko, int k_pad, int ko_pad,
                             i8_t* __restrict__ xq, float* __restrict__ sx, f16_t* __restrict__ xo,
                             float threshold, u32_t* __restrict__ over_threshold) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    a += (u64_t)row * lda;
    if (MODE == PRODUCE_SILU_MUL) b += (u64_t)row * lda;
    float rinv = 1.0f;
    if (MODE == PRODUCE_RMSNORM) {
        float sumsq = 0.0f;
        for (int k = threadIdx.x; k < k_len; k += blockDim.x) {
            const float x = f16_to_f32(a[k]);
            sumsq += x * x;
        }
        rinv = rsqrtf(block_reduce<false>(sumsq, scratch) / k_len + eps);
    }
    float amax = 0.0f;
    for (int k = threadIdx.x; k < k_len; k += blockDim.x)
        if (slot[k] < 0) amax = fmaxf(amax, fabsf(produced<MODE>(a, b, k, rinv)));
    amax = block_reduce<true>(amax, scratch);
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    const float inv = 1.0f / scale;
    if (threadIdx.x == 0) {
        sx[row] = scale;
        if (amax > threshold) atomicAdd(over_threshold, 1u);
    }
    i8_t* q = xq + (u64_t)row * k_pad;
    f16_t* o = xo + (u64_t)row * ko_pad;
    for (int k = threadIdx.x; k < k_pad; k += blockDim.x) {
        int value = 0;
        if (k < k_len) {
            const float y = produced<MODE>(a, b, k, rinv);
            const int s = slot[k];
            if (s >= 0) o[s] = f32_to_f16(y);
            else value = max(-127, min(127, __float2int_rn(y * inv)));
        }
        q[k] = (i8_t)value;
    }
    for (int j = ko + threadIdx.x; j < ko_pad; j += blockDim.x) o[j] = 0;
}

#define PRODUCE_ARGS                                                                                     \
    const f16_t *a, const f16_t *b, int lda, int k_len, float eps, const int *slot, int ko, int k_pad, \
        int ko_pad, i8_t *xq, float *sx, f16_t *xo, float threshold, u32_t *over_threshold
#define PRODUCE_PASS a, b, lda, k_len, eps, slot, ko, k_pad, ko_pad, xq, sx, xo, threshold, over_threshold

extern "C" __global__ void mixq_produce_plain(PRODUCE_ARGS) { mixq_produce<PRODUCE_PLAIN>(PRODUCE_PASS); }
extern "C" __global__ void mixq_produce_rmsnorm(PRODUCE_ARGS) { mixq_produce<PRODUCE_RMSNORM>(PRODUCE_PASS); }
extern "C" __global__ void mixq_produce_silu_mul(PRODUCE_ARGS) { mixq_produce<PRODUCE_SILU_MUL>(PRODUCE_PASS); }

// ---------------------------------------------------------------------------------------------
// Tiled GEMM for many tokens: y[m][n] = sx[m] * (W8: sw[n] * Σ xq·wq | W4: Σ_groups sw·Σ xq·(q-z))
//                                       + Σ xo·wo,
// a BM x BN tile per block, STAGES-deep cp.async pipeline over k, warps of MT x NT mma tiles.

struct GemmArgs {
    const i8_t* xq;
    const float* sx;
    const f16_t* xo;
    const u8_t* wq;
    const float* sw;
    const u8_t* wz;
    const u8_t* wo;
    f16_t* y;
    int m, n, k_pad, ko_pad, group_tiles;
};

// A: BM rows x 128 bytes; 16-byte chunk c of row r lives at chunk c ^ (r & 7), so the 8 rows an
// ldmatrix reads fall in 8 different bank groups.
template <int BM, int THREADS>
__device__ __forceinline__ void load_a_tile(u8_t* s, const u8_t* src, u64_t row_bytes, int m0, int m) {
    static_assert(BM * 8 % THREADS == 0, "whole 16-byte chunks per thread");
#pragma unroll
    for (int it = 0; it < BM * 8 / THREADS; ++it) {
        const int i = threadIdx.x + it * THREADS, r = i >> 3, c = i & 7;
        const bool valid = m0 + r < m;
        const u8_t* g = src + (valid ? (u64_t)(m0 + r) * row_bytes : 0) + c * 16;
        cp_async16(s + r * BK + ((c ^ (r & 7)) << 4), g, valid);
    }
}

// B: BN/8 weight tiles of TILE_BYTES each, copied as they lie (fragment-major).
template <int BN, int TILE_BYTES, int THREADS>
__device__ __forceinline__ void load_b_tile(u8_t* s, const u8_t* src, u64_t tile_stride, int nt0, int n_tiles) {
    constexpr int PER_TILE = TILE_BYTES / 16;
    static_assert((BN / 8) * PER_TILE % THREADS == 0, "whole 16-byte chunks per thread");
#pragma unroll
    for (int it = 0; it < (BN / 8) * PER_TILE / THREADS; ++it) {
        const int i = threadIdx.x + it * THREADS, t = i / PER_TILE, off = (i % PER_TILE) * 16;
        const bool valid = nt0 + t < n_tiles;
        cp_async16(s + t * TILE_BYTES + off, src + (valid ? (u64_t)(nt0 + t) * tile_stride : 0) + off, valid);
    }
}

template <int MT>
__device__ __forceinline__ void load_a_frags(u32_t (&a)[MT][4], const u8_t* sA, int warp_row, int step, int lane) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int r = warp_row + mt * 16 + (lane & 15);
        const int c = 2 * step + (lane >> 4);
        ldmatrix_x4(a[mt], sA + r * BK + ((c ^ (r & 7)) << 4));
    }
}

template <int WM, int WN, int MT, int NT, int STAGES, bool W4>
__device__ __forceinline__ void mixq_gemm_tiled(const GemmArgs& p) {
    constexpr int THREADS = WM * WN * 32;
    constexpr int BM = WM * MT * 16, BN = WN * NT * 8;
    constexpr int B_TILE = W4 ? CHUNK : 2 * CHUNK; // bytes of one weight tile per stage
    constexpr int A_BYTES = BM * BK, B_BYTES = (BN / 8) * 2 * CHUNK;
    constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
    extern __shared__ __align__(128) u8_t smem[];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warp_m = warp / WN, warp_n = warp % WN;
    const int m0 = blockIdx.y * BM, nt0 = blockIdx.x * (BN / 8);
    const int n_tiles = (p.n + 7) >> 3, k_tiles = p.k_pad / BK;
    const int g = lane >> 2, t = lane & 3;
    const int warp_row = warp_m * MT * 16;
    const u8_t* xq = (const u8_t*)p.xq;

    int acc[MT][NT][4];
    float out[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0, out[i][j][r] = 0.0f;

    auto load_stage = [&](int stage, int kt) {
        u8_t* s = smem + stage * STAGE_BYTES;
        load_a_tile<BM, THREADS>(s, xq + kt * BK, p.k_pad, m0, p.m);
        load_b_tile<BN, B_TILE, THREADS>(s + A_BYTES, p.wq + (u64_t)kt * B_TILE, (u64_t)k_tiles * B_TILE, nt0, n_tiles);
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        cp_async_commit();
    }

    const int groups = W4 ? (k_tiles + p.group_tiles - 1) / p.group_tiles : 1;
    u32_t zero4[NT];
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < k_tiles) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
        cp_async_commit();

        const u8_t* sA = smem + (kt % STAGES) * STAGE_BYTES;
        const u8_t* sB = sA + A_BYTES;
        if (W4 && kt % p.group_tiles == 0) {
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int row = (nt0 + warp_n * NT + j) * 8 + g;
                zero4[j] = row < n_tiles * 8 ? p.wz[(u64_t)row * groups + kt / p.group_tiles] * 0x01010101u : 0;
            }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            uint4 wv[NT];
#pragma unroll
            for (int j = 0; j < NT; ++j)
                wv[j] = *(const uint4*)(sB + (warp_n * NT + j) * B_TILE + (W4 ? 0 : half * CHUNK) + lane * 16);
#pragma unroll
            for (int step2 = 0; step2 < 2; ++step2) {
                const int step = half * 2 + step2;
                u32_t a[MT][4];
                load_a_frags<MT>(a, sA, warp_row, step, lane);
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    u32_t b0, b1;
                    if (W4) {
                        const u32_t packed = step == 0 ? wv[j].x : step == 1 ? wv[j].y : step == 2 ? wv[j].z : wv[j].w;
                        unpack_w4(packed, zero4[j], b0, b1);
                    } else {
                        b0 = step2 == 0 ? wv[j].x : wv[j].z;
                        b1 = step2 == 0 ? wv[j].y : wv[j].w;
                    }
#pragma unroll
                    for (int i = 0; i < MT; ++i) mma_s8(acc[i][j], a[i], b0, b1);
                }
            }
            if (W4) break; // one 512-byte chunk covers all four k32 steps of a stage
        }
        if (W4 && ((kt + 1) % p.group_tiles == 0 || kt + 1 == k_tiles)) {
            const int group = kt / p.group_tiles;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int col = (nt0 + warp_n * NT + j) * 8 + 2 * t;
                const bool valid = col < n_tiles * 8;
                const float s0 = valid ? p.sw[(u64_t)col * groups + group] : 0.0f;
                const float s1 = valid ? p.sw[(u64_t)(col + 1) * groups + group] : 0.0f;
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    out[i][j][0] += s0 * (float)acc[i][j][0];
                    out[i][j][1] += s1 * (float)acc[i][j][1];
                    out[i][j][2] += s0 * (float)acc[i][j][2];
                    out[i][j][3] += s1 * (float)acc[i][j][3];
                    acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0;
                }
            }
        }
    }
    cp_async_wait<0>();

    // Dequantize in registers: token scale, and for W8 the channel scale.
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int r0 = m0 + warp_row + i * 16 + g;
        const float x0 = r0 < p.m ? p.sx[r0] : 0.0f, x1 = r0 + 8 < p.m ? p.sx[r0 + 8] : 0.0f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int col = (nt0 + warp_n * NT + j) * 8 + 2 * t;
            const bool valid = col < n_tiles * 8;
            const float w0 = W4 ? 1.0f : (valid ? p.sw[col] : 0.0f), w1 = W4 ? 1.0f : (valid ? p.sw[col + 1] : 0.0f);
            out[i][j][0] = x0 * w0 * (W4 ? out[i][j][0] : (float)acc[i][j][0]);
            out[i][j][1] = x0 * w1 * (W4 ? out[i][j][1] : (float)acc[i][j][1]);
            out[i][j][2] = x1 * w0 * (W4 ? out[i][j][2] : (float)acc[i][j][2]);
            out[i][j][3] = x1 * w1 * (W4 ? out[i][j][3] : (float)acc[i][j][3]);
        }
    }

    // Outlier channels: FP16 MMA accumulating onto the dequantized values.
    const int ko_tiles = p.ko_pad / 64;
    for (int ot = 0; ot < ko_tiles; ++ot) {
        __syncthreads(); // every warp is done with the stage about to be overwritten
        load_a_tile<BM, THREADS>(smem, (const u8_t*)p.xo + ot * BK, (u64_t)p.ko_pad * 2, m0, p.m);
        load_b_tile<BN, 2 * CHUNK, THREADS>(smem + A_BYTES, p.wo + (u64_t)ot * 2 * CHUNK, (u64_t)ko_tiles * 2 * CHUNK,
                                            nt0, n_tiles);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            uint4 wv[NT];
#pragma unroll
            for (int j = 0; j < NT; ++j) wv[j] = *(const uint4*)(smem + A_BYTES + (warp_n * NT + j) * 2 * CHUNK + half * CHUNK + lane * 16);
#pragma unroll
            for (int step2 = 0; step2 < 2; ++step2) {
                u32_t a[MT][4];
                load_a_frags<MT>(a, smem, warp_row, half * 2 + step2, lane);
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int i = 0; i < MT; ++i)
                        mma_f16(out[i][j], a[i], step2 == 0 ? wv[j].x : wv[j].z, step2 == 0 ? wv[j].y : wv[j].w);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int col = (nt0 + warp_n * NT + j) * 8 + 2 * t;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + warp_row + i * 16 + g + 8 * h;
                if (row >= p.m || col >= p.n) continue;
                f16_t* dst = p.y + (u64_t)row * p.n + col;
                if (col + 1 < p.n && (p.n & 1) == 0) {
                    *(u32_t*)dst = (u32_t)f32_to_f16(out[i][j][2 * h]) | ((u32_t)f32_to_f16(out[i][j][2 * h + 1]) << 16);
                } else {
                    dst[0] = f32_to_f16(out[i][j][2 * h]);
                    if (col + 1 < p.n) dst[1] = f32_to_f16(out[i][j][2 * h + 1]);
                }
            }
        }
}

template <int WM, int WN, int MT, int NT, int STAGES, bool W4>
constexpr int tiled_smem_bytes() {
    return STAGES * (WM * MT * 16 * BK + WN * NT * 2 * CHUNK);
}

#define TILED(NAME, WM, WN, MT, NT, STAGES, W4)                                                            \
    extern "C" __global__ void __launch_bounds__(WM * WN * 32) NAME(GemmArgs p) {                          \
        mixq_gemm_tiled<WM, WN, MT, NT, STAGES, W4>(p);                                                     \
    }
TILED(mixq_w8_128x128, 2, 4, 4, 4, 4, false)
TILED(mixq_w8_128x256, 2, 4, 4, 8, 3, false)
TILED(mixq_w4_128x128, 2, 4, 4, 4, 4, true)

// ---------------------------------------------------------------------------------------------
// GEMV for up to 16 tokens, where reading the weights is the cost: one 8-row weight tile per
// block, its k split over the block's warps, activations read as mma fragments straight from
// global memory (they are small and stay in cache), partial sums reduced through shared memory.

template <bool W4>
__device__ __forceinline__ void mixq_gemv(const GemmArgs& p) {
    constexpr int WARPS = 8;
    __shared__ float partial[WARPS][32][4];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x;
    const int col = tile * 8 + 2 * t;
    const int chunk_k = W4 ? 128 : 64;
    const int chunks = p.k_pad / chunk_k;
    const int groups = W4 ? (p.k_pad / BK + p.group_tiles - 1) / p.group_tiles : 1;
    const bool row0 = g < p.m, row1 = g + 8 < p.m;
    const u8_t* x0 = (const u8_t*)p.xq + (u64_t)g * p.k_pad + 4 * t;
    const u8_t* x1 = x0 + (u64_t)8 * p.k_pad;
    const uint4* w = (const uint4*)(p.wq + (u64_t)tile * chunks * CHUNK) + lane;

    float out[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int acc[4] = {0, 0, 0, 0};
#pragma unroll 4
    for (int c = warp; c < chunks; c += WARPS) {
        const uint4 wv = __ldg(w + (u64_t)c * (CHUNK / 16));
        u32_t zero4 = 0;
        if (W4) zero4 = p.wz[(u64_t)(tile * 8 + g) * groups + c / p.group_tiles] * 0x01010101u;
#pragma unroll
        for (int step = 0; step < (W4 ? 4 : 2); ++step) {
            const int kb = c * chunk_k + 32 * step;
            u32_t a[4];
            a[0] = row0 ? *(const u32_t*)(x0 + kb) : 0;
            a[1] = row1 ? *(const u32_t*)(x1 + kb) : 0;
            a[2] = row0 ? *(const u32_t*)(x0 + kb + 16) : 0;
            a[3] = row1 ? *(const u32_t*)(x1 + kb + 16) : 0;
            u32_t b0, b1;
            if (W4) {
                unpack_w4(step == 0 ? wv.x : step == 1 ? wv.y : step == 2 ? wv.z : wv.w, zero4, b0, b1);
            } else {
                b0 = step == 0 ? wv.x : wv.z;
                b1 = step == 0 ? wv.y : wv.w;
            }
            mma_s8(acc, a, b0, b1);
        }
        if (W4) { // each chunk is one group's slice: fold it with the group's scales
            const int group = c / p.group_tiles;
            const float s0 = p.sw[(u64_t)col * groups + group], s1 = p.sw[(u64_t)(col + 1) * groups + group];
            out[0] += s0 * (float)acc[0];
            out[1] += s1 * (float)acc[1];
            out[2] += s0 * (float)acc[2];
            out[3] += s1 * (float)acc[3];
            acc[0] = acc[1] = acc[2] = acc[3] = 0;
        }
    }
    const float xs0 = row0 ? p.sx[g] : 0.0f, xs1 = row1 ? p.sx[g + 8] : 0.0f;
    const float ws0 = W4 ? 1.0f : p.sw[col], ws1 = W4 ? 1.0f : p.sw[col + 1];
    out[0] = xs0 * ws0 * (W4 ? out[0] : (float)acc[0]);
    out[1] = xs0 * ws1 * (W4 ? out[1] : (float)acc[1]);
    out[2] = xs1 * ws0 * (W4 ? out[2] : (float)acc[2]);
    out[3] = xs1 * ws1 * (W4 ? out[3] : (float)acc[3]);

    const int o_chunks = p.ko_pad / 32;
    const f16_t* o0 = p.xo + (u64_t)g * p.ko_pad + 2 * t;
    const f16_t* o1 = o0 + (u64_t)8 * p.ko_pad;
    const uint4* wo = (const uint4*)(p.wo + (u64_t)tile * o_chunks * CHUNK) + lane;
    for (int c = warp; c < o_chunks; c += WARPS) {
        const uint4 wv = __ldg(wo + (u64_t)c * (CHUNK / 16));
#pragma unroll
        for (int step = 0; step < 2; ++step) {
            const int kb = c * 32 + 16 * step;
            u32_t a[4];
            a[0] = row0 ? *(const u32_t*)(o0 + kb) : 0;
            a[1] = row1 ? *(const u32_t*)(o1 + kb) : 0;
            a[2] = row0 ? *(const u32_t*)(o0 + kb + 8) : 0;
            a[3] = row1 ? *(const u32_t*)(o1 + kb + 8) : 0;
            mma_f16(out, a, step == 0 ? wv.x : wv.z, step == 0 ? wv.y : wv.w);
        }
    }

#pragma unroll
    for (int r = 0; r < 4; ++r) partial[warp][lane][r] = out[r];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        float sum = 0.0f;
#pragma unroll
        for (int w2 = 0; w2 < WARPS; ++w2) sum += partial[w2][lane][r];
        const int row = g + 8 * (r >> 1), c2 = col + (r & 1);
        if (row < p.m && c2 < p.n) p.y[(u64_t)row * p.n + c2] = f32_to_f16(sum);
    }
}

extern "C" __global__ void __launch_bounds__(256) mixq_w8_gemv(GemmArgs p) { mixq_gemv<false>(p); }
extern "C" __global__ void __launch_bounds__(256) mixq_w4_gemv(GemmArgs p) { mixq_gemv<true>(p); }
