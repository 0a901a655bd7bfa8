// Shared by every anyq kernel file: NVRTC compiles each file with this in front. No system or
// CUDA headers are needed, so the kernels compile wherever libnvrtc is.

typedef unsigned short f16_t; // IEEE binary16, raw bits
typedef unsigned short bf16_t; // bfloat16, raw bits
typedef signed char i8_t;
typedef unsigned char u8_t;
typedef unsigned int u32_t;
typedef unsigned long long u64_t;

__device__ __forceinline__ float f16_to_f32(f16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ f16_t f32_to_f16(float f) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __uint_as_float(((u32_t)h) << 16); }

__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    bf16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum (or max) over a block of up to 1024 threads; every thread gets the result.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads(); // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : (MAX ? 0.0f : 0.0f);
    return MAX ? warp_max(v) : warp_sum(v);
}

__device__ __forceinline__ u32_t smem_addr(const void* p) { return (u32_t)__cvta_generic_to_shared(p); }

// 16-byte global -> shared copy that fills zeros when `valid` is false (rows past the matrix).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32_t* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// D += A(16x32 s8, row) * B(32x8 s8, col), int32 accumulators.
__device__ __forceinline__ void mma_s8(int* d, const u32_t* a, u32_t b0, u32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D += A(16x16 f16, row) * B(16x8 f16, col), f32 accumulators.
__device__ __forceinline__ void mma_f16(float* d, const u32_t* a, u32_t b0, u32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four packed 4-bit weights per byte lane -> int8 (q - zero) in [-15, 15]: low nibbles are the
// fragment's first register, high nibbles its second.
__device__ __forceinline__ void unpack_w4(u32_t packed, u32_t zero4, u32_t& b0, u32_t& b1) {
    b0 = __vsub4(packed & 0x0f0f0f0fu, zero4);
    b1 = __vsub4((packed >> 4) & 0x0f0f0f0fu, zero4);
}
