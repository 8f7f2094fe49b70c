// Element conversions shared by the project's kernels (quant/cuda/nf4.cu and
// runtime/cuda/kernels/lora_rows.cu include it): Cvt<T>::to reads a float, bf16 or f16 value as
// f32; Cvt<T>::from rounds an f32 to T (round to nearest even).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
