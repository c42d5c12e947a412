// Device code shared by the AdaLN forward and backward kernels: row geometry and modulation loads.
#pragma once
#include "../common/vec.cuh"
#include "adaln.h"
#include "adaln_geom.h"

namespace wmfast {
namespace adaln {

// The VEC elements at column d0 of modulation row (b, l): 16-byte loads when VEC > 1 (the host only picks
// VEC > 1 when stride_d == 1 and every row start is 16-byte aligned), strided scalar loads otherwise.
template <typename M, int VEC>
__device__ __forceinline__ void load_mod(const ModView& mv, int64_t L, int64_t b, int64_t l, int64_t d0,
                                         float* out) {
  const int64_t m = l / (L / mv.rows);
  const M* base = static_cast<const M*>(mv.ptr) + b * mv.stride_b + m * mv.stride_m;
  if constexpr (VEC > 1) {
    load_vec<M, VEC>(base + d0, out);
  } else {
    load_vec_strided<M, VEC>(base + d0 * mv.stride_d, mv.stride_d, out);
  }
}

// True when every VEC-element group of a [B, L, D] tensor (row strides sb, sl in elements) starts on a
// 16-byte boundary; VEC = 16 / sizeof(act). The caller also requires D % VEC == 0.
inline bool act_vec_ok(const void* ptr, int VEC, int64_t sb, int64_t sl) {
  return ptr == nullptr || (aligned16(ptr) && sb % VEC == 0 && sl % VEC == 0);
}

// Same for a modulation view of element size `elem_size` (VEC * elem_size is a multiple of 16 bytes).
inline bool mod_vec_ok(const ModView& mv, int64_t elem_size) {
  return mv.ptr == nullptr || (mv.stride_d == 1 && aligned16(mv.ptr) && (mv.stride_b * elem_size) % 16 == 0 &&
                               (mv.stride_m * elem_size) % 16 == 0);
}

}  // namespace adaln
}  // namespace wmfast
