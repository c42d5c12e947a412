// Thin torch binding of the wmfast CUDA kernels: validates inputs (TORCH_CHECK, naming the argument and its
// shape), allocates outputs, and hands raw pointers and strides to the plain-CUDA launchers in csrc/*/.
// Ops live in the `wmfast_cuda` namespace (the Triton ops own `wmfast`); fake (meta) implementations and
// autograd are registered in Python (wmfast/ops/cuda_ext.py) so torch.compile traces these ops. The kernels'
// limits are exported by the `limits` op, so Python reads them from the headers' constants instead of a copy.
#include <Python.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "adaln/adaln.h"
#include "temporal_attention/temporal_decode.h"

namespace wmfast {
namespace {

using at::Tensor;

std::string shape_of(const Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, name, ": dtype ", t.scalar_type(), " not supported (float32, float16, bfloat16)");
  }
  return DType::F32;
}

void check_cuda(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but x is on ", ref.device());
}

void check_status(const Status& s) { TORCH_CHECK(s.code == 0, "wmfast CUDA kernel: ", s.msg); }

int num_sms(const Tensor& t) {
  int n = 0;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device());
  return n > 0 ? n : 132;
}

// x-like activations: [B, L, D], last dim contiguous (any row strides).
void check_act(const Tensor& t, const Tensor& x, const char* name) {
  check_cuda(t, x, name);
  TORCH_CHECK(t.dim() == 3, name, " must be [B, L, D], got shape ", shape_of(t));
  TORCH_CHECK(t.sizes() == x.sizes(), name, " shape ", shape_of(t), " must equal x's ", shape_of(x));
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " dtype ", t.scalar_type(), " must equal x's ",
              x.scalar_type());
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, name, ": the last dim must be contiguous, strides ", t.strides());
}

// Modulation: a [B, M, D] view (any strides) with L % M == 0, dtype = x's or float32, shared by all of them.
ModView mod_view(const Tensor& m, const Tensor& x, const char* name, at::ScalarType mod_dtype) {
  check_cuda(m, x, name);
  TORCH_CHECK(m.dim() == 3 && m.size(0) == x.size(0) && m.size(2) == x.size(2) && m.size(1) >= 1 &&
                  x.size(1) % m.size(1) == 0,
              name, " must be [B, M, D] with M dividing L (x: ", shape_of(x), "), got ", shape_of(m));
  TORCH_CHECK(m.scalar_type() == x.scalar_type() || m.scalar_type() == at::kFloat, name, " dtype ",
              m.scalar_type(), " must be x's (", x.scalar_type(), ") or float32");
  TORCH_CHECK(m.scalar_type() == mod_dtype, name, " dtype ", m.scalar_type(),
              " differs from the other modulation tensors (", mod_dtype, ")");
  ModView v;
  v.ptr = m.data_ptr();
  v.stride_b = m.stride(0);
  v.stride_m = m.stride(1);
  v.stride_d = m.stride(2);
  v.rows = m.size(1);
  return v;
}

void check_x(const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "x must be [B, L, D], got shape ", shape_of(x));
  to_dtype(x, "x");
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, "x: the last dim must be contiguous, strides ", x.strides());
}

Tensor new_like_rows(const Tensor& x) { return at::empty(x.sizes(), x.options()); }

Tensor new_stats(const Tensor& x) { return at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat)); }

std::tuple<Tensor, Tensor, Tensor> layernorm_modulate_fwd(const Tensor& x, const Tensor& shift, const Tensor& scale,
                                                          double eps) {
  check_x(x);
  const c10::cuda::CUDAGuard guard(x.device());
  AdaLNFwdParams p;
  p.B = x.size(0), p.L = x.size(1), p.D = x.size(2);
  TORCH_CHECK(p.D <= kAdaLNMaxDFwd, "x: D = ", p.D, " exceeds the CUDA kernel's maximum ", kAdaLNMaxDFwd);
  p.shift = mod_view(shift, x, "shift", shift.scalar_type());
  p.scale = mod_view(scale, x, "scale", shift.scalar_type());
  Tensor y = new_like_rows(x), mean = new_stats(x), rstd = new_stats(x);
  p.x = x.data_ptr(), p.x_sb = x.stride(0), p.x_sl = x.stride(1);
  p.y = y.data_ptr(), p.mean = mean.data_ptr<float>(), p.rstd = rstd.data_ptr<float>();
  p.eps = static_cast<float>(eps), p.act = to_dtype(x, "x"), p.mod = to_dtype(shift, "shift");
  check_status(adaln_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_residual_layernorm_modulate_fwd(
    const Tensor& residual, const Tensor& x, const Tensor& gate, const Tensor& shift, const Tensor& scale, double eps) {
  check_x(x);
  check_act(residual, x, "residual");
  const c10::cuda::CUDAGuard guard(x.device());
  AdaLNFwdParams p;
  p.B = x.size(0), p.L = x.size(1), p.D = x.size(2);
  TORCH_CHECK(p.D <= kAdaLNMaxDFwd, "x: D = ", p.D, " exceeds the CUDA kernel's maximum ", kAdaLNMaxDFwd);
  p.gate = mod_view(gate, x, "gate", gate.scalar_type());
  p.shift = mod_view(shift, x, "shift", gate.scalar_type());
  p.scale = mod_view(scale, x, "scale", gate.scalar_type());
  Tensor y = new_like_rows(x), out = new_like_rows(x), mean = new_stats(x), rstd = new_stats(x);
  p.x = x.data_ptr(), p.x_sb = x.stride(0), p.x_sl = x.stride(1);
  p.residual = residual.data_ptr(), p.r_sb = residual.stride(0), p.r_sl = residual.stride(1);
  p.y = y.data_ptr(), p.out = out.data_ptr(), p.mean = mean.data_ptr<float>(), p.rstd = rstd.data_ptr<float>();
  p.eps = static_cast<float>(eps), p.act = to_dtype(x, "x"), p.mod = to_dtype(gate, "gate");
  check_status(adaln_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {y, out, mean, rstd};
}

// Shared by both backward ops: grads, workspace, launch.
void run_bwd(AdaLNBwdParams& p, const Tensor& x, const Tensor& dy, const Tensor& mean, const Tensor& rstd) {
  check_act(dy, x, "dy");
  TORCH_CHECK(dy.is_contiguous(), "dy must be contiguous (the autograd wrapper makes it so)");
  for (const Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->is_cuda() && s->scalar_type() == at::kFloat && s->is_contiguous() &&
                    s->numel() == x.size(0) * x.size(1),
                "mean/rstd must be contiguous float32 [B, L] from the forward, got ", shape_of(*s));
  }
  TORCH_CHECK(p.D <= kAdaLNMaxDBwd, "x: D = ", p.D, " exceeds the CUDA backward's maximum ", kAdaLNMaxDBwd);
  p.dy = dy.data_ptr(), p.mean = mean.data_ptr<float>(), p.rstd = rstd.data_ptr<float>();
  p.x = x.data_ptr(), p.x_sb = x.stride(0), p.x_sl = x.stride(1);
  p.num_sms = num_sms(x);
  const int64_t ws = adaln_bwd_workspace_floats(p);
  Tensor workspace = at::empty({ws > 0 ? ws : 1}, x.options().dtype(at::kFloat));
  p.workspace = ws > 0 ? workspace.data_ptr<float>() : nullptr;
  check_status(adaln_bwd(p, c10::cuda::getCurrentCUDAStream()));
}

Tensor mod_grad(const Tensor& m) { return at::empty({m.size(0), m.size(1), m.size(2)}, m.options()); }

std::tuple<Tensor, Tensor, Tensor> layernorm_modulate_bwd(const Tensor& dy, const Tensor& x, const Tensor& shift,
                                                          const Tensor& scale, const Tensor& mean,
                                                          const Tensor& rstd) {
  check_x(x);
  const c10::cuda::CUDAGuard guard(x.device());
  AdaLNBwdParams p;
  p.B = x.size(0), p.L = x.size(1), p.D = x.size(2);
  p.shift = mod_view(shift, x, "shift", shift.scalar_type());
  p.scale = mod_view(scale, x, "scale", shift.scalar_type());
  p.act = to_dtype(x, "x"), p.mod = to_dtype(shift, "shift");
  Tensor dx = new_like_rows(x).contiguous(), dshift = mod_grad(shift), dscale = mod_grad(scale);
  p.dx = dx.data_ptr(), p.dshift = dshift.data_ptr(), p.dscale = dscale.data_ptr();
  run_bwd(p, x, dy, mean, rstd);
  return {dx, dshift, dscale};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_layernorm_modulate_bwd(
    const Tensor& dy, const std::optional<Tensor>& dout, const Tensor& residual, const Tensor& x, const Tensor& gate,
    const Tensor& shift, const Tensor& scale, const Tensor& mean, const Tensor& rstd) {
  check_x(x);
  check_act(residual, x, "residual");
  const c10::cuda::CUDAGuard guard(x.device());
  AdaLNBwdParams p;
  p.B = x.size(0), p.L = x.size(1), p.D = x.size(2);
  p.gate = mod_view(gate, x, "gate", gate.scalar_type());
  p.shift = mod_view(shift, x, "shift", gate.scalar_type());
  p.scale = mod_view(scale, x, "scale", gate.scalar_type());
  p.act = to_dtype(x, "x"), p.mod = to_dtype(gate, "gate");
  p.residual = residual.data_ptr(), p.r_sb = residual.stride(0), p.r_sl = residual.stride(1);
  if (dout.has_value() && dout->defined()) {
    check_act(*dout, x, "dout");
    TORCH_CHECK(dout->is_contiguous(), "dout must be contiguous (the autograd wrapper makes it so)");
    p.dout = dout->data_ptr();
  }
  Tensor dres = new_like_rows(x), dx = new_like_rows(x);
  Tensor dgate = mod_grad(gate), dshift = mod_grad(shift), dscale = mod_grad(scale);
  p.dresidual = dres.data_ptr(), p.dx = dx.data_ptr();
  p.dgate = dgate.data_ptr(), p.dshift = dshift.data_ptr(), p.dscale = dscale.data_ptr();
  run_bwd(p, x, dy, mean, rstd);
  return {dres, dx, dgate, dshift, dscale};
}

void check_qkv(const Tensor& t, const Tensor& q, const char* name) {
  check_cuda(t, q, name);
  TORCH_CHECK(t.sizes() == q.sizes(), name, " shape ", shape_of(t), " must equal q's ", shape_of(q));
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " dtype ", t.scalar_type(), " must equal q's ",
              q.scalar_type());
  TORCH_CHECK(t.stride(4) == 1, name, ": the last dim must be contiguous, strides ", t.strides());
}

void check_cache(const Tensor& c, const Tensor& q, const char* name) {
  check_cuda(c, q, name);
  TORCH_CHECK(c.dim() == 5 && c.size(0) == q.size(0) && c.size(1) == q.size(2) && c.size(2) == q.size(3) &&
                  c.size(4) == q.size(4),
              name, " must be [B, S, H, T_max, Dh] matching q ", shape_of(q), ", got ", shape_of(c));
  TORCH_CHECK(c.scalar_type() == q.scalar_type(), name, " dtype ", c.scalar_type(), " must equal q's ",
              q.scalar_type());
  TORCH_CHECK(c.stride(4) == 1, name, ": the last dim must be contiguous, strides ", c.strides());
}

Tensor temporal_decode_step(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache,
                            int64_t t) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 5 && q.size(1) == 1, "q must be [B, 1, S, H, Dh], got ", shape_of(q));
  TORCH_CHECK(temporal_decode_supports_head_dim(q.size(4)), "q: head dim ", q.size(4),
              " not supported by the CUDA kernel (32, 64, 128)");
  to_dtype(q, "q");
  TORCH_CHECK(q.stride(4) == 1, "q: the last dim must be contiguous, strides ", q.strides());
  check_qkv(k, q, "k");
  check_qkv(v, q, "v");
  check_cache(k_cache, q, "k_cache");
  check_cache(v_cache, q, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache ", shape_of(k_cache), " and v_cache ",
              shape_of(v_cache), " must have the same shape");
  // both caches are written at position t: shared memory would let one write clobber the other
  const at::MemOverlapStatus overlap = at::get_overlap_status(k_cache, v_cache);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial,
              "k_cache and v_cache share memory: they must be separate buffers");
  TORCH_CHECK(0 <= t && t < k_cache.size(3), "t = ", t, " out of range for T_max = ", k_cache.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor o = at::empty(q.sizes(), q.options());
  TemporalDecodeParams p;
  p.B = q.size(0), p.S = q.size(2), p.H = q.size(3), p.T_max = k_cache.size(3), p.Dh = q.size(4), p.t = t;
  p.q = q.data_ptr(), p.q_sb = q.stride(0), p.q_ss = q.stride(2), p.q_sh = q.stride(3);
  p.k = k.data_ptr(), p.k_sb = k.stride(0), p.k_ss = k.stride(2), p.k_sh = k.stride(3);
  p.v = v.data_ptr(), p.v_sb = v.stride(0), p.v_ss = v.stride(2), p.v_sh = v.stride(3);
  p.k_cache = k_cache.data_ptr();
  p.kc_sb = k_cache.stride(0), p.kc_ss = k_cache.stride(1), p.kc_sh = k_cache.stride(2), p.kc_st = k_cache.stride(3);
  p.v_cache = v_cache.data_ptr();
  p.vc_sb = v_cache.stride(0), p.vc_ss = v_cache.stride(1), p.vc_sh = v_cache.stride(2), p.vc_st = v_cache.stride(3);
  p.o = o.data_ptr(), p.dtype = to_dtype(q, "q");
  check_status(temporal_decode(p, c10::cuda::getCurrentCUDAStream()));
  return o;
}

// The kernels' limits as (name, value) pairs, from the headers' constants: the Python side's support checks
// read them here (wmfast/ops/cuda_ext.py limits()).
std::tuple<std::vector<std::string>, std::vector<int64_t>> limits() {
  std::vector<std::string> names = {"adaln_max_d_fwd", "adaln_max_d_bwd", "adaln_max_d_bwd_unaligned"};
  std::vector<int64_t> values = {kAdaLNMaxDFwd, kAdaLNMaxDBwd, kAdaLNMaxDBwdScalar};
  for (int64_t d : kTemporalDecodeHeadDims) {
    names.push_back("decode_head_dim");
    values.push_back(d);
  }
  return {names, values};
}

}  // namespace
}  // namespace wmfast

TORCH_LIBRARY(wmfast_cuda, m) {
  m.def("limits() -> (str[], int[])", &wmfast::limits);
  m.def("layernorm_modulate_fwd(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layernorm_modulate_bwd(Tensor dy, Tensor x, Tensor shift, Tensor scale, Tensor mean, Tensor rstd)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("gated_residual_layernorm_modulate_fwd(Tensor residual, Tensor x, Tensor gate, Tensor shift, "
        "Tensor scale, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_layernorm_modulate_bwd(Tensor dy, Tensor? dout, Tensor residual, Tensor x, Tensor gate, "
        "Tensor shift, Tensor scale, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("temporal_decode_step(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, int t)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(wmfast_cuda, CUDA, m) {
  m.impl("layernorm_modulate_fwd", &wmfast::layernorm_modulate_fwd);
  m.impl("layernorm_modulate_bwd", &wmfast::layernorm_modulate_bwd);
  m.impl("gated_residual_layernorm_modulate_fwd", &wmfast::gated_residual_layernorm_modulate_fwd);
  m.impl("gated_residual_layernorm_modulate_bwd", &wmfast::gated_residual_layernorm_modulate_bwd);
  m.impl("temporal_decode_step", &wmfast::temporal_decode_step);
}

// `import wmfast._C` loads this library (its static initialisers register the ops above); the module itself
// is empty. The JIT path loads the same file with torch.ops.load_library, which never calls this.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "wmfast CUDA ops (torch.ops.wmfast_cuda)", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
