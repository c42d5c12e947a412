// CPU check of the AdaLN backward's work geometry (csrc/adaln/adaln_geom.h), the index math no CPU test can
// run through the kernels: every token row belongs to exactly one work unit, a unit never crosses a
// modulation row of any reduced tensor, and stage 2 sums, for each modulation row, exactly the units that
// hold its rows. Built and run by tests/kernels/test_cuda_kernels.py with g++; prints "ok <cases>" or the first
// failure.
#include <cstdio>
#include <vector>

#include "../adaln/adaln_geom.h"

using namespace wmfast::adaln;

static int fail(const char* what, int64_t B, int64_t L, const int64_t rows[3], int sms) {
  std::printf("FAIL %s: B=%lld L=%lld rows=(%lld,%lld,%lld) sms=%d\n", what, (long long)B, (long long)L,
              (long long)rows[0], (long long)rows[1], (long long)rows[2], sms);
  return 1;
}

static int check(int64_t B, int64_t L, int64_t D, const int64_t rows[3], bool vec, int sms) {
  const BwdGeom g = make_geom(B, L, D, rows, vec, sms);
  if (g.chunk < 1 || g.seg < 1 || L % g.seg != 0 || g.units != B * g.segs * g.chunks_per_seg)
    return fail("geometry", B, L, rows, sms);
  if (g.nt % 32 != 0 || g.nt * (vec ? kEptBwd : kEptBwdScalar) < D) return fail("threads per row", B, L, rows, sms);
  std::vector<int64_t> unit_of(B * L, -1);
  for (int64_t w = 0; w < g.units; ++w) {
    int64_t b, lb, le;
    unit_rows(g, w, b, lb, le);
    if (b < 0 || b >= B || lb < 0 || le > L || le - lb > g.chunk) return fail("unit range", B, L, rows, sms);
    for (int64_t l = lb; l < le; ++l) {
      if (unit_of[b * L + l] != -1) return fail("row in two units", B, L, rows, sms);
      unit_of[b * L + l] = w;
    }
  }
  for (int64_t i = 0; i < B * L; ++i)
    if (unit_of[i] == -1) return fail("row in no unit", B, L, rows, sms);
  for (int k = 0; k < 3; ++k) {
    if (rows[k] <= 0) {
      if (g.mode[k] != kUnused) return fail("unused tensor has a mode", B, L, rows, sms);
      continue;
    }
    const int64_t M = rows[k], G = L / M;
    if ((G == 1) != (g.mode[k] == kPerRow)) return fail("per-row mode", B, L, rows, sms);
    if (g.mode[k] != kReduced) continue;
    if (g.slot[k] < 0 || g.slot[k] >= g.nred) return fail("slot", B, L, rows, sms);
    const int64_t J = reduce_len(g, L, M);
    if (B * M * J != g.units) return fail("stage 2 does not cover every unit once", B, L, rows, sms);
    // unit -> the modulation row stage 2 sums it into; every row of the unit must belong to it
    std::vector<int64_t> target(g.units, -1);
    for (int64_t r = 0; r < B * M; ++r)
      for (int64_t j = 0; j < J; ++j) target[r * J + j] = r;
    for (int64_t i = 0; i < B * L; ++i) {
      const int64_t b = i / L, l = i % L;
      if (target[unit_of[i]] != b * M + l / G) return fail("row summed into the wrong modulation row", B, L, rows, sms);
    }
  }
  return 0;
}

int main() {
  const int64_t Ls[] = {1, 2, 5, 6, 12, 61, 64, 96, 1000, 1536, 5120};
  int cases = 0;
  for (int64_t B : {1, 3}) {
    for (int64_t L : Ls) {
      std::vector<int64_t> ms;
      for (int64_t m : {int64_t(1), int64_t(2), int64_t(3), int64_t(5), int64_t(6), int64_t(8), L / 5, L / 2, L})
        if (m >= 1 && L % m == 0) ms.push_back(m);
      std::vector<int64_t> gates = ms;
      gates.push_back(0);  // the plain op: no gate
      for (int64_t mg : gates)
        for (int64_t ms_ : ms)
          for (int64_t mc : ms)
            for (int sms : {1, 132})
              for (bool vec : {true, false}) {
                const int64_t rows[3] = {mg, ms_, mc};
                const int64_t D = vec ? 3072 : 61;
                if (check(B, L, D, rows, vec, sms)) return 1;
                ++cases;
              }
    }
  }
  std::printf("ok %d\n", cases);
  return 0;
}
