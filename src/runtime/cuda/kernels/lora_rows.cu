// Per-row LoRA ("BGMV/SGMV"-style) kernels: one batched forward applies a different adapter set to
// each row of the batch, in one shrink + one expand launch per projection.
//
//   t[n, r]   = sum_i x[n, i] * A_s[r, i]                       (shrink, f32 partials)
//   out[n, o] = y[n, o] + sum_{r < R_s} t[n, r] * Bt_s[r, o]     (expand, f32 accumulation)
//
// with s = row_set[n]. The host (src/runtime/cuda/lora_rows.rs) groups the rows by set into
// tiles of up to LORA_TILE_ROWS rows, so that one block reads a set's A / Bt rows once for all
// the tile's rows, and lists the shrink work items (tile, first rank of a group of
// LORA_SHRINK_RANKS): no block is launched for ranks a set does not have. Tiles of rows without a
// set (tile_set == LORA_NO_SET) only copy y.
//
// Metadata (all device arrays, written by the host):
//   a_ptrs[S], bt_ptrs[S]   u64 device addresses of each set's A [R, in] and Bt [R, out]
//   ranks[S]                u32 rank of each set, 1..=LORA_MAX_RANK
//   tile_set[T]             u32 set of each tile, or LORA_NO_SET
//   tile_nrows[T]           u32 rows in each tile, 1..=LORA_TILE_ROWS
//   tile_rows[T * TILE]     u32 row indices of each tile (first tile_nrows[t] valid)
//   work[2 * W]             u32 pairs (tile, r0) of the shrink work items
// t_part is f32 [ksplit, n_rows, r_stride]: the shrink splits `in` into ksplit ranges
// (blockIdx.y) and writes one partial per range; the expand sums them in a fixed order, so the
// result is deterministic (no atomics).
//
// VEC is the number of elements per load: 16 bytes (8 bf16/f16, 4 f32) when the host found every
// pointer 16-byte aligned and in, out multiples of VEC, else 1 (the `_scalar` kernels).

#include <stdint.h>

#include "../../../quant/cuda/cvt.cuh"

#define LORA_TILE_ROWS 8
#define LORA_SHRINK_RANKS 4
#define LORA_SHRINK_THREADS 128
#define LORA_EXPAND_WARPS 4
#define LORA_MAX_RANK 256
#define LORA_NO_SET 0xffffffffu

// Loads VEC elements at p as f32. VEC > 1: one 16-byte load, p must be 16-byte aligned.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    f[0] = Cvt<T>::to(p[0]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector loads are 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int v = 0; v < VEC; ++v) f[v] = Cvt<T>::to(e[v]);
  }
}

// Rounds VEC f32 values once to T and stores them at p (16-byte aligned when VEC > 1).
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = Cvt<T>::from(f[0]);
  } else {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int v = 0; v < VEC; ++v) e[v] = Cvt<T>::from(f[v]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// Copies VEC elements bit for bit (rows without a set: y unchanged, -0.0 and NaN payloads too).
template <typename T, int VEC>
__device__ __forceinline__ void copy_vec(T* dst, const T* src) {
  if constexpr (VEC == 1) {
    dst[0] = src[0];
  } else {
    *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Shrink. Grid (W work items, ksplit), LORA_SHRINK_THREADS threads. Block (item, ks) computes,
// for the tile's rows j and the ranks r0..r0+nr of the item, the dot products of x[row_j] and
// A[r] over the vector range [ks * k_chunk, (ks + 1) * k_chunk) of `in`; the threads stride over
// that range, then a warp-shuffle + shared-memory reduction gives the block's partials.
template <typename T, int VEC>
__device__ __forceinline__ void shrink_impl(
    const T* __restrict__ x, float* __restrict__ t_part,
    const unsigned long long* __restrict__ a_ptrs, const unsigned int* __restrict__ ranks,
    const unsigned int* __restrict__ tile_set, const unsigned int* __restrict__ tile_nrows,
    const unsigned int* __restrict__ tile_rows, const unsigned int* __restrict__ work,
    int n_rows, int in_dim, int r_stride, int k_chunk) {
  __shared__ float red[LORA_SHRINK_THREADS / 32][LORA_TILE_ROWS * LORA_SHRINK_RANKS];

  const unsigned int tile = work[2 * blockIdx.x];
  const int r0 = (int)work[2 * blockIdx.x + 1];
  const unsigned int set = tile_set[tile];
  const int nr = min(LORA_SHRINK_RANKS, (int)ranks[set] - r0);  // >= 1 by construction
  const int nrows = (int)tile_nrows[tile];
  const T* a = reinterpret_cast<const T*>(a_ptrs[set]) + (size_t)r0 * in_dim;

  const T* xrow[LORA_TILE_ROWS];
#pragma unroll
  for (int j = 0; j < LORA_TILE_ROWS; ++j) {
    const unsigned int row = j < nrows ? tile_rows[tile * LORA_TILE_ROWS + j] : 0u;
    xrow[j] = x + (size_t)row * in_dim;
  }

  float acc[LORA_TILE_ROWS][LORA_SHRINK_RANKS];
#pragma unroll
  for (int j = 0; j < LORA_TILE_ROWS; ++j)
#pragma unroll
    for (int q = 0; q < LORA_SHRINK_RANKS; ++q) acc[j][q] = 0.f;

  const int n_vec = in_dim / VEC;
  const int k_begin = blockIdx.y * k_chunk;
  const int k_end = min(n_vec, k_begin + k_chunk);
  for (int k = k_begin + (int)threadIdx.x; k < k_end; k += LORA_SHRINK_THREADS) {
    const size_t off = (size_t)k * VEC;
    float av[LORA_SHRINK_RANKS][VEC];
#pragma unroll
    for (int q = 0; q < LORA_SHRINK_RANKS; ++q) {
      if (q < nr) {
        load_vec<T, VEC>(a + (size_t)q * in_dim + off, av[q]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) av[q][v] = 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < LORA_TILE_ROWS; ++j) {
      if (j < nrows) {
        float xv[VEC];
        load_vec<T, VEC>(xrow[j] + off, xv);
#pragma unroll
        for (int q = 0; q < LORA_SHRINK_RANKS; ++q)
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[j][q] = fmaf(xv[v], av[q][v], acc[j][q]);
      }
    }
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < LORA_TILE_ROWS; ++j) {
#pragma unroll
    for (int q = 0; q < LORA_SHRINK_RANKS; ++q) {
      if (j < nrows && q < nr) {  // block-uniform: every lane of the warp shuffles
        const float s = warp_sum(acc[j][q]);
        if (lane == 0) red[warp][j * LORA_SHRINK_RANKS + q] = s;
      }
    }
  }
  __syncthreads();
  const int i = threadIdx.x;
  if (i < LORA_TILE_ROWS * LORA_SHRINK_RANKS) {
    const int j = i / LORA_SHRINK_RANKS, q = i % LORA_SHRINK_RANKS;
    if (j < nrows && q < nr) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < LORA_SHRINK_THREADS / 32; ++w) s += red[w][i];
      const unsigned int row = tile_rows[tile * LORA_TILE_ROWS + j];
      t_part[((size_t)blockIdx.y * n_rows + row) * r_stride + r0 + q] = s;
    }
  }
}

// Expand. Grid (T tiles, ceil(out / (32 * VEC))), 32 * LORA_EXPAND_WARPS threads. Block
// (tile, chunk) owns the 32 * VEC outputs of the chunk for the tile's rows: it stages
// t[row_j, :rank] (the sum of the ksplit partials) in shared memory, each warp accumulates the
// ranks r = warp, warp + WARPS, ... (lane l reads Bt[r, o + l * VEC ..], coalesced), the warps'
// partials are summed in shared memory, and y is added before the single rounding to T.
template <typename T, int VEC>
__device__ __forceinline__ void expand_impl(
    const T* __restrict__ y, T* __restrict__ out, const float* __restrict__ t_part,
    const unsigned long long* __restrict__ bt_ptrs, const unsigned int* __restrict__ ranks,
    const unsigned int* __restrict__ tile_set, const unsigned int* __restrict__ tile_nrows,
    const unsigned int* __restrict__ tile_rows, int n_rows, int out_dim, int r_stride,
    int ksplit) {
  constexpr int CHUNK = 32 * VEC;
  constexpr int THREADS = 32 * LORA_EXPAND_WARPS;
  __shared__ float t_s[LORA_TILE_ROWS][LORA_MAX_RANK];
  __shared__ __align__(16) float red[LORA_EXPAND_WARPS][LORA_TILE_ROWS][CHUNK];

  const unsigned int tile = blockIdx.x;
  const unsigned int set = tile_set[tile];
  const int nrows = (int)tile_nrows[tile];
  const unsigned int* rows = tile_rows + (size_t)tile * LORA_TILE_ROWS;
  const int o0 = blockIdx.y * CHUNK;

  if (set == LORA_NO_SET) {
    for (int item = threadIdx.x; item < nrows * 32; item += THREADS) {
      const int j = item / 32, o = o0 + (item % 32) * VEC;
      if (o < out_dim) {
        const size_t base = (size_t)rows[j] * out_dim + o;
        copy_vec<T, VEC>(out + base, y + base);
      }
    }
    return;
  }

  const int rank = (int)ranks[set];
  for (int idx = threadIdx.x; idx < nrows * rank; idx += THREADS) {
    const int j = idx / rank, r = idx - j * rank;
    const size_t base = (size_t)rows[j] * r_stride + r;
    float s = 0.f;
    for (int ks = 0; ks < ksplit; ++ks) s += t_part[(size_t)ks * n_rows * r_stride + base];
    t_s[j][r] = s;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int o = o0 + lane * VEC;
  float acc[LORA_TILE_ROWS][VEC];
#pragma unroll
  for (int j = 0; j < LORA_TILE_ROWS; ++j)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[j][v] = 0.f;
  if (o < out_dim) {
    const T* bt = reinterpret_cast<const T*>(bt_ptrs[set]) + o;
#pragma unroll 4
    for (int r = warp; r < rank; r += LORA_EXPAND_WARPS) {
      float b[VEC];
      load_vec<T, VEC>(bt + (size_t)r * out_dim, b);
#pragma unroll
      for (int j = 0; j < LORA_TILE_ROWS; ++j) {
        if (j < nrows) {
          const float tj = t_s[j][r];
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[j][v] = fmaf(tj, b[v], acc[j][v]);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < LORA_TILE_ROWS; ++j)
    if (j < nrows)
#pragma unroll
      for (int v = 0; v < VEC; ++v) red[warp][j][lane * VEC + v] = acc[j][v];
  __syncthreads();

  for (int item = threadIdx.x; item < nrows * 32; item += THREADS) {
    const int j = item / 32, l = item % 32, oo = o0 + l * VEC;
    if (oo < out_dim) {
      const size_t base = (size_t)rows[j] * out_dim + oo;
      float res[VEC];
      load_vec<T, VEC>(y + base, res);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float d = 0.f;
#pragma unroll
        for (int w = 0; w < LORA_EXPAND_WARPS; ++w) d += red[w][j][l * VEC + v];
        res[v] += d;
      }
      store_vec<T, VEC>(out + base, res);
    }
  }
}

#define LORA_KERNELS(SUFFIX, T, VEC)                                                           \
  extern "C" __global__ void __launch_bounds__(LORA_SHRINK_THREADS) lora_shrink_##SUFFIX(     \
      const T* x, float* t_part, const unsigned long long* a_ptrs, const unsigned int* ranks,  \
      const unsigned int* tile_set, const unsigned int* tile_nrows,                            \
      const unsigned int* tile_rows, const unsigned int* work, int n_rows, int in_dim,         \
      int r_stride, int k_chunk) {                                                             \
    shrink_impl<T, VEC>(x, t_part, a_ptrs, ranks, tile_set, tile_nrows, tile_rows, work,       \
                        n_rows, in_dim, r_stride, k_chunk);                                    \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(32 * LORA_EXPAND_WARPS) lora_expand_##SUFFIX(  \
      const T* y, T* out, const float* t_part, const unsigned long long* bt_ptrs,              \
      const unsigned int* ranks, const unsigned int* tile_set, const unsigned int* tile_nrows, \
      const unsigned int* tile_rows, int n_rows, int out_dim, int r_stride, int ksplit) {      \
    expand_impl<T, VEC>(y, out, t_part, bt_ptrs, ranks, tile_set, tile_nrows, tile_rows,       \
                        n_rows, out_dim, r_stride, ksplit);                                    \
  }

LORA_KERNELS(f32, float, 4)
LORA_KERNELS(bf16, __nv_bfloat16, 8)
LORA_KERNELS(f16, __half, 8)
LORA_KERNELS(f32_scalar, float, 1)
LORA_KERNELS(bf16_scalar, __nv_bfloat16, 1)
LORA_KERNELS(f16_scalar, __half, 1)
