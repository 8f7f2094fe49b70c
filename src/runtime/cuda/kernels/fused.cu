// Fused decoder-block steps (src/runtime/fused.rs has the CPU reference):
//   fused_add_rms_norm_*: one block per row: s = T(x + d) into out[0], sum of s^2 in f32 over
//                         the row, then out[1] = T(s * rsqrt(sum / cols + eps) * w).
//   fused_silu_mul_*:     out = T(T(silu(g)) * u), grid-stride over the elements.

#include <stdint.h>

#include "../../../quant/cuda/cvt.cuh"

#define FUSED_NORM_THREADS 256

template <typename T>
__device__ void add_rms_norm_impl(const T* __restrict__ x, const T* __restrict__ d,
                                  const T* __restrict__ w, T* __restrict__ out, int rows,
                                  int cols, float eps) {
  __shared__ float red[FUSED_NORM_THREADS / 32];
  const int row = blockIdx.x;
  if (row >= rows) return;
  const size_t base = (size_t)row * cols;
  T* s_out = out + base;
  T* n_out = out + (size_t)rows * cols + base;
  float ss = 0.f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const T s = Cvt<T>::from(Cvt<T>::to(x[base + c]) + Cvt<T>::to(d[base + c]));
    s_out[c] = s;
    const float v = Cvt<T>::to(s);
    ss += v * v;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < FUSED_NORM_THREADS / 32; ++i) total += red[i];
  const float scale = rsqrtf(total / (float)cols + eps);
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    n_out[c] = Cvt<T>::from(Cvt<T>::to(s_out[c]) * scale * Cvt<T>::to(w[c]));
  }
}

template <typename T>
__device__ void silu_mul_impl(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ out,
                              unsigned long long n) {
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float gv = Cvt<T>::to(g[i]);
    const T a = Cvt<T>::from(gv / (1.0f + expf(-gv)));
    out[i] = Cvt<T>::from(Cvt<T>::to(a) * Cvt<T>::to(u[i]));
  }
}

#define FUSED_KERNELS(SUFFIX, T)                                                               \
  extern "C" __global__ void __launch_bounds__(FUSED_NORM_THREADS)                             \
      fused_add_rms_norm_##SUFFIX(const T* x, const T* d, const T* w, T* out, int rows,        \
                                  int cols, float eps) {                                       \
    add_rms_norm_impl<T>(x, d, w, out, rows, cols, eps);                                       \
  }                                                                                            \
  extern "C" __global__ void fused_silu_mul_##SUFFIX(const T* g, const T* u, T* out,           \
                                                     unsigned long long n) {                   \
    silu_mul_impl<T>(g, u, out, n);                                                            \
  }

FUSED_KERNELS(f32, float)
FUSED_KERNELS(bf16, __nv_bfloat16)
FUSED_KERNELS(f16, __half)
