// C entry points of the emulated kernels for ctypes (tests/kernels/test_cuda_kernels.py); the sizes let the test
// check that its ctypes mirrors of the params structs have the C++ layout.
#include "../adaln/adaln.h"
#include "../temporal_attention/temporal_decode.h"

using namespace wmfast;

extern "C" {
int emu_adaln_fwd(const AdaLNFwdParams* p) { return adaln_fwd(*p, nullptr).code; }
long long emu_adaln_bwd_workspace(const AdaLNBwdParams* p) { return adaln_bwd_workspace_floats(*p); }
int emu_adaln_bwd(const AdaLNBwdParams* p) { return adaln_bwd(*p, nullptr).code; }
int emu_temporal_decode(const TemporalDecodeParams* p) { return temporal_decode(*p, nullptr).code; }
long long emu_sizeof_fwd() { return sizeof(AdaLNFwdParams); }
long long emu_sizeof_bwd() { return sizeof(AdaLNBwdParams); }
long long emu_sizeof_decode() { return sizeof(TemporalDecodeParams); }
}
