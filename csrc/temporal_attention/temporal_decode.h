// Fused temporal decode step: host-side interface (plain C++; no torch headers).
//
// Semantics (the specification is temporal_decode_ref in kernels/temporal_attention.py): for every
// (b, s, h), write the new frame's k, v at position t of the caches [B, S, H, T_max, Dh], then
//   o = softmax(q . k_cache[0..t] * Dh^-0.5) @ v_cache[0..t]      (fp32 math, output in q's dtype)
// q, k, v are [B, 1, S, H, Dh] views given by strides; the last dim of every tensor must be contiguous.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/dtypes.h"

namespace wmfast {

struct TemporalDecodeParams {
  int64_t B = 0, S = 0, H = 0, T_max = 0, Dh = 0;
  int64_t t = 0;  // 0 <= t < T_max
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_sb = 0, q_ss = 0, q_sh = 0;  // strides of q (elements); the frame dim has size 1
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  int64_t v_sb = 0, v_ss = 0, v_sh = 0;
  void* k_cache = nullptr;  // [B, S, H, T_max, Dh], written at t
  void* v_cache = nullptr;
  int64_t kc_sb = 0, kc_ss = 0, kc_sh = 0, kc_st = 0;
  int64_t vc_sb = 0, vc_ss = 0, vc_sh = 0, vc_st = 0;
  void* o = nullptr;  // [B, 1, S, H, Dh] contiguous
  DType dtype = DType::BF16;  // q, k, v, caches and o share it
};

// Head dims the kernel is instantiated for (exported to Python by the binding's `limits` op).
constexpr int64_t kTemporalDecodeHeadDims[] = {32, 64, 128};
inline bool temporal_decode_supports_head_dim(int64_t Dh) {
  for (int64_t d : kTemporalDecodeHeadDims) {
    if (Dh == d) return true;
  }
  return false;
}

Status temporal_decode(const TemporalDecodeParams& p, cudaStream_t stream);

}  // namespace wmfast
