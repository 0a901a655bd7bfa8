// MixQ on NVIDIA tensor cores: INT8 MMA over the bulk of the channels, FP16 MMA over the few
// outlier channels, both accumulated into one set of registers and written once.
//
// Layouts (host side: src/mixq.rs builds them), all row-major with k contiguous ("K-major", what
// both mma.sync and wgmma want for 8-bit operands):
// - activations: xq int8 [m][k_pad], outlier channels zeroed, per-token scale sx[m]; the outlier
//   channels gathered in order into xo f16 [m][ko_pad]. k_pad is a multiple of 128, ko_pad of 64.
// - W8: wq int8 [n_pad][k_pad], per-row scale sw[n_pad].
// - W4: wq holds each row's k_pad / 2 bytes as 64-byte slices (128 k), the 8 rows of a tile
//   side by side: slice c of tile j is the 512 bytes at (j · k_pad / 128 + c) · 512, row r of the
//   tile at r · 64 in it (a warp streaming a tile reads whole 512-byte runs). In each 32-k block
//   (16 bytes) byte j holds k = j in its low nibble and k = j + 16 in its high one, so four bytes
//   unpack (q - zero, in registers) into exactly the two registers of an m16n8k32 fragment. Scale sw and zero point wz per (row, group
//   of 128·group_tiles k), group-major: sw[group][n_pad], wz[group][n_pad]. Hopper's INT4 MMA is emulated and slower than INT8: 4-bit weights
//   always compute in INT8.
// - outlier weights: wo f16 [n_pad][ko_pad].

#define BK 128 // k per pipeline stage: 128 bytes of int8 activations per row
#define CHUNK 512

// ---------------------------------------------------------------------------------------------
// Producer: normalise (or SiLU-gate) a row, find its amax over the non-outlier channels,
// quantize those to int8 and gather the outliers into xo, in one kernel. One block per row, of
// as many threads as hold the row in registers (up to 1024).

// The inputs are the model's own buffers: PLAIN reads f16 rows (the attention output),
// RMSNORM the f32 residual stream with an f32 weight, SILU_MUL f16 rows holding the gate then the
// up projection (one GEMM's output).
enum { PRODUCE_PLAIN = 0, PRODUCE_RMSNORM = 1, PRODUCE_SILU_MUL = 2 };

template <int MODE>
__device__ __forceinline__ float produced(const void* row, const void* gamma, int k, int k_len, float rinv) {
    if (MODE == PRODUCE_RMSNORM) return ((const float*)row)[k] * rinv * ((const float*)gamma)[k];
    const float x = f16_to_f32(((const f16_t*)row)[k]);
    if (MODE == PRODUCE_SILU_MUL) return x / (1.0f + __expf(-x)) * f16_to_f32(((const f16_t*)row)[k_len + k]);
    return x;
}

// Values a thread holds in registers: rows of up to 1024 x PRODUCE_PER values are read from
// memory once, all loads of a thread in flight together (at one row per block, a decode step's
// row, a loop of dependent loads would wait out a memory latency per element). Longer rows loop.
constexpr int PRODUCE_PER = 16;

template <int MODE>
__device__ void mixq_produce(const void* __restrict__ x, const float* __restrict__ gamma, int k_len, float eps,
                             const int* __restrict__ slot, int ko, int k_pad, int ko_pad, i8_t* __restrict__ xq,
                             float* __restrict__ sx, f16_t* __restrict__ xo, float threshold,
                             u32_t* __restrict__ over_threshold) {
    __shared__ float scratch[32];
    launch_dependents(); // the GEMM after this may start streaming its weights
    const int row = blockIdx.x, threads = blockDim.x;
    const void* in = MODE == PRODUCE_RMSNORM ? (const void*)((const float*)x + (u64_t)row * k_len)
                                             : (const void*)((const f16_t*)x + (u64_t)row * k_len * (MODE == PRODUCE_SILU_MUL ? 2 : 1));
    i8_t* q = xq + (u64_t)row * k_pad;
    f16_t* o = xo + (u64_t)row * ko_pad;
    const bool in_registers = k_len <= threads * PRODUCE_PER;
    // In registers: value i of the thread is channel threadIdx.x + i · threads; bit i of
    // `outlier` marks the channels of the outlier set.
    float v[PRODUCE_PER];
    u32_t outlier = 0;
    float rinv = 1.0f, amax = 0.0f;
    if (in_registers) {
        float sumsq = 0.0f;
#pragma unroll
        for (int i = 0; i < PRODUCE_PER; ++i) {
            const int k = threadIdx.x + i * threads;
            v[i] = 0.0f;
            if (k < k_len) {
                v[i] = MODE == PRODUCE_RMSNORM ? ((const float*)in)[k] : produced<MODE>(in, gamma, k, k_len, 1.0f);
                outlier |= (u32_t)(slot[k] >= 0) << i;
                sumsq += v[i] * v[i];
            }
        }
        if (MODE == PRODUCE_RMSNORM) {
            rinv = rsqrtf(block_reduce<false>(sumsq, scratch) / k_len + eps);
#pragma unroll
            for (int i = 0; i < PRODUCE_PER; ++i) {
                const int k = threadIdx.x + i * threads;
                if (k < k_len) v[i] *= rinv * gamma[k];
            }
        }
#pragma unroll
        for (int i = 0; i < PRODUCE_PER; ++i)
            if (!(outlier >> i & 1)) amax = fmaxf(amax, fabsf(v[i]));
    } else {
        if (MODE == PRODUCE_RMSNORM) {
            float sumsq = 0.0f;
            for (int k = threadIdx.x; k < k_len; k += threads) {
                const float value = ((const float*)in)[k];
                sumsq += value * value;
            }
            rinv = rsqrtf(block_reduce<false>(sumsq, scratch) / k_len + eps);
        }
        for (int k = threadIdx.x; k < k_len; k += threads)
            if (slot[k] < 0) amax = fmaxf(amax, fabsf(produced<MODE>(in, gamma, k, k_len, rinv)));
    }
    amax = block_reduce<true>(amax, scratch);
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    const float inv = 1.0f / scale;
    if (threadIdx.x == 0) {
        sx[row] = scale;
        if (amax > threshold) atomicAdd(over_threshold, 1u);
    }
    // Channel k's int8 (0 at outlier channels and the padding), its f16 at its outlier slot.
    auto store = [&](int k, float y, bool is_outlier) {
        if (is_outlier) o[slot[k]] = f32_to_f16(y);
        q[k] = is_outlier ? 0 : (i8_t)max(-127, min(127, __float2int_rn(y * inv)));
    };
    if (in_registers) {
#pragma unroll
        for (int i = 0; i < PRODUCE_PER; ++i) {
            const int k = threadIdx.x + i * threads;
            if (k < k_len) store(k, v[i], outlier >> i & 1);
        }
    } else {
        for (int k = threadIdx.x; k < k_len; k += threads) store(k, produced<MODE>(in, gamma, k, k_len, rinv), slot[k] >= 0);
    }
    for (int k = k_len + threadIdx.x; k < k_pad; k += threads) q[k] = 0;
    for (int j = ko + threadIdx.x; j < ko_pad; j += threads) o[j] = 0;
}

#define PRODUCE_ARGS                                                                                           \
    const void *x, const float *gamma, int k_len, float eps, const int *slot, int ko, int k_pad, int ko_pad, \
        i8_t *xq, float *sx, f16_t *xo, float threshold, u32_t *over_threshold
#define PRODUCE_PASS x, gamma, k_len, eps, slot, ko, k_pad, ko_pad, xq, sx, xo, threshold, over_threshold

extern "C" __global__ void __launch_bounds__(1024) mixq_produce_plain(PRODUCE_ARGS) { mixq_produce<PRODUCE_PLAIN>(PRODUCE_PASS); }
extern "C" __global__ void __launch_bounds__(1024) mixq_produce_rmsnorm(PRODUCE_ARGS) { mixq_produce<PRODUCE_RMSNORM>(PRODUCE_PASS); }
extern "C" __global__ void __launch_bounds__(1024) mixq_produce_silu_mul(PRODUCE_ARGS) { mixq_produce<PRODUCE_SILU_MUL>(PRODUCE_PASS); }

// ---------------------------------------------------------------------------------------------
// GEMM for many tokens: y[m][n] = sx[m] · (W8: sw[n] · Σ xq·wq | W4: Σ_groups sw · Σ xq·(q − z))
//                                 + Σ xo·wo.

struct GemmArgs {
    const i8_t* xq;
    const float* sx;
    const f16_t* xo;
    const u8_t* wq;
    const float* sw;
    const u8_t* wz;
    const f16_t* wo;
    f16_t* y;
    int m, n, k_pad, ko_pad, group_tiles;
};

// A tile of ROWS rows x ROW_BYTES bytes (128 or 64) starting at column byte `col` of a row-major
// matrix; 16-byte chunk c of row r is stored at chunk c ^ swizzle(r), so the 8 rows an ldmatrix
// (or wgmma) reads fall in 8 different bank groups. Rows at or past `rows` are zero-filled.
template <int ROW_BYTES>
__device__ __forceinline__ int swizzled(int r, int c) {
    return r * ROW_BYTES + ((ROW_BYTES == 128 ? c ^ (r & 7) : c ^ ((r >> 1) & 3)) << 4);
}

template <int ROWS, int ROW_BYTES, int THREADS>
__device__ __forceinline__ void load_tile(u8_t* s, const u8_t* src, u64_t stride, int r0, int rows, int col) {
    constexpr int CHUNKS = ROW_BYTES / 16;
    static_assert(ROWS * CHUNKS % THREADS == 0, "whole 16-byte chunks per thread");
#pragma unroll
    for (int it = 0; it < ROWS * CHUNKS / THREADS; ++it) {
        const int i = threadIdx.x + it * THREADS, r = i / CHUNKS, c = i % CHUNKS;
        const bool valid = r0 + r < rows;
        cp_async16(s + swizzled<ROW_BYTES>(r, c), src + (valid ? (u64_t)(r0 + r) * stride : 0) + col + c * 16, valid);
    }
}

// W4's k tile kt (one 64-byte slice a row) of rows n0 .. n0 + ROWS: one 512-byte run per tile.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_w4_tile(u8_t* s, const u8_t* wq, int slices, int n0, int rows, int kt) {
    static_assert(ROWS * 4 % THREADS == 0, "whole 16-byte chunks per thread");
#pragma unroll
    for (int it = 0; it < ROWS * 4 / THREADS; ++it) {
        const int i = threadIdx.x + it * THREADS, r = i / 4, c = i % 4;
        const bool valid = n0 + r < rows;
        const u64_t at = valid ? ((u64_t)((n0 + r) / 8) * slices + kt) * 512 + (r % 8) * 64 + c * 16 : 0;
        cp_async16(s + swizzled<64>(r, c), wq + at, valid);
    }
}

// Stores a pair of adjacent outputs (c, c + 1) of row `row`, each only if inside the matrix.
__device__ __forceinline__ void store_pair(const GemmArgs& p, int row, int col, float v0, float v1) {
    if (row >= p.m || col >= p.n) return;
    f16_t* dst = p.y + (u64_t)row * p.n + col;
    if (col + 1 < p.n && (p.n & 1) == 0) {
        *(u32_t*)dst = (u32_t)f32_to_f16(v0) | ((u32_t)f32_to_f16(v1) << 16);
    } else {
        dst[0] = f32_to_f16(v0);
        if (col + 1 < p.n) dst[1] = f32_to_f16(v1);
    }
}

// Block -> output tile, in groups of 8 tile rows: the blocks running at once then share a few
// activation row tiles and weight column tiles, which stay in L2 instead of being re-read from
// device memory once per tile row.
__device__ __forceinline__ void tile_of_block(int bm, int bn, int m, int n, int& m0, int& n0) {
    constexpr int GROUP = 8;
    const int tiles_m = (m + bm - 1) / bm, tiles_n = (n + bn - 1) / bn;
    const int id = blockIdx.x, group = id / (GROUP * tiles_n);
    const int first = group * GROUP, size = min(tiles_m - first, GROUP);
    m0 = (first + id % size) * bm;
    n0 = (id % (GROUP * tiles_n)) / size * bn;
}

// Portable tiled kernel (mma.sync, sm_80 and later): BM x BN per block, 8 warps of 64 x 32,
// STAGES-deep cp.async pipeline, 128 k per stage.
template <int STAGES, bool W4>
__device__ __forceinline__ void mixq_gemm_mma(const GemmArgs& p) {
    constexpr int WM = 2, WN = 4, MT = 4, NT = 4, THREADS = 256;
    constexpr int BM = WM * MT * 16, BN = WN * NT * 8;
    constexpr int B_ROW = W4 ? 64 : 128;
    constexpr int A_BYTES = BM * BK, B_BYTES = BN * BK; // B sized for the FP16 outlier stage
    constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
    extern __shared__ __align__(128) u8_t smem[];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warp_m = warp / WN, warp_n = warp % WN;
    int m0, n0;
    tile_of_block(BM, BN, p.m, p.n, m0, n0);
    const int n_pad = (p.n + 7) & ~7, k_tiles = p.k_pad / BK;
    const int g = lane >> 2, t = lane & 3;
    const int warp_row = warp_m * MT * 16, warp_col = warp_n * NT * 8;
    const u64_t w_stride = W4 ? p.k_pad / 2 : p.k_pad;

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
        load_tile<BM, BK, THREADS>(s, (const u8_t*)p.xq, p.k_pad, m0, p.m, kt * BK);
        if (W4) load_w4_tile<BN, THREADS>(s + A_BYTES, p.wq, k_tiles, n0, n_pad, kt);
        else load_tile<BN, B_ROW, THREADS>(s + A_BYTES, p.wq, w_stride, n0, n_pad, kt * B_ROW);
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        cp_async_commit();
    }

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
                const int row = n0 + warp_col + j * 8 + g;
                zero4[j] = row < n_pad ? p.wz[(u64_t)(kt / p.group_tiles) * n_pad + row] * 0x01010101u : 0;
            }
        }
        u32_t packed[NT][4]; // W4: one ldmatrix.x4 brings a tile's four k32 steps
        if (W4) {
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int r = warp_col + j * 8 + (lane & 7);
                ldmatrix_x4(packed[j], sB + swizzled<64>(r, lane >> 3));
            }
        }
#pragma unroll
        for (int step = 0; step < 4; ++step) {
            u32_t a[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int r = warp_row + i * 16 + (lane & 15);
                ldmatrix_x4(a[i], sA + swizzled<128>(r, 2 * step + (lane >> 4)));
            }
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                u32_t b[4]; // b0, b1 of tile j, then of tile j + 1
                if (W4) {
                    unpack_w4(packed[j][step], zero4[j], b[0], b[1]);
                    unpack_w4(packed[j + 1][step], zero4[j + 1], b[2], b[3]);
                } else {
                    const int r = warp_col + j * 8 + (lane & 7) + ((lane >> 4) << 3);
                    ldmatrix_x4(b, sB + swizzled<128>(r, 2 * step + ((lane >> 3) & 1)));
                }
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    mma_s8(acc[i][j], a[i], b[0], b[1]);
                    mma_s8(acc[i][j + 1], a[i], b[2], b[3]);
                }
            }
        }
        if (W4 && ((kt + 1) % p.group_tiles == 0 || kt + 1 == k_tiles)) {
            const int group = kt / p.group_tiles;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int col = n0 + warp_col + j * 8 + 2 * t;
                const bool valid = col < n_pad;
                const float s0 = valid ? p.sw[(u64_t)group * n_pad + col] : 0.0f;
                const float s1 = valid ? p.sw[(u64_t)group * n_pad + col + 1] : 0.0f;
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
            const int col = n0 + warp_col + j * 8 + 2 * t;
            const bool valid = col < n_pad;
            const float w0 = W4 ? 1.0f : (valid ? p.sw[col] : 0.0f), w1 = W4 ? 1.0f : (valid ? p.sw[col + 1] : 0.0f);
            out[i][j][0] = x0 * w0 * (W4 ? out[i][j][0] : (float)acc[i][j][0]);
            out[i][j][1] = x0 * w1 * (W4 ? out[i][j][1] : (float)acc[i][j][1]);
            out[i][j][2] = x1 * w0 * (W4 ? out[i][j][2] : (float)acc[i][j][2]);
            out[i][j][3] = x1 * w1 * (W4 ? out[i][j][3] : (float)acc[i][j][3]);
        }
    }

    // Outlier channels: FP16 MMA accumulating onto the dequantized values, 64 channels a stage.
    for (int ot = 0; ot < p.ko_pad / 64; ++ot) {
        __syncthreads(); // every warp is done with the stage about to be overwritten
        load_tile<BM, BK, THREADS>(smem, (const u8_t*)p.xo, (u64_t)p.ko_pad * 2, m0, p.m, ot * BK);
        load_tile<BN, BK, THREADS>(smem + A_BYTES, (const u8_t*)p.wo, (u64_t)p.ko_pad * 2, n0, n_pad, ot * BK);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int step = 0; step < 4; ++step) {
            u32_t a[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int r = warp_row + i * 16 + (lane & 15);
                ldmatrix_x4(a[i], smem + swizzled<128>(r, 2 * step + (lane >> 4)));
            }
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                u32_t b[4];
                const int r = warp_col + j * 8 + (lane & 7) + ((lane >> 4) << 3);
                ldmatrix_x4(b, smem + A_BYTES + swizzled<128>(r, 2 * step + ((lane >> 3) & 1)));
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    mma_f16(out[i][j], a[i], b[0], b[1]);
                    mma_f16(out[i][j + 1], a[i], b[2], b[3]);
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int row = m0 + warp_row + i * 16 + g, col = n0 + warp_col + j * 8 + 2 * t;
            store_pair(p, row, col, out[i][j][0], out[i][j][1]);
            store_pair(p, row + 8, col, out[i][j][2], out[i][j][3]);
        }
}

extern "C" __global__ void __launch_bounds__(256) mixq_w8_mma(GemmArgs p) { mixq_gemm_mma<4, false>(p); }
extern "C" __global__ void __launch_bounds__(256) mixq_w4_mma(GemmArgs p) { mixq_gemm_mma<4, true>(p); }

// Hopper kernel for W8 with the copy engine, persistent: each block (or cluster of CLUSTER
// blocks, which share the weight tile: each fetches 1/CLUSTER of it and the copy engine multicasts
// it into all of them) walks 128 x BN output tiles. One producer warpgroup issues the copies of
// a STAGES-deep ring that runs on across tiles, so the next tile's loads overlap this tile's
// epilogue; two consumer warpgroups (64 rows each) run the wgmma's. full/empty mbarriers per
// stage pass the stages around (the empty ones count every block's consumers, since a multicast
// lands in all of them). The outlier tiles come through the same ring after each tile's k tiles.
struct TmaArgs {
    const float* sx;
    const float* sw;
    const u8_t* wz; // W4's zero points
    f16_t* y;
    int m, n, k_tiles, ko_tiles, group_tiles;
    int staged; // 1: the output leaves through shared memory and map_y (n a multiple of 8)
    // Split k (W8, few tiles): each tile's k tiles in `splits` parts, one work unit each, whose
    // f32 sums meet in `partial` (per unit 128 x BN); `arrivals` counts a tile's finished parts
    // per consumer warpgroup (zero between launches: the last part resets it).
    int splits;
    // Split k in two, the parts of a tile a cluster of two blocks (block 2t + part): the second
    // part adds its sums into the first's shared memory instead of through the workspace.
    int split_pairs;
    float* partial;
    int* arrivals;
};
// Staged output: per consumer warpgroup two 64 x 64 f16 boxes (128-byte swizzle), so that one
// is filled while the copy engine still reads the other.
constexpr int STORE_BOX_BYTES = 64 * 128;
constexpr int STAGING_BYTES = 2 * 2 * STORE_BOX_BYTES;
#ifdef ANYQ_WGMMA

// wgmma over a 64 x BN block (BN 64, 128, 192 or 256).
template <int BN>
__device__ __forceinline__ void wgmma_s8(int* d, u64_t a, u64_t b, int accumulate) {
    if (BN == 256) wgmma_s8_n256(d, a, b, accumulate);
    else if (BN == 192) wgmma_s8_n192(d, a, b, accumulate);
    else if (BN == 128) wgmma_s8_n128(d, a, b, accumulate);
    else wgmma_s8_n64(d, a, b, accumulate);
}
template <int BN>
__device__ __forceinline__ void wgmma_f16(float* d, u64_t a, u64_t b) {
    if (BN == 256) wgmma_f16_n256(d, a, b);
    else if (BN == 192) wgmma_f16_n192(d, a, b);
    else if (BN == 128) wgmma_f16_n128(d, a, b);
    else wgmma_f16_n64(d, a, b);
}

__device__ __forceinline__ void warpgroup_barrier(int id) { asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory"); }

// Ring step `it` of a TMA kernel's consumer warpgroup cw: once its stage has landed, the four
// k32 wgmma's of the stage's 128 k (`mma(a, b, step)` with the descriptors of warpgroup cw's 64
// rows of the A tile and of the B tile), committed as one group.
template <int STAGES, int BN, typename Mma>
__device__ __forceinline__ void wgmma_stage(u32_t ring, u32_t full, int it, int cw, Mma mma) {
    constexpr int STAGE_BYTES = (128 + BN) * BK;
    const int s = it % STAGES;
    mbar_wait(full + 8 * s, (it / STAGES) & 1);
    const u32_t a_base = ring + s * STAGE_BYTES + cw * 64 * BK, b_base = ring + s * STAGE_BYTES + 128 * BK;
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < 4; ++step) mma(sw128_desc(a_base + 32 * step), sw128_desc(b_base + 32 * step), step);
    wgmma_commit();
}

// `out` holds the dequantized products of the thread's rows r (+ 8) of its warpgroup's 64 (from
// m_wg) and columns n0 + 8j + 2t (+ 1). The outlier tiles that follow a tile's k tiles in the
// ring, FP16 wgmma's onto `out`:
template <int STAGES, int BN, typename Release>
__device__ __forceinline__ void outlier_tiles(float* out, int& it, int tiles, u32_t ring, u32_t full, int cw,
                                              Release release) {
    for (int ot = 0; ot < tiles; ++ot, ++it) {
        wgmma_stage<STAGES, BN>(ring, full, it, cw, [&](u64_t a, u64_t b, int) { wgmma_f16<BN>(out, a, b); });
        wgmma_wait<0>();
        release(it);
    }
}

// Split k: a part leaves its sums (the thread's `out`, in fragment order, for the thread at the
// same place of another block to read back) in the workspace, and the last of a tile's parts to
// arrive adds the others' to its own and stores the tile: whether this one does.
template <int BN>
__device__ __forceinline__ bool gather_splits(float* out, const TmaArgs& p, int tile, int split, int cw) {
    constexpr int ACC = BN / 2;
    __shared__ int last[2];
    const int ct = threadIdx.x & 127, slot = 2 * tile + cw;
    float* sums = p.partial + (u64_t)slot * p.splits * ACC * 128 + ct;
#pragma unroll
    for (int i = 0; i < ACC; ++i) __stcg(sums + (split * ACC + i) * 128, out[i]);
    __threadfence();
    warpgroup_barrier(2 + cw);
    if (ct == 0) {
        const bool is_last = atomicAdd(p.arrivals + slot, 1) == p.splits - 1;
        if (is_last) p.arrivals[slot] = 0;
        last[cw] = is_last;
    }
    warpgroup_barrier(2 + cw);
    if (!last[cw]) return false;
    __threadfence();
    for (int s = 0; s < p.splits; ++s) {
        if (s == split) continue;
#pragma unroll
        for (int i = 0; i < ACC; ++i) out[i] += __ldcg(sums + (s * ACC + i) * 128);
    }
    return true;
}

// Split k in clusters of two: once both parts' k tiles are done (the first part's ring then
// idle), the second writes its sums into the first's ring through distributed shared memory, and
// the first adds them. Every thread of both blocks passes both cluster barriers: whether this
// block stores the tile.
template <int BN>
__device__ __forceinline__ bool add_pair_sums(float* out, u32_t ring, int split, int cw) {
    constexpr int VECS = BN / 8;
    const u32_t at = ring + (cw * VECS * 128 + (threadIdx.x & 127)) * 16;
    cluster_sync();
    if (split == 1) {
        const u32_t remote = cluster_map(at, 0);
#pragma unroll
        for (int v = 0; v < VECS; ++v)
            st_cluster_f32x4(remote + v * 128 * 16, out[4 * v], out[4 * v + 1], out[4 * v + 2], out[4 * v + 3]);
    }
    cluster_sync();
    if (split == 1) return false;
#pragma unroll
    for (int v = 0; v < VECS; ++v) {
        const float4 x = ld_shared_f32x4(at + v * 128 * 16);
        out[4 * v] += x.x, out[4 * v + 1] += x.y, out[4 * v + 2] += x.z, out[4 * v + 3] += x.w;
    }
    return true;
}

// f16 out, written once. Staged, the tile goes out in 64-column boxes through the copy engine,
// which drains them while the consumers go on with the next tile: stores straight from registers
// held the tensor pipe idle for about a fifth of a tile at k = 4096.
template <int BN>
__device__ __forceinline__ void store_tile(const float* out, const TmaArgs& p, const TensorMap& map_y, u32_t staging,
                                           int cw, int m_wg, int n0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, r = ((threadIdx.x >> 5) & 3) * 16 + g;
    if (p.staged) {
        const bool issuer = (threadIdx.x & 127) == 0;
#pragma unroll
        for (int b = 0; b < BN / 64; ++b) {
            const u32_t box = staging + (2 * cw + (b & 1)) * STORE_BOX_BYTES;
            // The store issued from this box two boxes ago must have read it.
            if (issuer) bulk_wait_read<1>();
            warpgroup_barrier(2 + cw);
            // Each stmatrix writes the warp's 16 rows of two 16-byte column chunks: matrices
            // (rows 0-7 | 8-15) x (chunk c | c + 1); lane 8q + i addresses row i of matrix q.
#pragma unroll
            for (int c = 0; c < 8; c += 2) {
                const int j = 8 * b + c, q = lane >> 3, row = (r & ~15) + (q & 1) * 8 + (lane & 7);
                const u32_t at = box + row * 128 + (((c + (q >> 1)) ^ (lane & 7)) << 4);
                stmatrix_x4(at, f32x2_to_f16x2(out[4 * j + 0], out[4 * j + 1]), f32x2_to_f16x2(out[4 * j + 2], out[4 * j + 3]),
                            f32x2_to_f16x2(out[4 * j + 4], out[4 * j + 5]), f32x2_to_f16x2(out[4 * j + 6], out[4 * j + 7]));
            }
            fence_proxy_async();
            warpgroup_barrier(2 + cw);
            if (issuer) {
                tma_store(&map_y, box, n0 + 64 * b, m_wg);
                bulk_commit();
            }
        }
        return;
    }
    GemmArgs q;
    q.y = p.y, q.m = p.m, q.n = p.n;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
        const int col = n0 + j * 8 + 2 * t;
        store_pair(q, m_wg + r, col, out[4 * j + 0], out[4 * j + 1]);
        store_pair(q, m_wg + r + 8, col, out[4 * j + 2], out[4 * j + 3]);
    }
}

// Split k: part `split` of a tile's k tiles cut into `splits` parts, [kt0, kt1).
__device__ __forceinline__ void k_part(int split, int splits, int k_tiles, int& kt0, int& kt1) {
    kt0 = split * k_tiles / splits, kt1 = (split + 1) * k_tiles / splits;
}

template <int CLUSTER, int STAGES, int BN>
__device__ __forceinline__ void mixq_w8_tma(const TensorMap& map_x, const TensorMap& map_w, const TensorMap& map_xo,
                                            const TensorMap& map_wo, const TensorMap& map_y, const TmaArgs& p) {
    constexpr int BM = 128, B_ROWS = BN / CLUSTER, ACC = BN / 2;
    constexpr int A_BYTES = BM * BK, STAGE_BYTES = (BM + BN) * BK;
    extern __shared__ __align__(128) u8_t smem_ring[];
    u8_t* smem = smem_ring + ((1024 - (smem_addr(smem_ring) & 1023)) & 1023);
    const u32_t ring = smem_addr(smem), staging = ring + STAGES * STAGE_BYTES;
    const u32_t full = staging + STAGING_BYTES, empty = full + 8 * STAGES;

    const int warp = threadIdx.x >> 5, wg = warp >> 2, lane = threadIdx.x & 31;
    const u32_t rank = CLUSTER > 1 ? cluster_rank() : 0;
    const int cluster = blockIdx.x / CLUSTER, clusters = gridDim.x / CLUSTER;
    const int tiles_m = (p.m + CLUSTER * BM - 1) / (CLUSTER * BM), tiles_n = (p.n + BN - 1) / BN;
    // Pairs never split k (the host's choice): compiled out of them, whose code it cost registers
    // and speed (10-15% at 256-1024 tokens).
    constexpr bool SPLIT = CLUSTER == 1;
    const int splits = SPLIT ? p.splits : 1;
    const int tiles = tiles_m * tiles_n, units = tiles * splits;
    // Tile index -> (first row of the cluster's rows, first column), in groups of 8 tile rows.
    auto coords = [&](int id, int& m0, int& n0) {
        const int group = id / (8 * tiles_n), first = group * 8, size = min(tiles_m - first, 8);
        m0 = (first + id % size) * CLUSTER * BM + rank * BM;
        n0 = (id % (8 * tiles_n)) / size * BN;
    };
    // Work unit -> its tile and the part of its k tiles, [kt0, kt1).
    const bool split_pairs = SPLIT && p.split_pairs;
    auto unit_of = [&](int unit, int& tile, int& split, int& kt0, int& kt1) {
        tile = SPLIT ? (split_pairs ? unit >> 1 : unit % tiles) : unit;
        split = SPLIT ? (split_pairs ? unit & 1 : unit / tiles) : 0;
        k_part(split, splits, p.k_tiles, kt0, kt1);
    };

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, 2 * CLUSTER); // 2 consumer warpgroups in each block
        }
        mbar_init_fence();
    }
    if (CLUSTER > 1) cluster_sync();
    else __syncthreads();
    // Launched with early start: the set-up above overlapped the previous kernel's end; what it
    // wrote (the activations) is read from here on.
    launch_dependents();
    grid_dependency_wait();

    if (wg == 0) {
        set_max_registers_dec<40>();
        if (threadIdx.x == 0) {
            int it = 0;
            for (int unit = cluster; unit < units; unit += clusters) {
                int tile, split, kt0, kt1, m0, n0;
                unit_of(unit, tile, split, kt0, kt1);
                coords(tile, m0, n0);
                // The unit's k tiles of int8, then (its tile's last part) the outlier tiles of 64
                // f16 channels (also 128 bytes a row).
                const int end = kt1 + (kt1 == p.k_tiles ? p.ko_tiles : 0);
                for (int kt = kt0; kt < end; ++kt, ++it) {
                    const int s = it % STAGES;
                    mbar_wait(empty + 8 * s, ((it / STAGES) & 1) ^ 1);
                    const u32_t bar = full + 8 * s, a = ring + s * STAGE_BYTES, b = a + A_BYTES + rank * B_ROWS * BK;
                    mbar_expect_bytes(bar, STAGE_BYTES);
                    const bool bulk = kt < p.k_tiles;
                    const int x = bulk ? kt * BK : (kt - p.k_tiles) * 64;
                    tma_load(a, bulk ? &map_x : &map_xo, x, m0, bar);
                    if (CLUSTER > 1) tma_load_multicast(b, bulk ? &map_w : &map_wo, x, n0 + rank * B_ROWS, bar, (1 << CLUSTER) - 1);
                    else tma_load(b, bulk ? &map_w : &map_wo, x, n0, bar);
                }
            }
        }
        // The consumers' two cluster barriers (a block has one unit then).
        if (split_pairs) {
            cluster_sync();
            cluster_sync();
        }
    } else {
        set_max_registers_inc<232>();
        // Broadcast from lane 0, so that the compiler knows it warp-uniform: the A tile's wgmma
        // descriptors, which depend on it, then stay on the uniform datapath.
        const int cw = __shfl_sync(0xffffffffu, wg - 1, 0), g = lane >> 2, t = lane & 3;
        const int n_pad = (p.n + 7) & ~7;
        const bool releaser = (threadIdx.x & 127) == 0;
        auto release = [&](int it) {
            if (!releaser) return;
            const u32_t bar = empty + 8 * (it % STAGES);
            if (CLUSTER == 1) mbar_arrive(bar);
            else
                for (int r = 0; r < CLUSTER; ++r) mbar_arrive_cluster(bar, r);
        };
        int it = 0;
        for (int unit = cluster; unit < units; unit += clusters) {
            int tile, split, kt0, kt1, m0, n0;
            unit_of(unit, tile, split, kt0, kt1);
            coords(tile, m0, n0);
            // Zeroed although the first wgmma overwrites it: otherwise the previous tile's
            // values count as read by it and stay live through the epilogue beside `out`.
            int acc[ACC];
#pragma unroll
            for (int i = 0; i < ACC; ++i) acc[i] = 0;
            for (int kt = kt0; kt < kt1; ++kt, ++it) {
                wgmma_stage<STAGES, BN>(ring, full, it, cw,
                                        [&](u64_t a, u64_t b, int step) { wgmma_s8<BN>(acc, a, b, kt - kt0 + step); });
                wgmma_wait<1>();
                if (kt > kt0) release(it - 1);
            }
            // The scales' loads go out while the last k tile's wgmma's finish.
            const int row0 = m0 + cw * 64 + (warp & 3) * 16 + g;
            const float x0 = row0 < p.m ? p.sx[row0] : 0.0f, x1 = row0 + 8 < p.m ? p.sx[row0 + 8] : 0.0f;
            float2 ws[BN / 8];
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const int col = n0 + j * 8 + 2 * t;
                ws[j] = col < n_pad ? __ldg((const float2*)(p.sw + col)) : make_float2(0.0f, 0.0f);
            }
            wgmma_wait<0>();
            release(it - 1);

            float out[ACC];
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const float2 w = ws[j];
                out[4 * j + 0] = x0 * w.x * (float)acc[4 * j + 0];
                out[4 * j + 1] = x0 * w.y * (float)acc[4 * j + 1];
                out[4 * j + 2] = x1 * w.x * (float)acc[4 * j + 2];
                out[4 * j + 3] = x1 * w.y * (float)acc[4 * j + 3];
            }
            const int m_wg = m0 + cw * 64;
            if (kt1 == p.k_tiles) outlier_tiles<STAGES, BN>(out, it, p.ko_tiles, ring, full, cw, release);
            // A warpgroup whose rows all lie past the tokens (few tokens) has nothing to store.
            if (split_pairs) {
                if (!add_pair_sums<BN>(out, ring, split, cw) || m_wg >= p.m) continue;
            } else if (m_wg >= p.m || (splits > 1 && !gather_splits<BN>(out, p, tile, split, cw))) continue;
            store_tile<BN>(out, p, map_y, staging, cw, m_wg, n0);
        }
        if (p.staged && (threadIdx.x & 127) == 0) bulk_wait_all();
    }
    // No block of a cluster may leave while the others' copies or arrivals may still target it.
    if (CLUSTER > 1) cluster_sync();
}
#endif

// A TMA kernel's entry point, `run` one of the templates above (empty where wgmma is missing).
#ifdef ANYQ_WGMMA
#define TMA_RUN(run) (run)(map_x, map_w, map_xo, map_wo, map_y, p);
#else
#define TMA_RUN(run)
#endif
#define TMA_KERNEL(name, run)                                                                                 \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                      \
        name(const __grid_constant__ TensorMap map_x, const __grid_constant__ TensorMap map_w,               \
             const __grid_constant__ TensorMap map_xo, const __grid_constant__ TensorMap map_wo,              \
             const __grid_constant__ TensorMap map_y, TmaArgs p) {                                            \
        TMA_RUN(run)                                                                                          \
    }

// The deepest rings that fit beside the staged output (8 x 24 KiB, 6 x 32 KiB, 4 x 40 KiB, 4 x 48
// KiB), to cover the latency of L2 at full rate. The 64-column tiles are for few tokens, where
// 128-column ones leave SMs idle (14336x4096: 32 tiles).
TMA_KERNEL(mixq_w8_tma_64, (mixq_w8_tma<1, 8, 64>))
TMA_KERNEL(mixq_w8_tma, (mixq_w8_tma<1, 6, 128>))
TMA_KERNEL(mixq_w8_tma_pair_128, (mixq_w8_tma<2, 6, 128>))
TMA_KERNEL(mixq_w8_tma_pair_192, (mixq_w8_tma<2, 4, 192>))
TMA_KERNEL(mixq_w8_tma_pair_256, (mixq_w8_tma<2, 4, 256>))

// Hopper kernel for W4, the W8 kernel's ring and wgmma's with 128 x 128 tiles (one block per
// tile): the weights arrive packed (half the bytes) with their groups' scales and zero points,
// and the consumers unpack each k tile to int8 (q − zero, in [-15, 15]) into one of three
// swizzled buffers, which the wgmma's read, while the previous k tile's wgmma's run. A group's
// scale differs per column and k tile, so each k tile's int32 products are added, scaled, into
// the f32 output once complete. Three buffers: the one a consumer fills was last read two k
// tiles ago, by wgmma's every consumer has seen complete before the barrier that ended the
// previous k tile's unpacking. Few tiles split k as the one-block W8 kernels do (the parts meet
// in the workspace).
#ifdef ANYQ_WGMMA
template <int STAGES>
__device__ __forceinline__ void mixq_w4_tma(const TensorMap& map_x, const TensorMap& map_w4, const TensorMap& map_xo,
                                            const TensorMap& map_wo, const TensorMap& map_y, const TmaArgs& p) {
    constexpr int BM = 128, BN = 128, ACC = BN / 2;
    constexpr int A_BYTES = BM * BK, STAGE_BYTES = (BM + BN) * BK, SIDE_BYTES = BN * 5;
    extern __shared__ __align__(128) u8_t smem_ring[];
    // STAGES x (A tile | B tile: packed W4 or the outliers' f16), 3 unpacked B tiles, the staged
    // output, STAGES side entries (the k tile's group's scales f32[BN] and zero points u8[BN]),
    // barriers.
    u8_t* smem = smem_ring + ((1024 - (smem_addr(smem_ring) & 1023)) & 1023);
    u8_t* unpacked = smem + STAGES * STAGE_BYTES;
    u8_t* sides = unpacked + 3 * BN * BK + STAGING_BYTES;
    const u32_t ring = smem_addr(smem), staging = smem_addr(unpacked + 3 * BN * BK);
    const u32_t full = smem_addr(sides + STAGES * SIDE_BYTES), empty = full + 8 * STAGES;

    const int warp = threadIdx.x >> 5, wg = warp >> 2, lane = threadIdx.x & 31;
    const int tiles_m = (p.m + BM - 1) / BM, tiles_n = (p.n + BN - 1) / BN;
    const int tiles = tiles_m * tiles_n, units = tiles * p.splits, n_pad = (p.n + 7) & ~7;
    // Tile index -> (first row, first column), in groups of 8 tile rows.
    auto coords = [&](int id, int& m0, int& n0) {
        const int group = id / (8 * tiles_n), first = group * 8, size = min(tiles_m - first, 8);
        m0 = (first + id % size) * BM;
        n0 = (id % (8 * tiles_n)) / size * BN;
    };
    // Work unit -> its tile and the part of its k tiles, [kt0, kt1).
    auto unit_of = [&](int unit, int& tile, int& split, int& kt0, int& kt1) {
        tile = unit % tiles, split = unit / tiles;
        k_part(split, p.splits, p.k_tiles, kt0, kt1);
    };

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full + 8 * s, 33); // the copies' expect_tx, then each producer lane's cp.async's
            mbar_init(empty + 8 * s, 2); // 2 consumer warpgroups
        }
        mbar_init_fence();
    }
    __syncthreads();
    // As the W8 kernel: early start, the activations read from here on.
    launch_dependents();
    grid_dependency_wait();

    if (wg == 0) {
        set_max_registers_dec<40>();
        if (warp != 0) return;
        int it = 0;
        for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
            int tile, split, kt0, kt1, m0, n0;
            unit_of(unit, tile, split, kt0, kt1);
            coords(tile, m0, n0);
            // The part's k tiles, then (the tile's last part) the outlier tiles.
            const int end = kt1 + (kt1 == p.k_tiles ? p.ko_tiles : 0);
            for (int kt = kt0; kt < end; ++kt, ++it) {
                const int s = it % STAGES;
                const bool bulk = kt < p.k_tiles;
                mbar_wait(empty + 8 * s, ((it / STAGES) & 1) ^ 1);
                if (lane == 0) {
                    const u32_t bar = full + 8 * s, a = ring + s * STAGE_BYTES, b = a + A_BYTES;
                    // Packed: BN / 8 tiles' 512-byte slices kt, side by side (8 KiB).
                    mbar_expect_bytes(bar, bulk ? A_BYTES + BN * 64 : STAGE_BYTES);
                    if (bulk) {
                        tma_load(a, &map_x, kt * BK, m0, bar);
                        tma_load(b, &map_w4, kt * 128, n0 / 8, bar);
                    } else {
                        const int x = (kt - p.k_tiles) * 64;
                        tma_load(a, &map_xo, x, m0, bar);
                        tma_load(b, &map_wo, x, n0, bar);
                    }
                }
                if (bulk) {
                    // The group's scales (16 bytes a lane) and zero points (8 a lane) of the
                    // block's columns; those past the matrix stay as they were (never stored).
                    const u64_t at = (u64_t)(kt / p.group_tiles) * n_pad + n0;
                    const u32_t side = smem_addr(sides + s * SIDE_BYTES);
                    if (n0 + 4 * lane < n_pad) cp_async_ca<16>(side + 16 * lane, p.sw + at + 4 * lane);
                    if (lane < 16 && n0 + 8 * lane < n_pad) cp_async_ca<8>(side + 4 * BN + 8 * lane, p.wz + at + 8 * lane);
                }
                cp_async_arrive(full + 8 * s);
            }
        }
    } else {
        set_max_registers_inc<232>();
        // Warp-uniform for the compiler, as in the W8 kernel.
        const int cw = __shfl_sync(0xffffffffu, wg - 1, 0), ct = threadIdx.x - 128, g = lane >> 2, t = lane & 3;
        auto release = [&](int it) {
            if ((threadIdx.x & 127) == 0) mbar_arrive(empty + 8 * (it % STAGES));
        };
        // Row r's 32-k block b of the packed k tile in stage s -> two swizzled int8 chunks.
        auto unpack = [&](int s, u8_t* dst) {
            const u8_t* packed = smem + s * STAGE_BYTES + A_BYTES;
            const u8_t* zeros = sides + s * SIDE_BYTES + 4 * BN;
#pragma unroll
            for (int u = ct; u < BN * 4; u += 256) {
                const int row = u >> 2, b = u & 3;
                const uint4 w = *(const uint4*)(packed + (row >> 3) * 512 + (row & 7) * 64 + 16 * b);
                // Per byte: (q + 128) − z never borrows; xor 128 leaves q − z in two's complement.
                const u32_t z4 = zeros[row] * 0x01010101u;
                auto lo = [&](u32_t v) { return (((v & 0x0f0f0f0fu) | 0x80808080u) - z4) ^ 0x80808080u; };
                auto hi = [&](u32_t v) { return ((((v >> 4) & 0x0f0f0f0fu) | 0x80808080u) - z4) ^ 0x80808080u; };
                *(uint4*)(dst + row * BK + (((2 * b) ^ (row & 7)) << 4)) = make_uint4(lo(w.x), lo(w.y), lo(w.z), lo(w.w));
                *(uint4*)(dst + row * BK + (((2 * b + 1) ^ (row & 7)) << 4)) = make_uint4(hi(w.x), hi(w.y), hi(w.z), hi(w.w));
            }
        };
        float out[ACC];
        // k tile's products, scaled by its group's column scales, into out.
        auto fold = [&](const int* acc, int s) {
            const float* scale = (const float*)(sides + s * SIDE_BYTES);
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const float2 sc = *(const float2*)(scale + j * 8 + 2 * t);
                out[4 * j + 0] += sc.x * (float)acc[4 * j + 0];
                out[4 * j + 1] += sc.y * (float)acc[4 * j + 1];
                out[4 * j + 2] += sc.x * (float)acc[4 * j + 2];
                out[4 * j + 3] += sc.y * (float)acc[4 * j + 3];
            }
        };
        int it = 0, unpacks = 0;
        for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
            int tile, split, kt0, kt1, m0, n0;
            unit_of(unit, tile, split, kt0, kt1);
            coords(tile, m0, n0);
            int acc[ACC];
#pragma unroll
            for (int i = 0; i < ACC; ++i) out[i] = 0.0f, acc[i] = 0;
            // k tile kt: unpacked while k tile kt - 1's wgmma's run, whose products are then
            // folded into out before kt's wgmma's overwrite them (reading them while wgmma's
            // are in flight would serialize those anyway).
            for (int kt = kt0; kt < kt1; ++kt, ++it, ++unpacks) {
                const int s = it % STAGES;
                mbar_wait(full + 8 * s, (it / STAGES) & 1);
                u8_t* b_tile = unpacked + (unpacks % 3) * BN * BK;
                unpack(s, b_tile);
                fence_proxy_async();
                asm volatile("bar.sync 1, 256;\n" ::: "memory");
                wgmma_wait<0>();
                if (kt > kt0) {
                    fold(acc, (it - 1) % STAGES);
                    release(it - 1);
                }
                const u32_t a_base = ring + s * STAGE_BYTES + cw * 64 * BK, b_base = smem_addr(b_tile);
                wgmma_fence();
#pragma unroll
                for (int step = 0; step < 4; ++step)
                    wgmma_s8<BN>(acc, sw128_desc(a_base + 32 * step), sw128_desc(b_base + 32 * step), step);
                wgmma_commit();
            }
            wgmma_wait<0>();
            fold(acc, (it - 1) % STAGES);
            release(it - 1);

            // Thread (warp w of its warpgroup, lane 4g + t) holds rows 16w + g (+ 8) and columns
            // 8j + 2t (+ 1) of its 64 x BN block: the tokens' scales, then the outliers.
            const int row0 = m0 + cw * 64 + (warp & 3) * 16 + g;
            const float x0 = row0 < p.m ? p.sx[row0] : 0.0f, x1 = row0 + 8 < p.m ? p.sx[row0 + 8] : 0.0f;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                out[4 * j + 0] *= x0;
                out[4 * j + 1] *= x0;
                out[4 * j + 2] *= x1;
                out[4 * j + 3] *= x1;
            }
            if (kt1 == p.k_tiles) outlier_tiles<STAGES, BN>(out, it, p.ko_tiles, ring, full, cw, release);
            if (p.splits > 1 && !gather_splits<BN>(out, p, tile, split, cw)) continue;
            store_tile<BN>(out, p, map_y, staging, cw, m0 + cw * 64, n0);
        }
        if (p.staged && (threadIdx.x & 127) == 0) bulk_wait_all();
    }
}
#endif

TMA_KERNEL(mixq_w4_tma, (mixq_w4_tma<4>))

// ---------------------------------------------------------------------------------------------
// GEMV for up to 16 tokens, where reading the weights is the cost. Each lane reads 16 contiguous
// bytes of its weight row and the matching 16 (W4: 2 x 16) bytes of activations, both straight
// from global memory: since Σ_k is order-free, the k of each mma fragment slot only has to agree
// between the two operands, not follow the fragment's own order.

// Loads as volatile asm, so that ptxas keeps them where they are written, ahead of the (volatile)
// mma's; weights are read once: they stream past L1, so that the activations (read by every warp)
// stay there.
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
__device__ __forceinline__ float2 load_cached_f2(const float* p) {
    float2 v;
    asm volatile("ld.global.nc.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "l"(p));
    return v;
}
__device__ __forceinline__ u32_t load_cached_u16(const u8_t* p) {
    unsigned short v;
    asm volatile("ld.global.nc.u16 %0, [%1];\n" : "=h"(v) : "l"(p));
    return v;
}

// One slice's operands for one lane: weights, the activations of rows g (and g + 8 when there
// are more than 8 tokens), W4's zero points of the lane's two output columns (one per byte) and
// scales.
template <bool ROWS16>
struct Slice {
    uint4 w, a0, b0, a1, b1;
    u32_t zeros;
    float2 scale;
};

// Blocks loop over groups of 8 / split weight tiles (a persistent grid: no ragged last wave);
// `split` warps share a tile, each streaming every split-th slice of its k, the next slice's loads
// in flight while one computes (more slices in flight cost registers, hence warps, and measured
// slower). Rows past the tokens need no zeroing: an mma row only reaches the same output row,
// and those are never stored. W4 multiplies the unsigned nibbles and takes zero · Σx off
// afterwards (Σx from an mma against ones): cheaper than unpacking to q − zero.
template <bool W4, bool ROWS16>
__device__ __forceinline__ void mixq_gemv(const GemmArgs& p, int split) {
    constexpr int WARPS = 8;
    __shared__ float partial[WARPS][32][4];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3, part = warp % split;
    const int n_tiles = (p.n + 7) >> 3, n_pad = n_tiles * 8;
    const int chunk_k = W4 ? 128 : 64; // k per 64-byte slice of a weight row
    const int slices = p.k_pad / chunk_k;
    const bool row0 = g < p.m, row1 = ROWS16 && g + 8 < p.m;
    const u8_t* x0 = (const u8_t*)p.xq + (u64_t)min(g, p.m - 1) * p.k_pad;
    const u8_t* x1 = (const u8_t*)p.xq + (u64_t)min(g + 8, p.m - 1) * p.k_pad;
    const u8_t* o0 = (const u8_t*)(p.xo + (u64_t)min(g, p.m - 1) * p.ko_pad) + 16 * t;
    const u8_t* o1 = (const u8_t*)(p.xo + (u64_t)min(g + 8, p.m - 1) * p.ko_pad) + 16 * t;
    const float xs0 = row0 ? p.sx[g] : 0.0f, xs1 = row1 ? p.sx[g + 8] : 0.0f;

    for (int first = blockIdx.x * (WARPS / split); first < n_tiles; first += gridDim.x * (WARPS / split)) {
        const int tile = first + warp / split;
        const bool live = tile < n_tiles;
        const int row = tile * 8 + g, col = tile * 8 + 2 * t;
        const int chunks = live ? slices : 0;
        // W8: row-major; W4: tile-interleaved, the warp's 8 rows of a slice in one 512-byte run.
        const u8_t* w = W4 ? p.wq + (u64_t)tile * slices * 512 + 16 * lane : p.wq + (u64_t)row * p.k_pad + 16 * t;
        auto load = [&](int c, Slice<ROWS16>& sl) {
            sl.w = load_stream(w + c * (W4 ? 512 : 64));
            // W4: lane t holds the 32-k block t of the slice, k = 32t + j (low nibbles) and + 16
            // (high); W8: k = 16t .. 16t + 15, words 0, 1 feeding step 0 and 2, 3 step 1.
            const int kb = W4 ? c * 128 + 32 * t : c * 64 + 16 * t;
            sl.a0 = __ldg((const uint4*)(x0 + kb));
            if (W4) sl.b0 = __ldg((const uint4*)(x0 + kb + 16));
            if (ROWS16) sl.a1 = __ldg((const uint4*)(x1 + kb));
            if (W4 && ROWS16) sl.b1 = __ldg((const uint4*)(x1 + kb + 16));
            if (W4) {
                const u64_t group = p.group_tiles == 1 ? c : c / p.group_tiles;
                sl.zeros = load_cached_u16(p.wz + group * n_pad + col);
                sl.scale = load_cached_f2(p.sw + group * n_pad + col);
            }
        };

        float out[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int acc[4] = {0, 0, 0, 0};
        Slice<ROWS16> cur, next;
        if (part < chunks) load(part, cur);
        for (int c = part; c < chunks; c += split) {
            if (c + split < chunks) load(c + split, next);
            const uint4 a1 = ROWS16 ? cur.a1 : cur.a0;
            if (W4) {
                const uint4 b1 = ROWS16 ? cur.b1 : cur.b0;
                const u32_t wk[4] = {cur.w.x, cur.w.y, cur.w.z, cur.w.w};
                const u32_t l0[4] = {cur.a0.x, cur.a0.y, cur.a0.z, cur.a0.w}, h0[4] = {cur.b0.x, cur.b0.y, cur.b0.z, cur.b0.w};
                const u32_t l1[4] = {a1.x, a1.y, a1.z, a1.w}, h1[4] = {b1.x, b1.y, b1.z, b1.w};
                int sum[4] = {0, 0, 0, 0};
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    const u32_t a[4] = {l0[s], l1[s], h0[s], h1[s]};
                    mma_s8(acc, a, wk[s] & 0x0f0f0f0fu, (wk[s] >> 4) & 0x0f0f0f0fu);
                    mma_s8(sum, a, 0x01010101u, 0x01010101u);
                }
                const int z0 = cur.zeros & 0xff, z1 = cur.zeros >> 8;
                out[0] += cur.scale.x * (float)(acc[0] - z0 * sum[0]);
                out[1] += cur.scale.y * (float)(acc[1] - z1 * sum[1]);
                out[2] += cur.scale.x * (float)(acc[2] - z0 * sum[2]);
                out[3] += cur.scale.y * (float)(acc[3] - z1 * sum[3]);
                acc[0] = acc[1] = acc[2] = acc[3] = 0;
            } else {
                const u32_t s0[4] = {cur.a0.x, a1.x, cur.a0.y, a1.y}, s1[4] = {cur.a0.z, a1.z, cur.a0.w, a1.w};
                mma_s8(acc, s0, cur.w.x, cur.w.y);
                mma_s8(acc, s1, cur.w.z, cur.w.w);
            }
            cur = next;
        }
        if (live) {
            const float w0 = W4 ? 1.0f : p.sw[col], w1 = W4 ? 1.0f : p.sw[col + 1];
            out[0] = xs0 * w0 * (W4 ? out[0] : (float)acc[0]);
            out[1] = xs0 * w1 * (W4 ? out[1] : (float)acc[1]);
            out[2] = xs1 * w0 * (W4 ? out[2] : (float)acc[2]);
            out[3] = xs1 * w1 * (W4 ? out[3] : (float)acc[3]);
        }

        // Outliers: 32 channels (64 bytes) per slice; lane t holds channels 8t .. 8t + 7.
        const u8_t* wo = (const u8_t*)(p.wo + (u64_t)row * p.ko_pad) + 16 * t;
        for (int c = part; live && c < p.ko_pad / 32; c += split) {
            const uint4 wv = __ldg((const uint4*)(wo + c * 64));
            const uint4 a0 = __ldg((const uint4*)(o0 + c * 64));
            const uint4 a1 = ROWS16 ? __ldg((const uint4*)(o1 + c * 64)) : a0;
            const u32_t s0[4] = {a0.x, a1.x, a0.y, a1.y}, s1[4] = {a0.z, a1.z, a0.w, a1.w};
            mma_f16(out, s0, wv.x, wv.y);
            mma_f16(out, s1, wv.z, wv.w);
        }

#pragma unroll
        for (int r = 0; r < 4; ++r) partial[warp][lane][r] = out[r];
        __syncthreads();
        if (part == 0 && live) {
            float sum[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                sum[r] = 0.0f;
                for (int w2 = warp; w2 < warp + split; ++w2) sum[r] += partial[w2][lane][r];
            }
            store_pair(p, g, col, sum[0], sum[1]);
            store_pair(p, g + 8, col, sum[2], sum[3]);
        }
        __syncthreads(); // partial is reused by the next group
    }
}

// Separate kernels for up to 8 and up to 16 tokens: the first needs half the registers.
extern "C" __global__ void __launch_bounds__(256) mixq_w8_gemv8(GemmArgs p, int split) { mixq_gemv<false, false>(p, split); }
extern "C" __global__ void __launch_bounds__(256) mixq_w8_gemv16(GemmArgs p, int split) { mixq_gemv<false, true>(p, split); }
extern "C" __global__ void __launch_bounds__(256) mixq_w4_gemv8(GemmArgs p, int split) { mixq_gemv<true, false>(p, split); }
extern "C" __global__ void __launch_bounds__(256) mixq_w4_gemv16(GemmArgs p, int split) { mixq_gemv<true, true>(p, split); }

// W4A8 GEMV for up to 4 tokens with dp4a instead of mma: an m16n8k32 mma would compute 16 token
// rows of which 1-4 are real, and its fragment bookkeeping costs issue slots that a memory-bound
// kernel needs for loads. Each lane owns one weight row's 32-k block of a slice (the same
// tile-interleaved 16 bytes as the mma GEMV), dots it with each token's 32 activations, and takes
// zero · Σx off per group; the 4 lanes of a row and the `split` warps of a tile then add up.
template <int TOKENS>
__device__ __forceinline__ void mixq_w4_gemv_dp4a(const GemmArgs& p, int split) {
    constexpr int WARPS = 8;
    __shared__ float partial[WARPS][32][TOKENS];
    // The tokens' outlier activations, read by every warp: once into shared memory.
    extern __shared__ __align__(16) f16_t outlier_x[];
    for (int i = threadIdx.x; i < p.m * p.ko_pad; i += blockDim.x) outlier_x[i] = p.xo[i];
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3, part = warp % split;
    const int n_tiles = (p.n + 7) >> 3, n_pad = n_tiles * 8;
    const int slices = p.k_pad / 128;

    for (int first = blockIdx.x * (WARPS / split); first < n_tiles; first += gridDim.x * (WARPS / split)) {
        const int tile = first + warp / split;
        const bool live = tile < n_tiles;
        const int row = tile * 8 + g;
        const int chunks = live ? slices : 0;
        const u8_t* w = p.wq + (u64_t)tile * slices * 512 + 16 * lane;
        float out[TOKENS];
#pragma unroll
        for (int m = 0; m < TOKENS; ++m) out[m] = 0.0f;
        // The warp's first outlier weights (lane t: channels 8t .. 8t + 7 of a 32-channel slice),
        // fetched now so that their latency hides behind the main loop.
        const bool outliers = live && part < p.ko_pad / 32;
        uint4 wo = outliers ? __ldg((const uint4*)(p.wo + (u64_t)row * p.ko_pad + part * 32 + 8 * t)) : make_uint4(0, 0, 0, 0);
        uint4 wv = chunks > part ? load_stream(w + part * 512) : make_uint4(0, 0, 0, 0);
        for (int c = part; c < chunks; c += split) {
            const uint4 cur = wv;
            if (c + split < chunks) wv = load_stream(w + (c + split) * 512);
            const u64_t group = p.group_tiles == 1 ? c : c / p.group_tiles;
            const int zero = p.wz[group * n_pad + row];
            const float scale = p.sw[group * n_pad + row];
            const u32_t wk[4] = {cur.x, cur.y, cur.z, cur.w};
#pragma unroll
            for (int m = 0; m < TOKENS; ++m) {
                if (m >= p.m) break;
                // Token m's k = 32t + 0..15 (low nibbles) and 32t + 16..31 (high).
                const u8_t* x = (const u8_t*)p.xq + (u64_t)m * p.k_pad + c * 128 + 32 * t;
                const uint4 lo = __ldg((const uint4*)x), hi = __ldg((const uint4*)(x + 16));
                const u32_t xl[4] = {lo.x, lo.y, lo.z, lo.w}, xh[4] = {hi.x, hi.y, hi.z, hi.w};
                int dot = 0, sum = 0;
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    dot = __dp4a((int)(wk[s] & 0x0f0f0f0fu), (int)xl[s], dot);
                    dot = __dp4a((int)((wk[s] >> 4) & 0x0f0f0f0fu), (int)xh[s], dot);
                    sum = __dp4a(0x01010101, (int)xl[s], sum);
                    sum = __dp4a(0x01010101, (int)xh[s], sum);
                }
                out[m] += scale * (float)(dot - zero * sum);
            }
        }
#pragma unroll
        for (int m = 0; m < TOKENS; ++m) out[m] *= m < p.m ? p.sx[m] : 0.0f;
        for (int c = part; outliers && c < p.ko_pad / 32; c += split) {
            if (c != part) wo = __ldg((const uint4*)(p.wo + (u64_t)row * p.ko_pad + c * 32 + 8 * t));
            const f16_t* wh = (const f16_t*)&wo;
#pragma unroll
            for (int m = 0; m < TOKENS; ++m) {
                if (m >= p.m) break;
                const uint4 xo = *(const uint4*)(outlier_x + m * p.ko_pad + c * 32 + 8 * t);
                const f16_t* xh = (const f16_t*)&xo;
#pragma unroll
                for (int j = 0; j < 8; ++j) out[m] += f16_to_f32(xh[j]) * f16_to_f32(wh[j]);
            }
        }
        // The row's 4 lanes, then the tile's `split` warps.
#pragma unroll
        for (int m = 0; m < TOKENS; ++m) {
            out[m] += __shfl_xor_sync(0xffffffffu, out[m], 1);
            out[m] += __shfl_xor_sync(0xffffffffu, out[m], 2);
            partial[warp][lane][m] = out[m];
        }
        __syncthreads();
        if (part == 0 && live && t == 0 && row < p.n) {
            for (int m = 0; m < TOKENS && m < p.m; ++m) {
                float total = 0.0f;
                for (int w2 = warp; w2 < warp + split; ++w2) total += partial[w2][lane][m];
                p.y[(u64_t)m * p.n + row] = f32_to_f16(total);
            }
        }
        __syncthreads(); // partial is reused by the next group
    }
}

extern "C" __global__ void __launch_bounds__(256) mixq_w4_gemv_dp4a(GemmArgs p, int split) { mixq_w4_gemv_dp4a<4>(p, split); }

// ---------------------------------------------------------------------------------------------
// W4A8 GEMV for up to 16 tokens on Hopper, its weights streamed into shared memory by the copy
// engine: bytes in flight cost no registers, so one block per SM keeps a 128 KiB ring in flight
// (HBM's loaded latency x bandwidth, ~1 us x 3 TB/s, is ~23 KiB per SM; the register-fed GEMVs
// above reach ~16 KiB at most). Launched with early start: the weights' stream begins while the
// kernel before (the producer of the activations) finishes.
//
// The unit is a pair of 8-row tiles: 16 weight rows are an m16n8k32 mma's A operand and the
// tokens its B (8 at a time), so that no mma row is padding. Blocks walk batches of T pairs
// (1, or 2 above 8 tokens); each 16 KiB ring stage holds 16 / T slices (128 k) of every tile of
// the batch (one bulk copy per tile) and, beside them, the scales and zero points of the groups
// those slices fall in (cp.async by the producer warp's lanes, completing on the same barrier):
// nothing a consumer waits for comes from device memory when it needs it. Each consumer warp
// computes two (pair, slice) units of every stage for 8 tokens (8 warps up to 8 tokens, 16 up
// to 16); the 8 partial sums of a pair and 8 tokens meet in shared memory at the batch's end.
// The activations come through L1 (or, resident, from shared memory), a stage ahead.
//
// Lane (g, t) holds row g of both tiles' 32-k block t of a slice (16 bytes each, as packed):
// byte 4s + i is k = 32t + 4s + i (low nibble) and + 16 (high), so word s of the first tile's
// low and high nibbles are A's a0 and a2 and the second tile's a1 and a3, against token g's
// bytes 32t + 4s .. + 3 and 32t + 16 + 4s .. + 3 (b0, b1): the k of an mma slot only has to
// agree between the operands. Zero points: Σ (q − z)·x = Σ q·x − z·Σx, Σx from an mma of ones.
constexpr int STREAM_STAGES = 8;
// W4 fed through L1: 6 stages, so that the shared-memory carve-out steps down to 164 KiB and 16
// tokens' activations at k = 4096 (64 KiB) stay in L1 (+2% at 16 tokens on 4096x6144, the same
// elsewhere); resident, 7 beside the activations.
constexpr int W4_STREAM_STAGES = 6, W4_RESIDENT_STAGES = 7;
constexpr int STREAM_SLICES = 16; // of each tile a stage: 16 KiB
constexpr int STREAM_STAGE_BYTES = 2 * STREAM_SLICES * 512;
// Per stage: up to 36 (tile, group) entries of 8 rows (2 tiles x 17 groups, or 4 x 9), f32
// scales then u8 zero points.
constexpr int STREAM_SIDE_ENTRIES = 36;
constexpr int STREAM_SIDE_BYTES = STREAM_SIDE_ENTRIES * 8 * 5;


// A streaming GEMV's consumer lane (warp w of CW, lane 4g + t): tokens 8h + 2t (+ 1), h = w / 8,
// rows g and g + 8 of each tile pair of a batch of T pairs; its warp is part w % 8 of 8 that
// share the batch's k.
template <int CW, int T>
struct StreamLane {
    const GemmArgs& p;
    int warp, lane, g, t, part, h, t0, ko_slices, n_tiles;
    float s0, s1;     // the tokens' scales
    const u8_t* xo;   // token 8h + g's outlier activations, at channel 8t
    uint4 xo_first;   // ... of the warp's first 32-channel slice (all of them at 1% of 8192)
    const u8_t* wo[2 * T];
    uint4 wv[2 * T];  // the next outlier weights of rows g of the batch's tiles

    __device__ __forceinline__ StreamLane(const GemmArgs& args)
        : p(args), warp(threadIdx.x >> 5), lane(threadIdx.x & 31), g(lane >> 2), t(lane & 3), part(warp & 7),
          h(warp >> 3), t0(8 * h + 2 * t), ko_slices(args.ko_pad / 32), n_tiles((args.n + 7) >> 3) {}

    // The tokens' scales and first outlier activations: what the kernel before wrote, read once
    // it has finished.
    __device__ __forceinline__ void read_tokens() {
        s0 = t0 < p.m ? p.sx[t0] : 0.0f;
        s1 = t0 + 1 < p.m ? p.sx[t0 + 1] : 0.0f;
        xo = (const u8_t*)(p.xo + (u64_t)min(8 * h + g, p.m - 1) * p.ko_pad) + 16 * t;
        xo_first = part < ko_slices ? __ldg((const uint4*)(xo + part * 64)) : make_uint4(0, 0, 0, 0);
    }

    // The first outlier weights of the batch from tile `first`, fetched at its start so that their
    // latency hides behind the stream (the first batch's at the kernel's start: issued after the
    // ring's copies, they would wait for them, and at few batches a block that was the batch's
    // end: 4096x6144 at 16 tokens ran 20% slower).
    __device__ __forceinline__ void prefetch_outliers(int first) {
#pragma unroll
        for (int i = 0; i < 2 * T; ++i) {
            const int tile = min(first + i, n_tiles - 1);
            wo[i] = (const u8_t*)(p.wo + (u64_t)(tile * 8 + g) * p.ko_pad) + 16 * t;
            wv[i] = part < ko_slices ? __ldg((const uint4*)(wo[i] + part * 64)) : make_uint4(0, 0, 0, 0);
        }
    }

    // The end of the batch from tile `first`, out[4u + r] holding pair u's rows g (r = 0, 1) and
    // g + 8 (r = 2, 3) for tokens t0 (+ 1) with the weights' scales applied: the tokens' scales,
    // the outlier channels, the 8 warps of each token group added up (two buffers: the next batch
    // writes the other), f16 out.
    __device__ __forceinline__ void finish(float* out, int first, int round, float (*partial)[CW][32][4 * T]) {
#pragma unroll
        for (int u = 0; u < T; ++u) {
            out[4 * u + 0] *= s0;
            out[4 * u + 1] *= s1;
            out[4 * u + 2] *= s0;
            out[4 * u + 3] *= s1;
        }
        for (int c = part; c < ko_slices; c += 8) {
            uint4 cur[2 * T];
#pragma unroll
            for (int i = 0; i < 2 * T; ++i) {
                cur[i] = wv[i];
                if (c + 8 < ko_slices) wv[i] = __ldg((const uint4*)(wo[i] + (c + 8) * 64));
            }
            const uint4 xv = c == part ? xo_first : __ldg((const uint4*)(xo + c * 64));
#pragma unroll
            for (int u = 0; u < T; ++u) {
                const uint4 va = cur[2 * u], vb = cur[2 * u + 1];
                const u32_t a0[4] = {va.x, vb.x, va.y, vb.y}, a1[4] = {va.z, vb.z, va.w, vb.w};
                mma_f16(&out[4 * u], a0, xv.x, xv.y);
                mma_f16(&out[4 * u], a1, xv.z, xv.w);
            }
        }
#pragma unroll
        for (int r = 0; r < 4 * T; ++r) partial[round & 1][warp][lane][r] = out[r];
        asm volatile("bar.sync 1, %0;\n" ::"n"(CW * 32) : "memory");
        if (part == 0) {
            float total[4 * T];
#pragma unroll
            for (int r = 0; r < 4 * T; ++r) total[r] = 0.0f;
            for (int w2 = warp; w2 < warp + 8; ++w2)
#pragma unroll
                for (int r = 0; r < 4 * T; ++r) total[r] += partial[round & 1][w2][lane][r];
#pragma unroll
            for (int r = 0; r < 4 * T; ++r) {
                const int tk = t0 + (r & 1), row = (first + 2 * (r >> 2)) * 8 + g + ((r >> 1) & 1) * 8;
                if (tk < p.m && row < p.n) p.y[(u64_t)tk * p.n + row] = f32_to_f16(total[r]);
            }
        }
    }
};

// CW consumer warps (8 per 8 tokens), T tile pairs a batch; RESIDENT: the activations (CW rows of
// k_pad + 16 bytes, after the barriers) are copied into shared memory once per block, beside a
// ring of 7 stages, in pieces of a stage's k, each completing on its own barrier (at
// most 8), so that the first stage waits for its piece only.
template <int CW, int T, bool RESIDENT>
__device__ __forceinline__ void mixq_w4_stream(const GemmArgs& p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int S = STREAM_SLICES / T; // slices of each tile a stage
    constexpr int STAGES = RESIDENT ? W4_RESIDENT_STAGES : W4_STREAM_STAGES;
    extern __shared__ __align__(128) u8_t ring[];
    __shared__ float partial[2][CW][32][4 * T];
    u8_t* side_base = ring + STAGES * STREAM_STAGE_BYTES;
    u8_t* barriers = side_base + STAGES * STREAM_SIDE_BYTES;
    const u32_t full = smem_addr(barriers), empty = full + 8 * STAGES, x_bar = empty + 8 * STAGES;
    const u8_t* x_rows = barriers + 16 * STAGES + 64;
    const int n_tiles = (p.n + 7) >> 3, n_pad = n_tiles * 8, slices = p.k_pad / 128;
    const int chunks = (slices + S - 1) / S, batches = (n_tiles + 2 * T - 1) / (2 * T);
    // Group tiles are a power of two here (the host checks): a shift, not a division. A stage
    // need not start on a group boundary: it can touch one group more than its slices fill.
    const int group_shift = __ffs(p.group_tiles) - 1, side_groups = ((S - 1) >> group_shift) + 2;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    launch_dependents();
    StreamLane<CW, T> me(p);
    if (warp < CW) me.prefetch_outliers(2 * T * blockIdx.x);
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full + 8 * s, 33); // the bulk copies' expect_tx, then each producer lane's cp.async's
            mbar_init(empty + 8 * s, CW); // one arrival per consumer warp
        }
        for (int c = 0; RESIDENT && c < chunks; ++c) mbar_init(x_bar + 8 * c, 1);
        mbar_init_fence();
    }
    __syncthreads();

    if (warp == CW) {
        int it = 0;
        for (int b = blockIdx.x; b < batches; b += gridDim.x) {
            const int first = 2 * T * b, count = min(2 * T, n_tiles - first); // tiles
            for (int c = 0; c < chunks; ++c, ++it) {
                const int s = it % STAGES, n = min(S, slices - c * S);
                const int g0 = (c * S) >> group_shift, groups = ((c * S + n - 1) >> group_shift) - g0 + 1;
                mbar_wait(empty + 8 * s, ((it / STAGES) & 1) ^ 1);
                if (lane == 0) {
                    mbar_expect_bytes(full + 8 * s, count * n * 512);
                    for (int i = 0; i < count; ++i) {
                        const u8_t* src = p.wq + ((u64_t)(first + i) * slices + c * S) * 512;
                        bulk_load(smem_addr(ring + s * STREAM_STAGE_BYTES + i * S * 512), src, n * 512, full + 8 * s);
                    }
                }
                // Side entry e = tile i x group j: 8 scales (two 16-byte copies), 8 zero points.
                const u32_t side = smem_addr(side_base + s * STREAM_SIDE_BYTES);
                for (int e = lane; e < count * side_groups; e += 32) {
                    const int i = e / side_groups, j = e % side_groups;
                    if (j >= groups) continue;
                    const u64_t at = (u64_t)(g0 + j) * n_pad + (first + i) * 8;
                    cp_async_ca<16>(side + e * 32, p.sw + at);
                    cp_async_ca<16>(side + e * 32 + 16, p.sw + at + 4);
                    cp_async_ca<8>(side + STREAM_SIDE_ENTRIES * 32 + e * 8, p.wz + at);
                }
                cp_async_arrive(full + 8 * s);
            }
        }
        return;
    }

    // What the previous kernel wrote (the activations) is read from here on; the weights'
    // stream above needs nothing of it.
    grid_dependency_wait();
    // Warp w computes, for tokens 8h .. 8h + 7 (h = w / 8), two units of every stage: slices
    // w % 8 and w % 8 + 8 of the batch's pair (T = 1), or slice w % 8 of both pairs (T = 2, one
    // load of the activations for both).
    me.read_tokens();
    const int g = me.g, t = me.t, part = me.part, x_row = min(8 * me.h + g, p.m - 1);
    // Resident rows lie k_pad + 16 bytes apart: the 8 lanes of a 16-byte load phase (rows g, g + 1
    // at k 32t) fall in 8 different bank groups.
    const int x_stride = p.k_pad + 16;
    constexpr int PIECE = S * 128; // k a stage
    if (RESIDENT && warp == 0) {
        const int rows = min(p.m, CW);
        for (int c = 0; lane == 0 && c < chunks; ++c) mbar_expect_bytes(x_bar + 8 * c, rows * min(PIECE, p.k_pad - c * PIECE));
        __syncwarp();
        for (int c = 0; lane < rows && c < chunks; ++c)
            bulk_load(smem_addr(x_rows + lane * x_stride + c * PIECE), p.xq + (u64_t)lane * p.k_pad + c * PIECE,
                      min(PIECE, p.k_pad - c * PIECE), x_bar + 8 * c);
    }
    // Token row 8h + g: activations of this lane's 32-k block.
    const u8_t* x = RESIDENT ? x_rows + x_row * x_stride + 32 * t : (const u8_t*)p.xq + (u64_t)x_row * p.k_pad + 32 * t;
    constexpr int LOADS = 3 - T; // distinct slices a warp reads per stage
    // Slice of load i; past a short last stage, slice 0 again, scaled by zero: straight-line
    // code lets the units' mma chains interleave.
    auto slice_of = [&](int c, int i) {
        const int j = part + 8 * i;
        return j < min(S, slices - c * S) ? j : 0;
    };
    uint4 xl[LOADS], xh[LOADS];
    auto load_x = [&](int c) {
        if (RESIDENT) mbar_wait(x_bar + 8 * c, 0);
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            const int kb = (c * S + slice_of(c, i)) * 128;
            xl[i] = RESIDENT ? *(const uint4*)(x + kb) : __ldg((const uint4*)(x + kb));
            xh[i] = RESIDENT ? *(const uint4*)(x + kb + 16) : __ldg((const uint4*)(x + kb + 16));
        }
    };
    int it = 0, round = 0;
    for (int b = blockIdx.x; b < batches; b += gridDim.x, ++round) {
        if (round > 0) me.prefetch_outliers(2 * T * b);
        float out[4 * T];
#pragma unroll
        for (int r = 0; r < 4 * T; ++r) out[r] = 0.0f;
        load_x(0);
        for (int c = 0; c < chunks; ++c, ++it) {
            const int s = it % STAGES, n = min(S, slices - c * S), g0 = (c * S) >> group_shift;
            const u8_t* stage = ring + s * STREAM_STAGE_BYTES + 16 * lane;
            const u8_t* side = side_base + s * STREAM_SIDE_BYTES;
            mbar_wait(full + 8 * s, (it / STAGES) & 1);
            // Unit u: tiles 2·pair and 2·pair + 1 at slice j.
            uint4 w0[2], w1[2];
            float scale[2][2];
            int zero[2][2];
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int pair = T == 2 ? u : 0, j = slice_of(c, T == 2 ? 0 : u);
                const int tile0 = 2 * pair;
                w0[u] = *(const uint4*)(stage + (tile0 * S + j) * 512);
                w1[u] = *(const uint4*)(stage + ((tile0 + 1) * S + j) * 512);
                const int e = tile0 * side_groups + ((c * S + j) >> group_shift) - g0;
                const float keep = part + (T == 2 ? 0 : 8 * u) < n ? 1.0f : 0.0f;
                scale[u][0] = keep * *(const float*)(side + e * 32 + 4 * g);
                scale[u][1] = keep * *(const float*)(side + (e + side_groups) * 32 + 4 * g);
                zero[u][0] = side[STREAM_SIDE_ENTRIES * 32 + e * 8 + g];
                zero[u][1] = side[STREAM_SIDE_ENTRIES * 32 + (e + side_groups) * 8 + g];
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(empty + 8 * s);
            uint4 cl[LOADS], ch[LOADS];
#pragma unroll
            for (int i = 0; i < LOADS; ++i) cl[i] = xl[i], ch[i] = xh[i];
            if (c + 1 < chunks) load_x(c + 1);
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int i = T == 2 ? 0 : u, o = T == 2 ? 4 * u : 0;
                const u32_t ka[4] = {w0[u].x, w0[u].y, w0[u].z, w0[u].w}, kb[4] = {w1[u].x, w1[u].y, w1[u].z, w1[u].w};
                const u32_t lo[4] = {cl[i].x, cl[i].y, cl[i].z, cl[i].w}, hi[4] = {ch[i].x, ch[i].y, ch[i].z, ch[i].w};
                const u32_t ones[4] = {0x01010101u, 0x01010101u, 0x01010101u, 0x01010101u};
                int acc[4] = {0, 0, 0, 0}, sum[4] = {0, 0, 0, 0};
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const u32_t a[4] = {ka[q] & 0x0f0f0f0fu, kb[q] & 0x0f0f0f0fu, (ka[q] >> 4) & 0x0f0f0f0fu,
                                        (kb[q] >> 4) & 0x0f0f0f0fu};
                    mma_s8(acc, a, lo[q], hi[q]);
                    mma_s8(sum, ones, lo[q], hi[q]);
                }
                out[o + 0] += scale[u][0] * (float)(acc[0] - zero[u][0] * sum[0]);
                out[o + 1] += scale[u][0] * (float)(acc[1] - zero[u][0] * sum[1]);
                out[o + 2] += scale[u][1] * (float)(acc[2] - zero[u][1] * sum[2]);
                out[o + 3] += scale[u][1] * (float)(acc[3] - zero[u][1] * sum[3]);
            }
        }
        me.finish(out, 2 * T * b, round, partial);
    }
#endif
}

// W8A8 GEMV for up to 16 tokens on Hopper, the W4 kernel's scheme for 8-bit weights: each
// 16 KiB stage is one 3-D copy of a tile pair's 16 rows x 1024 k, as eight 128-k blocks of 16
// 128-byte rows in the 128-byte swizzle (16-byte chunk c of row r at c ^ (r & 7), so that the
// 8 rows a warp's lanes read at one k fall in different banks). Warp w takes block w % 8 of
// every stage; lane (g, t) reads chunks 2t and 2t + 1 (k = 32t .. 32t + 31 of the block) of rows
// g and g + 8, the same k as the activations it loads: word q of the two chunks feeds mma q.
// One scale per row, applied at the end.
template <int CW>
__device__ __forceinline__ void mixq_w8_stream(const TensorMap& map_w, const GemmArgs& p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int BLOCKS = 8; // of 128 k a stage
    extern __shared__ __align__(128) u8_t smem_raw[];
    __shared__ float partial[2][CW][32][4];
    u8_t* ring = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const u32_t full = smem_addr(ring + STREAM_STAGES * STREAM_STAGE_BYTES), empty = full + 8 * STREAM_STAGES;
    const int n_tiles = (p.n + 7) >> 3, k_blocks = p.k_pad / 128;
    const int chunks = (k_blocks + BLOCKS - 1) / BLOCKS, pairs = (n_tiles + 1) / 2;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    launch_dependents();
    StreamLane<CW, 1> me(p);
    if (warp < CW) me.prefetch_outliers(2 * blockIdx.x);
    if (threadIdx.x == 0) {
        for (int s = 0; s < STREAM_STAGES; ++s) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, CW); // one arrival per consumer warp
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (warp == CW) {
        if (lane != 0) return;
        int it = 0;
        for (int pair = blockIdx.x; pair < pairs; pair += gridDim.x)
            for (int c = 0; c < chunks; ++c, ++it) {
                const int s = it % STREAM_STAGES;
                mbar_wait(empty + 8 * s, ((it / STREAM_STAGES) & 1) ^ 1);
                // Blocks and rows past the matrix arrive as zeros, and count.
                mbar_expect_bytes(full + 8 * s, STREAM_STAGE_BYTES);
                tma_load_3d(smem_addr(ring + s * STREAM_STAGE_BYTES), &map_w, 0, 16 * pair, BLOCKS * c, full + 8 * s);
            }
        return;
    }

    grid_dependency_wait();
    me.read_tokens();
    const int g = me.g, t = me.t, part = me.part;
    const u8_t* x = (const u8_t*)p.xq + (u64_t)min(8 * me.h + g, p.m - 1) * p.k_pad + 32 * t;
    // Past the last block the weights are zeros: any activations in the matrix will do.
    auto load_x = [&](int c, uint4& lo, uint4& hi) {
        const int kb = BLOCKS * c + part < k_blocks ? (BLOCKS * c + part) * 128 : 0;
        lo = __ldg((const uint4*)(x + kb));
        hi = __ldg((const uint4*)(x + kb + 16));
    };
    // This lane's rows g and g + 8 (g & 7 both) in the warp's block, chunks 2t and 2t + 1.
    const int row_a = g * 128, row_b = (g + 8) * 128, c0 = ((2 * t) ^ g) << 4, c1 = ((2 * t + 1) ^ g) << 4;
    int it = 0, round = 0;
    for (int pair = blockIdx.x; pair < pairs; pair += gridDim.x, ++round) {
        if (round > 0) me.prefetch_outliers(2 * pair);
        int acc[4] = {0, 0, 0, 0};
        uint4 xl, xh;
        load_x(0, xl, xh);
        for (int c = 0; c < chunks; ++c, ++it) {
            const int s = it % STREAM_STAGES;
            const u8_t* block = ring + s * STREAM_STAGE_BYTES + part * 2048;
            mbar_wait(full + 8 * s, (it / STREAM_STAGES) & 1);
            const uint4 a0 = *(const uint4*)(block + row_a + c0), a1 = *(const uint4*)(block + row_a + c1);
            const uint4 b0 = *(const uint4*)(block + row_b + c0), b1 = *(const uint4*)(block + row_b + c1);
            __syncwarp();
            if (lane == 0) mbar_arrive(empty + 8 * s);
            const uint4 lo = xl, hi = xh;
            if (c + 1 < chunks) load_x(c + 1, xl, xh);
            const u32_t ra0[4] = {a0.x, a0.y, a0.z, a0.w}, ra1[4] = {a1.x, a1.y, a1.z, a1.w};
            const u32_t rb0[4] = {b0.x, b0.y, b0.z, b0.w}, rb1[4] = {b1.x, b1.y, b1.z, b1.w};
            const u32_t xlo[4] = {lo.x, lo.y, lo.z, lo.w}, xhi[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const u32_t a[4] = {ra0[q], rb0[q], ra1[q], rb1[q]};
                mma_s8(acc, a, xlo[q], xhi[q]);
            }
        }
        const int row = 16 * pair + g, n_pad = n_tiles * 8;
        const float w0 = row < n_pad ? p.sw[row] : 0.0f, w1 = row + 8 < n_pad ? p.sw[row + 8] : 0.0f;
        float out[4] = {w0 * (float)acc[0], w0 * (float)acc[1], w1 * (float)acc[2], w1 * (float)acc[3]};
        me.finish(out, 2 * pair, round, partial);
    }
#endif
}

extern "C" __global__ void __launch_bounds__(288, 1) mixq_w8_stream8(const __grid_constant__ TensorMap map_w, GemmArgs p) {
    mixq_w8_stream<8>(map_w, p);
}
extern "C" __global__ void __launch_bounds__(544, 1) mixq_w8_stream16(const __grid_constant__ TensorMap map_w, GemmArgs p) {
    mixq_w8_stream<16>(map_w, p);
}

// Up to 8 tokens one pair a batch; up to 16, two (sharing the activations' loads).
extern "C" __global__ void __launch_bounds__(288, 1) mixq_w4_stream8(GemmArgs p) { mixq_w4_stream<8, 1, false>(p); }
extern "C" __global__ void __launch_bounds__(544, 1) mixq_w4_stream16(GemmArgs p) { mixq_w4_stream<16, 2, false>(p); }
extern "C" __global__ void __launch_bounds__(288, 1) mixq_w4_stream8_resident(GemmArgs p) { mixq_w4_stream<8, 1, true>(p); }
extern "C" __global__ void __launch_bounds__(544, 1) mixq_w4_stream16_resident(GemmArgs p) { mixq_w4_stream<16, 2, true>(p); }
