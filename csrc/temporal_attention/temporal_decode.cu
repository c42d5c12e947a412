// Fused temporal decode step (see temporal_decode.h): append k, v at t and attend over positions <= t.
//
// The regime is ~10^5 independent sequences (B*S*H) of length <= T_max ~ 16: each sequence gets a small
// group of TPS lanes that together hold one Dh vector (16-byte loads: Dh = 128 bf16 -> 16 lanes, 2 sequences
// per warp), the dot products reduce with xor shuffles inside the group, and the softmax runs online in
// fp32 (exp2 with the log2(e) folded into q). No shared memory, no barriers; the new k, v are used from
// registers, so the kernel reads each cached position once and writes one position.
#include <initializer_list>

#include "../common/vec.cuh"
#include "temporal_decode.h"

namespace wmfast {
namespace tdec {

constexpr int kThreads = 128;
// __launch_bounds__(kThreads, 1): without the min-blocks hint ptxas held Dh 32/64 at 64 registers and spilled.

template <typename T, int DH, int VEC>
__global__ void __launch_bounds__(kThreads, 1) temporal_decode_kernel(const TemporalDecodeParams p) {
  constexpr int TPS = DH / VEC < 32 ? DH / VEC : 32;  // lanes per sequence (a power of two)
  constexpr int CH = DH / (TPS * VEC);                // VEC-wide chunks per lane
  const int lane = threadIdx.x % TPS;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (kThreads / TPS) + threadIdx.x / TPS;
  const bool active = n < p.B * p.S * p.H;  // inactive groups still join the (full-mask) shuffles
  const int64_t h = active ? n % p.H : 0, bs = active ? n / p.H : 0, s = bs % p.S, b = bs / p.S;

  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + s * p.q_ss + h * p.q_sh;
  const T* kn = static_cast<const T*>(p.k) + b * p.k_sb + s * p.k_ss + h * p.k_sh;
  const T* vn = static_cast<const T*>(p.v) + b * p.v_sb + s * p.v_ss + h * p.v_sh;
  T* kc = static_cast<T*>(p.k_cache) + b * p.kc_sb + s * p.kc_ss + h * p.kc_sh;
  T* vc = static_cast<T*>(p.v_cache) + b * p.vc_sb + s * p.vc_ss + h * p.vc_sh;

  const float qscale = rsqrtf(static_cast<float>(DH)) * 1.4426950408889634f;  // Dh^-0.5 * log2(e)
  float qr[CH][VEC], kt[CH][VEC], vt[CH][VEC], acc[CH][VEC];
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int d0 = (c * TPS + lane) * VEC;
    if (active) {
      load_vec<T, VEC>(q + d0, qr[c]);
      load_vec<T, VEC>(kn + d0, kt[c]);
      load_vec<T, VEC>(vn + d0, vt[c]);  // same dtype as the cache: position t reads back exactly these values
      store_vec<T, VEC>(kc + p.t * p.kc_st + d0, kt[c]);  // the append
      store_vec<T, VEC>(vc + p.t * p.vc_st + d0, vt[c]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) qr[c][j] = kt[c][j] = vt[c][j] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      qr[c][j] *= qscale;
      acc[c][j] = 0.f;
    }
  }
  float m = -INFINITY, l = 0.f;
#pragma unroll 4
  for (int64_t u = 0; u <= p.t; ++u) {
    float kr[CH][VEC], vr[CH][VEC];
    float sc = 0.f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int d0 = (c * TPS + lane) * VEC;
      if (u == p.t || !active) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          kr[c][j] = kt[c][j];
          vr[c][j] = vt[c][j];
        }
      } else {
        load_vec<T, VEC>(kc + u * p.kc_st + d0, kr[c]);
        load_vec<T, VEC>(vc + u * p.vc_st + d0, vr[c]);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) sc += qr[c][j] * kr[c][j];
    }
    sc = warp_sum<TPS>(sc);  // log2-domain score of position u, in every lane of the group
    const float m_new = fmaxf(m, sc), corr = exp2f(m - m_new), pu = exp2f(sc - m_new);
    l = l * corr + pu;
#pragma unroll
    for (int c = 0; c < CH; ++c)
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[c][j] = acc[c][j] * corr + pu * vr[c][j];
    m = m_new;
  }
  if (!active) return;
  const float inv = 1.f / l;
  T* o = static_cast<T*>(p.o) + n * DH;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    float r[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) r[j] = acc[c][j] * inv;
    store_vec<T, VEC>(o + (c * TPS + lane) * VEC, r);
  }
}

template <typename T, int DH>
Status launch(const TemporalDecodeParams& p, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const auto ok = [](const void* ptr, std::initializer_list<int64_t> strides) {
    if (!aligned16(ptr)) return false;
    for (int64_t st : strides)
      if (st % VEC != 0) return false;
    return true;
  };
  const bool vec = ok(p.q, {p.q_sb, p.q_ss, p.q_sh}) && ok(p.k, {p.k_sb, p.k_ss, p.k_sh}) &&
                   ok(p.v, {p.v_sb, p.v_ss, p.v_sh}) && ok(p.k_cache, {p.kc_sb, p.kc_ss, p.kc_sh, p.kc_st}) &&
                   ok(p.v_cache, {p.vc_sb, p.vc_ss, p.vc_sh, p.vc_st}) && aligned16(p.o);
  const int64_t seqs = p.B * p.S * p.H;
  const int tps = vec ? (DH / VEC < 32 ? DH / VEC : 32) : 32;
  const int64_t per_block = kThreads / tps;
  const dim3 grid(static_cast<unsigned>((seqs + per_block - 1) / per_block));
  if (vec) {
    launch_kernel(temporal_decode_kernel<T, DH, VEC>, grid, dim3(kThreads), stream, p);
  } else {
    launch_kernel(temporal_decode_kernel<T, DH, 1>, grid, dim3(kThreads), stream, p);
  }
  return cuda_status(cudaGetLastError());
}

template <typename T>
Status launch_dh(const TemporalDecodeParams& p, cudaStream_t stream) {
  switch (p.Dh) {
    case 32: return launch<T, 32>(p, stream);
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
  }
  return Status{1, "temporal_decode: head dim must be 32, 64 or 128"};
}

}  // namespace tdec

Status temporal_decode(const TemporalDecodeParams& p, cudaStream_t stream) {
  if (p.t < 0 || p.t >= p.T_max) return Status{1, "temporal_decode: t out of range [0, T_max)"};
  if (p.B * p.S * p.H == 0) return Status{};
  switch (p.dtype) {
    case DType::F32: return tdec::launch_dh<float>(p, stream);
    case DType::F16: return tdec::launch_dh<__half>(p, stream);
    case DType::BF16: return tdec::launch_dh<__nv_bfloat16>(p, stream);
  }
  return Status{1, "temporal_decode: unsupported dtype"};
}

}  // namespace wmfast
