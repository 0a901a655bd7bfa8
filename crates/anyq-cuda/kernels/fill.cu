// Random tensors made on the device, for benchmarks at sizes no host should have to upload:
// a counter-based hash of (seed, index), so any launch shape gives the same values.

__device__ __forceinline__ u32_t hash32(u64_t seed, u64_t i) {
    u64_t z = seed * 0x9e3779b97f4a7c15ull + i + 1;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (u32_t)((z ^ (z >> 31)) >> 32);
}

// Uniform in [-scale, scale).
__device__ __forceinline__ float uniform(u64_t seed, u64_t i, float scale) {
    return ((float)hash32(seed, i) * 2.3283064e-10f * 2.0f - 1.0f) * scale;
}

extern "C" __global__ void fill_bytes(u8_t* out, u64_t len, u64_t seed) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < len; i += (u64_t)gridDim.x * blockDim.x)
        out[i] = (u8_t)(hash32(seed, i) >> 24);
}

extern "C" __global__ void fill_f16(f16_t* out, u64_t len, u64_t seed, float scale) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < len; i += (u64_t)gridDim.x * blockDim.x)
        out[i] = f32_to_f16(uniform(seed, i, scale));
}

extern "C" __global__ void fill_bf16(bf16_t* out, u64_t len, u64_t seed, float scale) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < len; i += (u64_t)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(uniform(seed, i, scale));
}

// Positive values in [lo, hi): scales.
extern "C" __global__ void fill_f32_range(float* out, u64_t len, u64_t seed, float lo, float hi) {
    for (u64_t i = blockIdx.x * (u64_t)blockDim.x + threadIdx.x; i < len; i += (u64_t)gridDim.x * blockDim.x)
        out[i] = lo + (hi - lo) * ((float)hash32(seed, i) * 2.3283064e-10f);
}
