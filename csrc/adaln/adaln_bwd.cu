// Backward of layernorm_modulate and gated_residual_layernorm_modulate (see adaln.h for the semantics).
//
// Per row (fp32): xhat = (o - mean) * rstd with o = x (plain op) or o = residual + gate * x recomputed in
// fp32 (exact, and the same bytes as re-reading the saved `out`);
//   g = dy * (1 + scale);  do = rstd * (g - mean(g) - xhat * mean(g * xhat))          [+ dout, gated op]
//   dshift += dy;  dscale += dy * xhat;  dgate += do * x;  dresidual = do;  dx = do * gate (gated) or do.
// Modulation gradients are summed over the rows that share a modulation row, deterministically: the rows of
// each sample are cut into segments (the gcd of the reduced tensors' group lengths) and each segment into
// chunks of C rows; a row unit owns one chunk (a "work unit"), accumulates in registers and writes one fp32
// partial per reduced tensor; adaln_reduce_kernel then sums each modulation row's partials in a fixed order.
#include "adaln_common.cuh"

namespace wmfast {
namespace adaln {

template <typename T, typename M, int VEC>
__device__ __forceinline__ void emit_grad(const AdaLNBwdParams& p, const BwdGeom& g, int k, void* dmod, int64_t row,
                                          int64_t d0, const float* val, float* acc) {
  if (g.mode[k] == kPerRow) {
    store_vec<M, VEC>(static_cast<M*>(dmod) + row * p.D + d0, val);
  } else if (g.mode[k] == kReduced) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] += val[j];
  }
}

// __launch_bounds__(512, 1): with (512) alone ptxas capped the unaligned variants at 64 registers and spilled;
// with min-blocks 1 it may use up to 128 and spills nothing (checked by tests/kernels/test_cuda_kernels.py).
template <typename T, typename M, int VEC, bool GATED>
__global__ void __launch_bounds__(512, 1) adaln_bwd_kernel(const AdaLNBwdParams p, const BwdGeom g) {
  constexpr int MAXC = VEC == 1 ? kEptBwdScalar : kEptBwd / VEC;
  __shared__ float2 smem[16];
  const int nt = g.nt, tid = threadIdx.x % nt;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * g.per_block + threadIdx.x / nt;
  const bool unit_active = w < g.units;
  const int64_t D = p.D;
  int64_t b, l_begin, l_end;
  unit_rows(g, unit_active ? w : 0, b, l_begin, l_end);

  float acc[3][MAXC][VEC];
#pragma unroll
  for (int k = 0; k < 3; ++k)
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[k][c][j] = 0.f;

  // Every unit runs g.chunk iterations (masked past its end) so that all threads reach the same barriers.
  for (int64_t i = 0; i < g.chunk; ++i) {
    const int64_t l = l_begin + i;
    const bool valid = unit_active && l < l_end;
    const int64_t row = b * p.L + l;
    const float mean = valid ? p.mean[row] : 0.f, rstd = valid ? p.rstd[row] : 0.f;
    // x (gated: for dgate), xhat and dy stay in registers; scale and gate are re-read in the second pass
    // (L1/L2 hits: a modulation row is shared by many token rows) to keep every variant free of spills.
    float xin[MAXC][VEC], xhat[MAXC][VEC], dy[MAXC][VEC];
    float2 s = make_float2(0.f, 0.f);
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
      const int64_t d0 = (static_cast<int64_t>(c) * nt + tid) * VEC;
      if (!(valid && d0 < D)) continue;
      float sc[VEC], gt[VEC];
      load_vec<T, VEC>(static_cast<const T*>(p.x) + b * p.x_sb + l * p.x_sl + d0, xin[c]);
      load_vec<T, VEC>(static_cast<const T*>(p.dy) + row * D + d0, dy[c]);
      load_mod<M, VEC>(p.scale, p.L, b, l, d0, sc);
      if constexpr (GATED) {
        float r[VEC];
        load_vec<T, VEC>(static_cast<const T*>(p.residual) + b * p.r_sb + l * p.r_sl + d0, r);
        load_mod<M, VEC>(p.gate, p.L, b, l, d0, gt);
#pragma unroll
        for (int j = 0; j < VEC; ++j) xhat[c][j] = (r[j] + gt[j] * xin[c][j] - mean) * rstd;
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) xhat[c][j] = (xin[c][j] - mean) * rstd;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float gy = dy[c][j] * (1.f + sc[j]);
        s.x += gy * xhat[c][j];
        s.y += gy;
      }
    }
    s = row_sum2(s, nt, smem);
    if (!valid) continue;  // the only barrier of this iteration is behind us
    const float c1 = s.x / static_cast<float>(D), c2 = s.y / static_cast<float>(D);
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
      const int64_t d0 = (static_cast<int64_t>(c) * nt + tid) * VEC;
      if (d0 >= D) continue;
      float dsh[VEC], dsc[VEC], dn[VEC], sc[VEC];
      load_mod<M, VEC>(p.scale, p.L, b, l, d0, sc);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        dsh[j] = dy[c][j];
        dsc[j] = dy[c][j] * xhat[c][j];
        dn[j] = rstd * (dy[c][j] * (1.f + sc[j]) - c2 - xhat[c][j] * c1);
      }
      emit_grad<T, M, VEC>(p, g, 1, p.dshift, row, d0, dsh, acc[1][c]);
      emit_grad<T, M, VEC>(p, g, 2, p.dscale, row, d0, dsc, acc[2][c]);
      if constexpr (GATED) {
        float dgt[VEC], dxx[VEC], gt[VEC];
        load_mod<M, VEC>(p.gate, p.L, b, l, d0, gt);
        if (p.dout != nullptr) {
          float dou[VEC];
          load_vec<T, VEC>(static_cast<const T*>(p.dout) + row * D + d0, dou);
#pragma unroll
          for (int j = 0; j < VEC; ++j) dn[j] += dou[j];
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          dgt[j] = dn[j] * xin[c][j];
          dxx[j] = dn[j] * gt[j];
        }
        store_vec<T, VEC>(static_cast<T*>(p.dresidual) + row * D + d0, dn);
        store_vec<T, VEC>(static_cast<T*>(p.dx) + row * D + d0, dxx);
        emit_grad<T, M, VEC>(p, g, 0, p.dgate, row, d0, dgt, acc[0][c]);
      } else {
        store_vec<T, VEC>(static_cast<T*>(p.dx) + row * D + d0, dn);
      }
    }
  }
  if (!unit_active) return;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if (g.mode[k] != kReduced) continue;
    float* dst = p.workspace + (w * g.nred + g.slot[k]) * D;
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
      const int64_t d0 = (static_cast<int64_t>(c) * nt + tid) * VEC;
      if (d0 < D) store_vec<float, VEC>(dst + d0, acc[k][c]);
    }
  }
}

// Stage 2: dmod[r, d] = sum_j partial[r * J + j, slot, d] over the J work units of modulation row r
// (adaln_geom.h), in order. One thread per output element: coalesced along d.
template <typename M>
__global__ void adaln_reduce_kernel(const float* __restrict__ ws, M* __restrict__ out, int64_t rows_out,
                                    int64_t J, int nred, int slot, int64_t D) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows_out * D) return;
  const int64_t r = i / D, d = i % D;
  const float* src = ws + (r * J * nred + slot) * D + d;
  float s = 0.f;
  for (int64_t j = 0; j < J; ++j) s += src[j * nred * D];
  out[i] = from_float<M>(s);
}

bool bwd_vec_ok(const AdaLNBwdParams& p) {
  const int VEC = 16 / dtype_size(p.act);
  const int64_t msz = dtype_size(p.mod);
  return p.D % VEC == 0 && act_vec_ok(p.x, VEC, p.x_sb, p.x_sl) && act_vec_ok(p.residual, VEC, p.r_sb, p.r_sl) &&
         aligned16(p.dy) && (p.dout == nullptr || aligned16(p.dout)) && aligned16(p.dx) &&
         (p.dresidual == nullptr || aligned16(p.dresidual)) && mod_vec_ok(p.scale, msz) &&
         mod_vec_ok(p.gate, msz) && (p.dshift == nullptr || aligned16(p.dshift)) &&
         (p.dscale == nullptr || aligned16(p.dscale)) && (p.dgate == nullptr || aligned16(p.dgate));
}

BwdGeom make_geom(const AdaLNBwdParams& p) {
  // The gate exists only in the gated op; shift and scale always (only their row counts are read).
  const int64_t rows[3] = {p.residual != nullptr ? p.gate.rows : 0, p.shift.rows, p.scale.rows};
  return make_geom(p.B, p.L, p.D, rows, bwd_vec_ok(p), p.num_sms);
}

template <typename T, typename M, bool GATED>
Status launch_bwd(const AdaLNBwdParams& p, const BwdGeom& g, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>((g.units + g.per_block - 1) / g.per_block));
  const int threads = g.nt * g.per_block;
  if (g.vec) {
    launch_kernel(adaln_bwd_kernel<T, M, VEC, GATED>, grid, dim3(threads), stream, p, g);
  } else {
    launch_kernel(adaln_bwd_kernel<T, M, 1, GATED>, grid, dim3(threads), stream, p, g);
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_status(e);
  void* outs[3] = {p.dgate, p.dshift, p.dscale};
  const ModView* views[3] = {&p.gate, &p.shift, &p.scale};
  for (int k = 0; k < 3; ++k) {
    if (g.mode[k] != kReduced) continue;
    const int64_t rows_out = p.B * views[k]->rows;
    const int64_t J = reduce_len(g, p.L, views[k]->rows);
    const int64_t n = rows_out * p.D;
    launch_kernel(adaln_reduce_kernel<M>, dim3(static_cast<unsigned>((n + 255) / 256)), dim3(256), stream,
                  static_cast<const float*>(p.workspace), static_cast<M*>(outs[k]), rows_out, J, g.nred, g.slot[k],
                  p.D);
  }
  return cuda_status(cudaGetLastError());
}

template <typename T, typename M>
Status launch_bwd_gated(const AdaLNBwdParams& p, const BwdGeom& g, cudaStream_t stream) {
  return p.residual != nullptr ? launch_bwd<T, M, true>(p, g, stream) : launch_bwd<T, M, false>(p, g, stream);
}

}  // namespace adaln

int64_t adaln_bwd_workspace_floats(const AdaLNBwdParams& p) {
  if (p.B * p.L == 0) return 0;
  const adaln::BwdGeom g = adaln::make_geom(p);
  return g.units * g.nred * p.D;
}

Status adaln_bwd(const AdaLNBwdParams& p, cudaStream_t stream) {
  using namespace adaln;
  if (p.B * p.L == 0) return Status{};
  const bool mod32 = p.mod == DType::F32;
  if (!mod32 && p.mod != p.act) return Status{1, "adaln: modulation dtype must be the activation dtype or fp32"};
  const BwdGeom g = make_geom(p);
  if (g.nt > 512) return Status{1, "adaln backward: D too large for the CUDA kernel (max 4096, 2048 unaligned)"};
  if (g.nred > 0 && p.workspace == nullptr) return Status{1, "adaln backward: workspace missing"};
  switch (p.act) {
    case DType::F32: return launch_bwd_gated<float, float>(p, g, stream);
    case DType::F16:
      return mod32 ? launch_bwd_gated<__half, float>(p, g, stream) : launch_bwd_gated<__half, __half>(p, g, stream);
    case DType::BF16:
      return mod32 ? launch_bwd_gated<__nv_bfloat16, float>(p, g, stream)
                   : launch_bwd_gated<__nv_bfloat16, __nv_bfloat16>(p, g, stream);
  }
  return Status{1, "adaln: unsupported activation dtype"};
}

}  // namespace wmfast
