// Plain C++ types shared by the kernels and the binding (no CUDA, no torch headers).
#pragma once
#include <cstdint>

namespace wmfast {

// Element types the kernels are instantiated for. The binding maps at::ScalarType onto these.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline int dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

// Launch status: 0 = ok; otherwise a message for TORCH_CHECK (a launcher never throws: it is plain CUDA).
struct Status {
  int code = 0;          // 0 ok, 1 unsupported configuration, 2 CUDA error
  const char* msg = "";  // static string or cudaGetErrorString()
};

}  // namespace wmfast
