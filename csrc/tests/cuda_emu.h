// A tiny CUDA execution emulator for the CPU test of the kernels (tests/kernels/test_cuda_kernels.py): the very
// .cu files are compiled by g++ as C++ with `-DWMFAST_EMULATE -include csrc/tests/cuda_emu.h`, and each block runs
// on one host thread per CUDA thread, with std::barrier for __syncthreads and for warp shuffles. Blocks run one
// after another, so a function-static array is exactly a block's shared memory. Slow, exact semantics for
// what these kernels use (threadIdx/blockIdx/blockDim.x, __syncthreads, __shfl_xor_sync, __ldg): enough to
// execute every index computation, mask, vector load and reduction of the kernels without a GPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {

struct Block {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> lanes;  // one shuffle slot per thread
};

inline thread_local uint3 tid, bid;
inline thread_local dim3 bdim;
inline thread_local Block* cur = nullptr;

template <typename F>
void launch(dim3 grid, dim3 block, F&& body) {
  const unsigned n = block.x;
  for (unsigned b = 0; b < grid.x; ++b) {
    Block blk;
    blk.block = std::make_unique<std::barrier<>>(n);
    for (unsigned w = 0; w < (n + 31) / 32; ++w) {
      const unsigned lanes = n - 32 * w < 32 ? n - 32 * w : 32;
      blk.warps.push_back(std::make_unique<std::barrier<>>(lanes));
    }
    blk.lanes.assign(n, 0.f);
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (unsigned t = 0; t < n; ++t) {
      threads.emplace_back([&, t] {
        tid = make_uint3(t, 0, 0);
        bid = make_uint3(b, 0, 0);
        bdim = block;
        cur = &blk;
        body();
        // an exited thread no longer counts at later barriers (as an exited CUDA thread)
        blk.warps[t / 32]->arrive_and_drop();
        blk.block->arrive_and_drop();
      });
    }
    for (auto& th : threads) th.join();
  }
}

inline void syncthreads() { cur->block->arrive_and_wait(); }

inline float shfl_xor(float v, int offset, int width) {
  const unsigned t = tid.x, lane = t % 32, base = t - lane;
  auto& warp = *cur->warps[t / 32];
  cur->lanes[t] = v;
  warp.arrive_and_wait();
  const unsigned src = (lane & ~unsigned(width - 1)) | ((lane ^ offset) & unsigned(width - 1));
  const float r = cur->lanes[base + src];
  warp.arrive_and_wait();  // nobody overwrites its slot before every lane has read
  return r;
}

}  // namespace emu

#define threadIdx (::emu::tid)
#define blockIdx (::emu::bid)
#define blockDim (::emu::bdim)
#define __syncthreads() ::emu::syncthreads()
#define __shfl_xor_sync(mask, v, offset, width) ::emu::shfl_xor((v), (offset), (width))
template <typename T>
inline T __ldg(const T* p) { return *p; }
#define rsqrtf(x) (1.0f / std::sqrt(x))
#define cudaGetLastError() cudaSuccess
#define cudaGetErrorString(e) "emulated"
