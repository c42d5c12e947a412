// Fused AdaLN-Zero kernels: host-side interface (plain C++; no torch headers, so the .cu files compile fast).
//
// Semantics (fp32 math; the specification is kernels/adaln.py):
//   layernorm_modulate:                y = LayerNorm(x; no affine, eps) * (1 + scale) + shift
//   gated_residual_layernorm_modulate: out = residual + gate * x;  y = layernorm_modulate(out)  (from fp32 out)
// Rows are the B*L tokens of an x of shape [B, L, D]. A modulation tensor is a [B, M, D] view given by
// explicit strides (chunk/unbind views of a [B, L, 6, D] tensor need no copy); token l of sample b reads
// its row m = l / (L / M): M = 1 per-sample, M = F per-frame (frame_len = L / F), M = L per-token.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/dtypes.h"

namespace wmfast {

struct ModView {
  const void* ptr = nullptr;  // nullptr: not used by this op
  int64_t stride_b = 0, stride_m = 0, stride_d = 1;  // in elements; stride_b may be 0 (broadcast)
  int64_t rows = 1;                                  // M; L % M == 0
};

struct AdaLNFwdParams {
  int64_t B = 0, L = 0, D = 0;
  const void* x = nullptr;  // [B, L, D], last dim contiguous
  int64_t x_sb = 0, x_sl = 0;
  const void* residual = nullptr;  // gated op only; [B, L, D], last dim contiguous
  int64_t r_sb = 0, r_sl = 0;
  ModView gate, shift, scale;  // gate: gated op only
  void* y = nullptr;           // [B, L, D] contiguous, act dtype
  void* out = nullptr;         // gated op only: [B, L, D] contiguous, act dtype
  float* mean = nullptr;       // [B*L] fp32, saved for the backward
  float* rstd = nullptr;       // [B*L] fp32
  float eps = 1e-6f;
  DType act = DType::BF16;  // x, residual, y, out
  DType mod = DType::BF16;  // shift, scale, gate: the act dtype or fp32
};

// Gradients of the modulation tensors are produced either per row (a per-token tensor: written straight
// into [B, L, D]) or reduced over the rows that share a modulation row. The reduction is deterministic and
// free of atomics: stage 1 (the backward kernel) writes one fp32 partial per (work unit, tensor); stage 2
// sums the partials of each modulation row in a fixed order.
struct AdaLNBwdParams {
  int64_t B = 0, L = 0, D = 0;
  const void* dy = nullptr;    // [B, L, D] contiguous
  const void* dout = nullptr;  // gated op: grad of `out`, [B, L, D] contiguous; nullptr = zero
  const void* x = nullptr;
  int64_t x_sb = 0, x_sl = 0;
  const void* residual = nullptr;  // gated op only
  int64_t r_sb = 0, r_sl = 0;
  ModView gate, shift, scale;  // shift: only rows/stride metadata are used (its values do not enter the grads)
  const float* mean = nullptr;
  const float* rstd = nullptr;
  void* dx = nullptr;         // [B, L, D] contiguous, act dtype
  void* dresidual = nullptr;  // gated op only
  void* dgate = nullptr;      // [B, M_gate, D] contiguous, mod dtype (gated op only)
  void* dshift = nullptr;     // [B, M_shift, D] contiguous, mod dtype
  void* dscale = nullptr;     // [B, M_scale, D] contiguous, mod dtype
  float* workspace = nullptr;  // adaln_bwd_workspace_floats() fp32 elements (may be nullptr when that is 0)
  int num_sms = 132;
  DType act = DType::BF16;
  DType mod = DType::BF16;
};

// Largest D the kernels take: a row lives in registers (16 fp32 per thread forward; 8 backward, 4 on the
// unaligned scalar path) of at most 512 threads (__launch_bounds__(512) leaves 128 registers per thread: no
// spills in any instantiation). Larger D: the Python side uses another backend (it reads these limits from the
// binding's `limits` op).
constexpr int64_t kAdaLNMaxDFwd = 16 * 512;
constexpr int64_t kAdaLNMaxDBwd = 8 * 512;
constexpr int64_t kAdaLNMaxDBwdScalar = 4 * 512;

Status adaln_fwd(const AdaLNFwdParams& p, cudaStream_t stream);
// fp32 elements of scratch the backward needs for these shapes (0 when every gradient is per-token).
int64_t adaln_bwd_workspace_floats(const AdaLNBwdParams& p);
Status adaln_bwd(const AdaLNBwdParams& p, cudaStream_t stream);

}  // namespace wmfast
