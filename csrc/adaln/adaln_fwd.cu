// Forward of layernorm_modulate and gated_residual_layernorm_modulate (see adaln.h for the semantics).
//
// One row unit (nt threads: a warp for D <= 512, a block for larger D) owns one token row and keeps it in
// registers (<= 16 fp32 per thread), so x is read once: 16-byte loads, two-pass fp32 statistics (mean,
// then the centred sum of squares: no cancellation), then y written with 16-byte stores.
#include <cfloat>

#include "adaln_common.cuh"

namespace wmfast {
namespace adaln {

constexpr int kEptFwd = 16;  // fp32 registers per thread for the row (D <= 32 * 16 = 512 -> one warp)

template <typename T, typename M, int VEC, bool GATED>
__global__ void __launch_bounds__(512, 1) adaln_fwd_kernel(const AdaLNFwdParams p, int nt) {
  constexpr int MAXC = kEptFwd / VEC;
  __shared__ float smem[32];
  const int unit = threadIdx.x / nt, tid = threadIdx.x % nt;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / nt) + unit;
  const bool active = row < p.B * p.L;  // inactive units still reach every barrier in row_sum
  const int64_t b = active ? row / p.L : 0, l = active ? row % p.L : 0, D = p.D;
  const T* x = static_cast<const T*>(p.x) + b * p.x_sb + l * p.x_sl;

  float v[MAXC][VEC];
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    const int64_t d0 = (static_cast<int64_t>(c) * nt + tid) * VEC;
    if (active && d0 < D) {
      load_vec<T, VEC>(x + d0, v[c]);
      if constexpr (GATED) {
        float r[VEC], g[VEC];
        load_vec<T, VEC>(static_cast<const T*>(p.residual) + b * p.r_sb + l * p.r_sl + d0, r);
        load_mod<M, VEC>(p.gate, p.L, b, l, d0, g);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[c][j] = r[j] + g[j] * v[c][j];  // fp32 `out`: y is computed from it
        store_vec<T, VEC>(static_cast<T*>(p.out) + row * D + d0, v[c]);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += v[c][j];
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[c][j] = 0.f;
    }
  }
  const float mean = row_sum(sum, nt, smem) / static_cast<float>(D);
  float sq = 0.f;
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    const int64_t d0 = (static_cast<int64_t>(c) * nt + tid) * VEC;
    if (d0 < D) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) sq += (v[c][j] - mean) * (v[c][j] - mean);
    }
  }
  const float var = row_sum(sq, nt, smem) / static_cast<float>(D);
  // a variance that overflowed fp32 makes the row NaN, as in the references (rsqrtf(inf) = 0 would give y = shift);
  // the backward reads this rstd, so the row's gradients are NaN too
  const float rstd = var <= FLT_MAX ? rsqrtf(var + p.eps) : nanf("");  // (false for a NaN var too)
  if (!active) return;  // no barrier below
  if (tid == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    const int64_t d0 = (static_cast<int64_t>(c) * nt + tid) * VEC;
    if (d0 < D) {
      float sh[VEC], sc[VEC], y[VEC];
      load_mod<M, VEC>(p.shift, p.L, b, l, d0, sh);
      load_mod<M, VEC>(p.scale, p.L, b, l, d0, sc);
#pragma unroll
      for (int j = 0; j < VEC; ++j) y[j] = (v[c][j] - mean) * rstd * (1.f + sc[j]) + sh[j];
      store_vec<T, VEC>(static_cast<T*>(p.y) + row * D + d0, y);
    }
  }
}

template <typename T, typename M, bool GATED>
Status launch_fwd(const AdaLNFwdParams& p, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t msz = sizeof(M);
  const bool vec = p.D % VEC == 0 && act_vec_ok(p.x, VEC, p.x_sb, p.x_sl) &&
                   act_vec_ok(p.residual, VEC, p.r_sb, p.r_sl) && aligned16(p.y) &&
                   (p.out == nullptr || aligned16(p.out)) && mod_vec_ok(p.shift, msz) &&
                   mod_vec_ok(p.scale, msz) && mod_vec_ok(p.gate, msz);
  // Both paths hold kEptFwd elements of the row a thread (MAXC chunks of VEC, or 16 scalars: no spill at
  // D=8192 either way, tests/kernels/test_cuda_kernels.py), so they need the same threads per row.
  const int nt = threads_per_row(p.D, kEptFwd);
  if (nt > 512) return Status{1, "adaln forward: D too large for the CUDA kernel (max 8192)"};
  const int units = units_per_block(nt);
  const int64_t rows = p.B * p.L;
  const dim3 grid(static_cast<unsigned>((rows + units - 1) / units));
  if (vec) {
    launch_kernel(adaln_fwd_kernel<T, M, VEC, GATED>, grid, dim3(nt * units), stream, p, nt);
  } else {
    launch_kernel(adaln_fwd_kernel<T, M, 1, GATED>, grid, dim3(nt * units), stream, p, nt);
  }
  return cuda_status(cudaGetLastError());
}

template <typename T, typename M>
Status launch_fwd_gated(const AdaLNFwdParams& p, cudaStream_t stream) {
  return p.residual != nullptr ? launch_fwd<T, M, true>(p, stream) : launch_fwd<T, M, false>(p, stream);
}

}  // namespace adaln

Status adaln_fwd(const AdaLNFwdParams& p, cudaStream_t stream) {
  using namespace adaln;
  if (p.B * p.L == 0) return Status{};
  if (p.D > kAdaLNMaxDFwd) return Status{1, "adaln forward: D too large for the CUDA kernel (max 8192)"};
  const bool mod32 = p.mod == DType::F32;
  if (!mod32 && p.mod != p.act) return Status{1, "adaln: modulation dtype must be the activation dtype or fp32"};
  switch (p.act) {
    case DType::F32: return launch_fwd_gated<float, float>(p, stream);
    case DType::F16:
      return mod32 ? launch_fwd_gated<__half, float>(p, stream) : launch_fwd_gated<__half, __half>(p, stream);
    case DType::BF16:
      return mod32 ? launch_fwd_gated<__nv_bfloat16, float>(p, stream)
                   : launch_fwd_gated<__nv_bfloat16, __nv_bfloat16>(p, stream);
  }
  return Status{1, "adaln: unsupported activation dtype"};
}

}  // namespace wmfast
