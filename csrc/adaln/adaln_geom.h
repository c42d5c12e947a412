// Work geometry of the AdaLN kernels, as plain C++ shared by the host launchers, the device code and the
// CPU test (tests/kernels/test_cuda_kernels.py compiles this header with g++ and checks that the backward's work
// units and its stage-2 reduction cover every (row, modulation row) exactly once, for many shapes).
#pragma once
#include <cstdint>
#include <numeric>

#ifdef __CUDACC__
#define WMFAST_HD __host__ __device__ __forceinline__
#else
#define WMFAST_HD inline
#endif

namespace wmfast {
namespace adaln {

// Threads per row unit: the smallest multiple of 32 whose threads hold the row in `ept` registers each.
// nt == 32 is the "one warp per row" regime (D <= 32 * ept: reductions are shuffles only); larger D gets a
// block of nt threads per row (reductions through shared memory).
inline int threads_per_row(int64_t D, int ept) {
  int64_t nt = (D + ept - 1) / ept;
  nt = (nt + 31) / 32 * 32;
  return static_cast<int>(nt < 32 ? 32 : nt);
}

// Row units per block: small rows share a 128-thread block (4 warps) so a block still has enough
// independent loads in flight; a row of >= 128 threads is its own block.
inline int units_per_block(int nt) { return nt >= 128 ? 1 : 128 / nt; }

// fp32 elements of a row per thread in the backward: x, xhat, dy and three accumulators fit in 128
// registers. The scalar (unaligned) path holds 4: its per-element address arithmetic spilled at 8 in the
// gated variant.
constexpr int kEptBwd = 8;
constexpr int kEptBwdScalar = 4;

enum Mode : int { kUnused = 0, kPerRow = 1, kReduced = 2 };

struct BwdGeom {
  int64_t seg = 1;    // rows per segment (gcd of the reduced tensors' rows per modulation row)
  int64_t chunk = 1;  // rows per work unit
  int64_t chunks_per_seg = 1;
  int64_t segs = 1;   // segments per sample
  int64_t units = 0;  // B * segs * chunks_per_seg
  int nred = 0;       // reduced tensors (workspace slots)
  int mode[3] = {kUnused, kUnused, kUnused};  // gate, shift, scale
  int slot[3] = {0, 0, 0};
  int nt = 32, per_block = 1;
  bool vec = true;  // 16-byte loads (every pointer and stride aligned, D % VEC == 0)
};

// rows[k]: modulation rows M of gate, shift, scale (0 = tensor unused). A tensor with one modulation row per
// token (L / M == 1) gets per-row gradients; the others are reduced. Segments have the gcd of the reduced
// tensors' group lengths, so a segment never straddles a modulation row of any of them.
inline BwdGeom make_geom(int64_t B, int64_t L, int64_t D, const int64_t rows[3], bool vec, int num_sms) {
  BwdGeom g;
  g.vec = vec;
  int64_t seg = 0;
  for (int k = 0; k < 3; ++k) {
    if (rows[k] <= 0) continue;
    const int64_t group = L / rows[k];
    if (group == 1) {
      g.mode[k] = kPerRow;
    } else {
      g.mode[k] = kReduced;
      g.slot[k] = g.nred++;
      seg = std::gcd(seg, group);
    }
  }
  g.seg = seg > 0 ? seg : L;
  g.segs = L / g.seg;
  g.nt = threads_per_row(D, vec ? kEptBwd : kEptBwdScalar);
  g.per_block = units_per_block(g.nt);
  // Enough work units for ~2048 resident threads per SM; reduced gradients keep chunks of >= 16 rows so
  // the fp32 partials stay <= nred/8 of dy's bytes (bf16). Untuned: no GPU measurement yet.
  const int64_t target = (static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 2048) / g.nt;
  int64_t chunk = (B * L + (target > 0 ? target : 1) - 1) / (target > 0 ? target : 1);
  if (chunk < 1) chunk = 1;
  if (g.nred > 0 && chunk < 16) chunk = 16;
  g.chunk = chunk < g.seg ? chunk : g.seg;
  g.chunks_per_seg = (g.seg + g.chunk - 1) / g.chunk;
  g.units = B * g.segs * g.chunks_per_seg;
  return g;
}

// The rows [l_begin, l_end) of sample b that work unit w owns (empty past the end of its segment).
WMFAST_HD void unit_rows(const BwdGeom& g, int64_t w, int64_t& b, int64_t& l_begin, int64_t& l_end) {
  const int64_t per_sample = g.segs * g.chunks_per_seg;
  b = w / per_sample;
  const int64_t rem = w % per_sample, seg = rem / g.chunks_per_seg;
  l_begin = seg * g.seg + (rem % g.chunks_per_seg) * g.chunk;
  const int64_t seg_end = (seg + 1) * g.seg;
  l_end = l_begin + g.chunk < seg_end ? l_begin + g.chunk : seg_end;
}

// Stage 2: modulation row r (= b * M + m) of a reduced tensor with M rows sums the partials of work units
// r * J + j, j < J, with J = reduce_len(...): the units are ordered (sample, segment, chunk), and the
// segments of one modulation row are consecutive.
WMFAST_HD int64_t reduce_len(const BwdGeom& g, int64_t L, int64_t M) { return (L / M / g.seg) * g.chunks_per_seg; }

}  // namespace adaln
}  // namespace wmfast
