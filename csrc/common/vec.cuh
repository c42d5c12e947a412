// Device helpers shared by the wmfast CUDA kernels: conversions, 16-byte vector loads/stores, reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "dtypes.h"

namespace wmfast {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Loads VEC contiguous elements starting at p into fp32 registers. When VEC elements span whole 16-byte
// words the caller guarantees 16-byte alignment and the load is VEC*sizeof(T)/16 ld.global.v4 (LDG.128):
// the widest load per thread, which is what it takes to reach copy bandwidth on H100/B200.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  if constexpr ((VEC * sizeof(T)) % 16 == 0) {
    constexpr int PER16 = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < VEC / PER16; ++i) {
      uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + i);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < PER16; ++j) out[i * PER16 + j] = to_float(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_float(p[j]);
  }
}

// Strided variant for the scalar path (VEC == 1 callers, or a modulation view whose last dim is strided).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec_strided(const T* p, int64_t stride, float* out) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_float(p[j * stride]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float* v) {
  if constexpr ((VEC * sizeof(T)) % 16 == 0) {
    constexpr int PER16 = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < VEC / PER16; ++i) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < PER16; ++j) e[j] = from_float<T>(v[i * PER16 + j]);
      reinterpret_cast<uint4*>(p)[i] = raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = from_float<T>(v[j]);
  }
}

// Butterfly sum over the lanes of a warp (xor shuffles): every lane gets the total, in a fixed order,
// so the result is bit-identical from run to run.
template <int WIDTH = 32>
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, WIDTH);
  return v;
}

// Sum over the `nt` threads of a row unit (nt a multiple of 32; units are consecutive in the block).
// One warp per row needs shuffles only; a multi-warp unit goes through `smem` (blockDim/32 floats) and
// sums the warps' partials in warp order (deterministic). `nt` is uniform over the block, so the
// barriers are reached by every thread.
__device__ __forceinline__ float row_sum(float v, int nt, float* smem) {
  v = warp_sum(v);
  if (nt == 32) return v;
  const int warp = threadIdx.x >> 5, wpr = nt >> 5, first = (warp / wpr) * wpr;
  if ((threadIdx.x & 31) == 0) smem[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < wpr; ++w) s += smem[first + w];
  __syncthreads();  // smem is reused by the next reduction
  return s;
}

__device__ __forceinline__ float2 row_sum2(float2 v, int nt, float2* smem) {
  v.x = warp_sum(v.x);
  v.y = warp_sum(v.y);
  if (nt == 32) return v;
  const int warp = threadIdx.x >> 5, wpr = nt >> 5, first = (warp / wpr) * wpr;
  if ((threadIdx.x & 31) == 0) smem[warp] = v;
  __syncthreads();
  float2 s = make_float2(0.f, 0.f);
  for (int w = 0; w < wpr; ++w) {
    s.x += smem[first + w].x;
    s.y += smem[first + w].y;
  }
  __syncthreads();
  return s;
}

template <DType D>
struct CudaType;
template <>
struct CudaType<DType::F32> { using type = float; };
template <>
struct CudaType<DType::F16> { using type = __half; };
template <>
struct CudaType<DType::BF16> { using type = __nv_bfloat16; };

// Launches a kernel: `kernel<<<grid, block, 0, stream>>>(args...)`. Built with WMFAST_EMULATE (the CPU test
// of csrc/tests/cuda_emu.h), the same kernel code runs on host threads instead.
template <typename... KArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
#ifdef WMFAST_EMULATE
  (void)stream;
  ::emu::launch(grid, block, [&] { kernel(args...); });
#else
  kernel<<<grid, block, 0, stream>>>(args...);
#endif
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline Status cuda_status(cudaError_t e) {
  if (e == cudaSuccess) return Status{};
  return Status{2, cudaGetErrorString(e)};
}

}  // namespace wmfast
