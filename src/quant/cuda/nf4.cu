// NF4 weights resident on the GPU (`--quantize nf4`): bitsandbytes' packed 4-bit codes, high
// nibble first, and a float table `tables` = [16 NF4 code values | one absmax per block of
// `blocksize` elements along the row-major flattening]. The CPU references of both kernels are
// in src/quant/nf4_device.rs (`dequantize_reference`, `rows_reference`).
//
//   nf4_dequant_*: w[i] = code[nibble(i)] * absmax[i / blocksize], one f32 product rounded once
//                  to the output type: bit for bit the CPU's dequantization.
//   nf4_rows_*:    y[r, j] = sum over 32-weight chunks c of (sum_e code * x[r, c*32 + e]) * absmax
//                  for up to NF4_ROWS_MAX input rows r (a decode step): one warp per weight row,
//                  each lane one 16-byte load of codes per chunk, the codes read once for all
//                  rows; f32 accumulation, a warp sum, one rounding. Needs cols % 32 == 0 and
//                  blocksize % 32 == 0 (a chunk inside one block) and 16-byte aligned rows of
//                  codes; x rows are read VEC elements per load (16 bytes) when the host found
//                  them aligned, else one by one (the `_scalar` kernels).

#include <stdint.h>

#include "cvt.cuh"

#define NF4_ROWS_MAX 8
#define NF4_ROWS_WARPS 4
#define NF4_CHUNK 32

template <typename T>
__device__ void dequant_impl(const uint8_t* __restrict__ codes, const float* __restrict__ tables,
                             T* __restrict__ out, unsigned long long numel, unsigned int blocksize) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = tables[threadIdx.x];
  __syncthreads();
  const float* absmax = tables + 16;
  const unsigned long long nbytes = (numel + 1) / 2;
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long b = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; b < nbytes;
       b += stride) {
    const unsigned int c = codes[b];
    const unsigned long long i = 2 * b;
    out[i] = Cvt<T>::from(__fmul_rn(code[c >> 4], absmax[i / blocksize]));
    if (i + 1 < numel) out[i + 1] = Cvt<T>::from(__fmul_rn(code[c & 15], absmax[(i + 1) / blocksize]));
  }
}

// The 32 x values of one chunk as f32, VEC per load (VEC * sizeof(T) == 16 bytes, or 1).
template <typename T, int VEC>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, float (&f)[NF4_CHUNK]) {
  if constexpr (VEC == 1) {
#pragma unroll
    for (int e = 0; e < NF4_CHUNK; ++e) f[e] = Cvt<T>::to(p[e]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector loads are 16 bytes");
#pragma unroll
    for (int v = 0; v < NF4_CHUNK / VEC; ++v) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + v);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < VEC; ++k) f[v * VEC + k] = Cvt<T>::to(e[k]);
    }
  }
}

template <typename T, int VEC>
__device__ void rows_impl(const T* __restrict__ x, const uint8_t* __restrict__ codes,
                          const float* __restrict__ tables, T* __restrict__ y, int m, int n,
                          int cols, int blocksize) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = tables[threadIdx.x];
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = blockIdx.x * NF4_ROWS_WARPS + warp;
  if (j >= n) return;
  const float* absmax = tables + 16;
  const uint4* wrow = reinterpret_cast<const uint4*>(codes + (size_t)j * (cols / 2));
  const int chunks = cols / NF4_CHUNK;
  float acc[NF4_ROWS_MAX];
#pragma unroll
  for (int r = 0; r < NF4_ROWS_MAX; ++r) acc[r] = 0.f;
  for (int c = lane; c < chunks; c += 32) {
    const uint4 q = __ldg(wrow + c);
    const unsigned int words[4] = {q.x, q.y, q.z, q.w};
    float w[NF4_CHUNK];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const unsigned int byte = (words[t] >> (8 * b)) & 0xffu;
        w[8 * t + 2 * b] = code[byte >> 4];
        w[8 * t + 2 * b + 1] = code[byte & 15u];
      }
    }
    const float s = absmax[((size_t)j * cols + (size_t)c * NF4_CHUNK) / blocksize];
#pragma unroll
    for (int r = 0; r < NF4_ROWS_MAX; ++r) {
      if (r < m) {
        float xv[NF4_CHUNK];
        load_chunk<T, VEC>(x + (size_t)r * cols + (size_t)c * NF4_CHUNK, xv);
        float part = 0.f;
#pragma unroll
        for (int e = 0; e < NF4_CHUNK; ++e) part = fmaf(w[e], xv[e], part);
        acc[r] = fmaf(part, s, acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < NF4_ROWS_MAX; ++r) {
    if (r < m) {
      float v = acc[r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) y[(size_t)r * n + j] = Cvt<T>::from(v);
    }
  }
}

#define NF4_DEQUANT(SUFFIX, T)                                                                 \
  extern "C" __global__ void nf4_dequant_##SUFFIX(const uint8_t* codes, const float* tables,   \
                                                  T* out, unsigned long long numel,            \
                                                  unsigned int blocksize) {                    \
    dequant_impl<T>(codes, tables, out, numel, blocksize);                                     \
  }

#define NF4_ROWS(SUFFIX, T, VEC)                                                               \
  extern "C" __global__ void __launch_bounds__(32 * NF4_ROWS_WARPS) nf4_rows_##SUFFIX(         \
      const T* x, const uint8_t* codes, const float* tables, T* y, int m, int n, int cols,     \
      int blocksize) {                                                                         \
    rows_impl<T, VEC>(x, codes, tables, y, m, n, cols, blocksize);                             \
  }

NF4_DEQUANT(f32, float)
NF4_DEQUANT(bf16, __nv_bfloat16)
NF4_DEQUANT(f16, __half)
NF4_ROWS(f32, float, 4)
NF4_ROWS(bf16, __nv_bfloat16, 8)
NF4_ROWS(f16, __half, 8)
NF4_ROWS(f32_scalar, float, 1)
NF4_ROWS(bf16_scalar, __nv_bfloat16, 1)
NF4_ROWS(f16_scalar, __half, 1)
