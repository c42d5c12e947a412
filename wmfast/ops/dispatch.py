"""Which backend runs an op: one capability model for every op of wmfast.ops.

Backends:
- "cuda": the CUDA C++ extension (`wmfast.ops.cuda_ext`; CUDA tensors only; an optional build).
- "triton": the Triton kernels of `wmfast.kernels`. Runs on CUDA tensors, and on CPU tensors when
  TRITON_INTERPRET=1 was set before triton was imported (the interpreter runs the real kernel code).
- "torch": the pure-torch reference of each op (any device; torch.compile traces it natively).

Each backend states `unsupported_reasons(op, inputs) -> list[str]` (empty: it can run these inputs): whether it
implements the op, the device, whether it is installed, and the op's limits (the CUDA limits come from the loaded
extension, the Triton ones from the kernels). One ValueError lists every backend's reasons when none can run.

Forcing: `with wmfast.ops.use_backend("triton"): ...` (also a decorator) forces a backend in this context;
`use_backend(None)` restores the automatic choice; `WMFAST_BACKEND=triton|cuda|torch` is the default when no context
forces one. A forced backend without the op (e.g. "cuda" for gated_residual) leaves it to the automatic choice.

The automatic choice, among the backends an op lists (`OPS`, in preference order):
- CUDA tensors: the fastest usable of cuda/triton for the op and shape:
  1. the measured table of this GPU (`wmfast.kernels.tuning`: kernels/configs/<gpu>.json; per op and shape key);
  2. else, when the caller passes `runners` (one zero-argument callable per backend), a one-time timing at
     first use (cached per GPU, op and shape key; never while torch.compile traces or a CUDA graph captures;
     WMFAST_AUTOTUNE=0 turns it off);
  3. else the preference order.
- CPU tensors: triton under the interpreter, else torch (`note_fallback`: one INFO line per device type, each
  op's reasons at DEBUG level). `traceable_backend` is the same choice for code that torch.compile traces.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from wmfast.kernels import tuning
from wmfast.kernels._launch import triton_interpret
from wmfast.ops import cuda_ext
from wmfast.ops.common import log_fallback, log_once, logger

BACKENDS = ("triton", "cuda", "torch")

# Each op's backends, in preference order on CUDA tensors when nothing is measured.
OPS: dict[str, tuple[str, ...]] = {
    "layernorm_modulate": ("cuda", "triton", "torch"),
    "gated_residual_layernorm_modulate": ("cuda", "triton", "torch"),
    "gated_residual": ("triton", "torch"),
    "temporal_attention": ("triton", "torch"),
    "temporal_decode_step": ("cuda", "triton", "torch"),
    "ensemble_euler_step": ("triton", "torch"),
    "ensemble_mean_var": ("triton", "torch"),
    "layer_norm": ("triton", "torch"),
    "residual_layer_norm": ("triton", "torch"),
    "greedy_head": ("triton", "torch"),
    "norm_linear": ("triton", "torch"),
}
_DEFAULT_ORDER = ("triton", "torch")  # an op not listed in OPS
_ADALN_OPS = frozenset({"layernorm_modulate", "gated_residual_layernorm_modulate", "gated_residual"})
_LAYER_NORM_OPS = frozenset({"layer_norm", "residual_layer_norm"})


@dataclass(frozen=True)
class OpInputs:
    """What the backends' limits depend on: the device, dtype and shape of the op's main tensor (x for AdaLN,
    q for attention) and whether a backward will be needed. Without dtype/shape only the device is checked."""

    device: torch.device
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()
    backward: bool = False

    @classmethod
    def of(cls, t: torch.Tensor, backward: bool = False) -> OpInputs:
        return cls(t.device, t.dtype, tuple(t.shape), backward)


# ------------------------------------------------------------------------------------------------------ backends
@functools.cache
def triton_available() -> tuple[bool, str]:
    """(usable, reason) for the Triton backend on this machine."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the backend is unusable
        return False, f"triton cannot be imported: {e}"
    if triton_interpret():
        return True, "TRITON_INTERPRET=1: kernels run on the CPU through the interpreter"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    return True, f"CUDA device {torch.cuda.get_device_name()}"


def cuda_ext_available() -> tuple[bool, str]:
    """(usable, reason) for the CUDA C++ extension; loading it also registers its fake/autograd functions."""
    return cuda_ext.available()


class Backend:
    """A backend: its name, whether this machine has it, and why it cannot run an op's inputs."""

    name = ""

    def available(self) -> tuple[bool, str]:
        return True, "always"

    def implements(self, op: str) -> bool:
        """Whether this backend has the op at all (forcing a backend that lacks an op leaves the op to the
        automatic choice)."""
        return True

    def unsupported_reasons(self, op: str, inputs: OpInputs) -> list[str]:
        raise NotImplementedError


class TorchBackend(Backend):
    name = "torch"

    def available(self) -> tuple[bool, str]:
        return True, "pure-torch references run on any device"

    def unsupported_reasons(self, op: str, inputs: OpInputs) -> list[str]:
        return []


class TritonBackend(Backend):
    name = "triton"

    def available(self) -> tuple[bool, str]:
        return triton_available()

    def unsupported_reasons(self, op: str, inputs: OpInputs) -> list[str]:
        if inputs.device.type == "cpu" and not triton_interpret():
            return ["CPU tensors need TRITON_INTERPRET=1 (set before importing triton)"]
        ok, why = triton_available()
        if not ok:
            return [why]
        if op in _ADALN_OPS and inputs.shape:
            from wmfast.kernels import adaln

            D = inputs.shape[-1]
            if D > adaln.MAX_D:  # wider rows would spill (kernels/adaln.py)
                return [f"D={D} (x shape {inputs.shape}) exceeds the Triton kernels' limit D <= {adaln.MAX_D}"]
        if op in _LAYER_NORM_OPS and inputs.shape:
            from wmfast.kernels import layernorm

            D = inputs.shape[-1]
            if D > layernorm.MAX_D:
                return [f"D={D} (x shape {inputs.shape}) exceeds the Triton kernel's limit D <= {layernorm.MAX_D}"]
        return []


class CudaBackend(Backend):
    name = "cuda"
    OPS = frozenset(op for op, order in OPS.items() if "cuda" in order)

    def available(self) -> tuple[bool, str]:
        return cuda_ext_available()

    def implements(self, op: str) -> bool:
        return op in self.OPS

    def unsupported_reasons(self, op: str, inputs: OpInputs) -> list[str]:
        if not self.implements(op):
            return [f"the CUDA extension has no {op}"]
        if inputs.device.type != "cuda":
            return [f"needs CUDA tensors, got {inputs.device}"]
        ok, why = cuda_ext_available()
        if not ok:
            return [why]
        if inputs.dtype is None or not inputs.shape:
            return []
        if op == "temporal_decode_step":
            return cuda_ext.decode_reasons(inputs.shape[-1], inputs.dtype, cuda_ext.limits())
        return cuda_ext.adaln_reasons(inputs.shape[-1], inputs.dtype, inputs.backward, cuda_ext.limits())


REGISTRY: dict[str, Backend] = {b.name: b for b in (TritonBackend(), CudaBackend(), TorchBackend())}


def reasons_text(op: str, inputs: OpInputs, order) -> str:
    """"cuda: <reasons>; triton: usable; ..." for every backend in `order`."""
    parts = []
    for name in order:
        why = REGISTRY[name].unsupported_reasons(op, inputs)
        parts.append(f"{name}: {', '.join(why) if why else 'usable'}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------------- forcing
_UNSET = object()
_FORCED: contextvars.ContextVar = contextvars.ContextVar("wmfast_backend", default=_UNSET)


class use_backend(contextlib.ContextDecorator):  # a class named like a function: `with use_backend("torch")`
    """Force `name` ("triton", "cuda", "torch") for every op run in this context (thread- and task-local);
    None: the automatic choice, whatever WMFAST_BACKEND says. Works as a decorator too."""

    def __init__(self, name: str | None):
        if name is not None and name not in BACKENDS:
            raise ValueError(f"use_backend({name!r}): expected one of {', '.join(BACKENDS)} or None")
        self.name = name
        self._tokens: list = []

    def __enter__(self):
        self._tokens.append(_FORCED.set(self.name))
        return self

    def __exit__(self, *exc):
        _FORCED.reset(self._tokens.pop())
        return False


def _forced() -> tuple[str | None, str]:
    """(forced backend or None, how it was forced: for messages)."""
    value = _FORCED.get()
    if value is not _UNSET:
        return value, f"use_backend({value!r})"
    env = os.environ.get("WMFAST_BACKEND", "").strip().lower()
    if not env:
        return None, ""
    if env not in BACKENDS:
        raise ValueError(f"WMFAST_BACKEND={env!r}: expected one of {', '.join(BACKENDS)}")
    return env, f"WMFAST_BACKEND={env}"


@torch.compiler.assume_constant_result
def _forced_constant() -> str:
    return _forced()[0] or ""


def forced_backend() -> str | None:
    """The backend forced by use_backend or WMFAST_BACKEND, or None (also while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return _forced_constant() or None
    return _forced()[0]


# -------------------------------------------------------------------------------------------- measured choice
_TIMED: dict[tuple[str, str, str], str] = {}  # (gpu, op, shape key) -> fastest backend, from first-use timing


def timing_allowed() -> bool:
    """No first-use timing while torch.compile traces, a CUDA graph captures, or a dispatch mode is active (the
    caching mode of torch.utils.checkpoint's selective recomputation records every op of the forward and replays
    it in the backward: timing calls made in the forward only would make the two differ)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if os.environ.get("WMFAST_AUTOTUNE", "1") == "0":
        return False
    return (not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()
            and _get_current_dispatch_mode() is None)


def time_backends(runners: Mapping[str, Callable[[], object]], reps: int = 10) -> dict[str, float]:
    """Median milliseconds of each runner over `reps` CUDA-event-timed calls, after 2 warm-up calls."""
    times = {}
    for name, run in runners.items():
        for _ in range(2):
            run()
        samples = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        times[name] = statistics.median(samples)
    return times


def _fastest(op: str, device: torch.device, usable: list[str], shape_key: str | None,
             runners: Mapping[str, Callable[[], object]] | None) -> str:
    """The measured-table or first-use-timing choice among `usable` (>= 2 backends), else usable[0]."""
    gpu = tuning.device_gpu(device)
    measured = tuning.measured_backend(gpu, op, shape_key)
    if measured in usable:
        return measured
    cache_key = (gpu, op, shape_key or "*")
    if cache_key in _TIMED:
        return _TIMED[cache_key]
    if runners is None or not timing_allowed() or not all(name in runners for name in usable):
        return usable[0]
    times = time_backends({name: runners[name] for name in usable})
    best = min(times, key=times.get)
    _TIMED[cache_key] = best
    logger.info("wmfast: %s %s on %s: timed %s -> %s", op, shape_key or "", gpu,
                ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()), best)
    return best


def timing_runners(factory: Callable[..., dict], tensors: tuple, grad: bool,
                   names: tuple[str, ...] = ("triton", "cuda")) -> dict[str, Callable[[], object]]:
    """Runners as first-use timing calls them: forward only under no_grad, or forward + backward
    (torch.autograd.grad) when the call needs a backward, as training then runs both. `factory(*tensors)` returns
    backend -> zero-argument forward. They run on detached copies of the inputs (leaves sharing the storage,
    requiring grad like the originals), built at the first timed call: a backward from the real inputs would run
    on into the caller's graph wherever one input is computed from another (x from residual in a block) and free
    the saved tensors the caller's own backward needs (seen on an H200 in the Wan block)."""
    state = {}

    def built() -> dict:
        if not state:
            leaves = tuple(t.detach().requires_grad_(grad and t.requires_grad) for t in tensors)
            state["needs"] = [t for t in leaves if t.requires_grad]
            state["fns"] = factory(*leaves)
        return state

    def wrap(name):
        def run():
            s = built()
            if not grad:
                with torch.no_grad():
                    return s["fns"][name]()
            # identity saved-tensor hooks: inside a non-reentrant activation checkpoint the timed backward would
            # otherwise unpack through the checkpoint's hooks and recompute the block in the middle of its forward
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                outs = s["fns"][name]()
                outs = outs if isinstance(outs, tuple) else (outs,)
                return torch.autograd.grad(outs, s["needs"], [torch.ones_like(o) for o in outs])

        return run

    return {name: wrap(name) for name in names}


# ------------------------------------------------------------------------------------------------------ choice
def select_backend(op: str, inputs: OpInputs | torch.device, *, order: tuple[str, ...] | None = None,
                   shape_key: str | None = None, runners: Mapping[str, Callable[[], object]] | None = None,
                   quiet: bool = False) -> str:
    """The backend that runs `op` on `inputs` (an OpInputs, or a bare device: only the device is checked).

    `order`: the backends to consider, in preference order (default: the op's entry in OPS). Optional, for a
    shape-dependent choice on CUDA tensors: `shape_key` (a string naming the shape class, looked up in the
    measured table) and `runners` (backend -> zero-argument callable running the op on the actual inputs,
    timed once). ValueError, listing every backend's reasons, when the forced backend or every backend cannot
    run the inputs. `quiet`: a query (`wmfast env`): nothing is logged."""
    if isinstance(inputs, torch.device):
        inputs = OpInputs(inputs)
    order = tuple(order or OPS.get(op, _DEFAULT_ORDER))
    forced, how = _forced()
    if forced is not None and forced in order and REGISTRY[forced].implements(op):
        if not REGISTRY[forced].unsupported_reasons(op, inputs):
            return forced
        raise ValueError(f"{how} for {op}: {forced} cannot run these inputs ({reasons_text(op, inputs, (forced,))}); "
                         f"every backend: {reasons_text(op, inputs, order)}")
    if forced is not None and not quiet:
        log_once(f"wmfast: {how} but {op} has no {forced} implementation; choosing among {', '.join(order)}")
    usable = [name for name in order if not REGISTRY[name].unsupported_reasons(op, inputs)]
    if not usable:
        raise ValueError(f"no backend can run {op} on these inputs: {reasons_text(op, inputs, order)}")
    kernels = [name for name in usable if name != "torch"]
    if inputs.device.type == "cuda" and len(kernels) > 1:
        return _fastest(op, inputs.device, kernels, shape_key, runners)
    if kernels:
        return kernels[0]
    skipped = [name for name in order if name != "torch"]
    if skipped and not quiet:
        note_fallback(op, inputs.device, reasons_text(op, inputs, skipped))
    return "torch"


def note_fallback(op: str, device: torch.device, why: str) -> None:
    """Log that `op` runs its torch reference on `device` tensors because of `why` (`common.log_fallback`: one
    INFO line per device type, the detail at DEBUG level), with the reason Triton cannot run there at all, if any."""
    log_fallback(op, device, why, REGISTRY["triton"].unsupported_reasons(op, OpInputs(device)))


@torch.compiler.assume_constant_result
def _constant_choice(op: str, device: torch.device, dtype: torch.dtype, width: int, backward: bool,
                     order: tuple[str, ...], shape_key: str) -> str:
    # only the last dimension (D, Dh) reaches here: the backends' limits read nothing else
    return select_backend(op, OpInputs(device, dtype, (width,) if width else (), backward), order=order or None,
                          shape_key=shape_key or None)


def _traced_int(n) -> int:
    """A dimension as a Python int while dynamo traces: under dynamic=True int() keeps it symbolic (refused by
    assume_constant_result); branches become guards, so a bisection pins it (other sizes recompile)."""
    lo, hi = 0, 1 << 31
    while lo < hi:
        lo, hi = (lo, (lo + hi) // 2) if n <= (lo + hi) // 2 else ((lo + hi) // 2 + 1, hi)
    return lo


def traceable_backend(op: str, inputs: OpInputs | torch.device, *, order: tuple[str, ...] | None = None,
                      shape_key: str | None = None, runners: Mapping[str, Callable[[], object]] | None = None) -> str:
    """select_backend for code that torch.compile traces: while it traces, the choice is evaluated once and baked
    into the graph (dynamo cannot trace the device queries and logging inside: torch.cuda.get_device_name broke a
    fullgraph compile of temporal_attention on an H200; and a graph break would defeat fullgraph=True). With the
    shape key, a choice eager timing already cached for this shape class is reused (no timing while tracing).
    In eager code, select_backend itself."""
    if isinstance(inputs, torch.device):
        inputs = OpInputs(inputs)
    if torch.compiler.is_compiling():
        return _constant_choice(op, inputs.device, inputs.dtype, _traced_int(inputs.shape[-1]) if inputs.shape else 0,
                                bool(inputs.backward), tuple(order or ()), shape_key or "")
    return select_backend(op, inputs, order=order, shape_key=shape_key, runners=runners)
