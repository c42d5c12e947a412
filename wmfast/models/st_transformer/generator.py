"""`Generator`: low-latency greedy rollouts of one ST-Transformer at one batch size (the gpt-fast pattern).

Everything a rollout needs is allocated once: static input buffers (context tokens, states), the temporal KV cache
(`torch.empty`: the prefill writes positions 0..C-1 and each step writes t before reading 0..t, so no slot is read
unwritten and nothing is zero-filled on the hot path) and, on a GPU, one CUDA graph of the whole rollout: the state
encoder, the prefill, every decode step and the greedy head, replayed as one launch. A second call pays no set-up:
it copies the inputs into the static buffers, replays the graph and returns a copy of the output tokens.

    gen = Generator(model, batch_size=1, precision="bf16")   # set-up (the graph is captured at the first call)
    tokens = gen(context_tokens, states)                       # [1, 3, G, G], one graph replay

Precision: "fp32" runs the fp32 weights with full fp32 matmuls and convolutions inside the call (what the winning
team decoded with), "tf32" the same weights with TF32 tensor-core matmuls, "bf16" a bf16 copy of the weights with a
bf16 cache. Following the model: the bf16 copy is refreshed, in place (a captured graph stays valid), when a
parameter's version counter moved (an in-place update: an optimizer step, load_state_dict); writes through
`.data` do not move it, so call `sync_weights()` after them. fp32/tf32 use the model's own parameters. When the
parameters move to other memory, another device or dtype (`model.to(...)`), the Generator rebuilds its buffers
and captures again at the next call. Replacing a parameter object needs a new Generator.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from .kv_cache import TemporalKVCache
from .rollout import check_inputs, check_rollout, rollout

PRECISIONS = ("fp32", "tf32", "bf16")
_ATTR = "_wmfast_generators"  # the model's __dict__ entry holding the generators of generate(..., graph=True)


def _legacy_precision_api() -> bool:
    """Whether fp32 precision is set through the legacy API (torch.set_float32_matmul_precision, allow_tf32);
    once a user sets the per-backend `fp32_precision` attributes, the legacy getter raises."""
    try:
        torch.get_float32_matmul_precision()
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def precision_scope(precision: str):
    """fp32: full-precision fp32 matmuls and convolutions; tf32: TF32 tensor cores for both; bf16: unchanged (the
    weights are bf16). Set through the API the process already uses; the previous settings are restored on exit."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16":
        yield
        return
    tf32, legacy = precision == "tf32", _legacy_precision_api()
    if legacy:
        old = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
    else:
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        old = matmul.fp32_precision, conv.fp32_precision
        matmul.fp32_precision = conv.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        if legacy:
            torch.set_float32_matmul_precision(old[0])
            torch.backends.cudnn.allow_tf32 = old[1]
        else:
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = old


class _Generators(dict):
    """The generators `Generator.cached` keeps on a model; never copied or pickled with it (a CUDA graph is not)."""

    def __deepcopy__(self, memo):
        return _Generators()

    def __reduce__(self):
        return _Generators, ()


def _count(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class Generator:
    """Greedy rollouts of `model` at `batch_size` with static buffers and (graph=True) one CUDA graph.

    num_frames: grids to generate (default config.future_frames = 3); context_frames: grids given (default
    config.context_frames = 3); precision: "fp32" | "tf32" | "bf16"; use_cache: the temporal KV cache (False: each
    step reruns the model over every grid so far, the reference); graph: capture the rollout in a CUDA graph
    (default: when the model is on a GPU). Call it with context_tokens [B, C, G, G] (or [B, C, S]) and states
    [B, 34, 25] (any device: they are copied in); returns tokens [B, num_frames, ...] in the context's layout.
    Token ids are not range-checked (that would sync the host); an id outside the vocabulary is a device error."""

    def __init__(self, model, batch_size: int, *, num_frames: int | None = None, context_frames: int | None = None,
                 precision: str = "fp32", use_cache: bool = True, graph: bool | None = None):
        c = model.config
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.source, self.precision, self.use_cache = model, precision, bool(use_cache)
        self.batch_size = _count("batch_size", batch_size)
        self.num_frames = _count("num_frames", c.future_frames if num_frames is None else num_frames)
        self.context_frames = _count("context_frames", c.context_frames if context_frames is None else context_frames)
        check_rollout(c, self.context_frames, self.num_frames, self.use_cache)
        self._graph_wanted = graph
        self._build()

    def _build(self) -> None:
        """The weights (a bf16 copy, or the model's own), static buffers and cache, on the model's device."""
        model, c = self.source, self.source.config
        self._params = list(model.parameters())
        p = self._params[0]
        self.graph = p.is_cuda if self._graph_wanted is None else bool(self._graph_wanted)
        if self.graph and not p.is_cuda:
            raise ValueError(f"graph=True needs the model on a CUDA device; its parameters are on {p.device}")
        if p.dtype != torch.float32:
            raise ValueError(f"the model's parameters are {p.dtype}; Generator takes the fp32 model and makes the "
                             "bf16 copy itself (precision='bf16')")
        B, C = self.batch_size, self.context_frames
        with torch.inference_mode(False):  # buffers made inside inference_mode could not be written outside it
            self.model = self._bf16_copy(model) if self.precision == "bf16" else model
            self._ctx = torch.zeros(B, C, c.seq_len, dtype=torch.long, device=p.device)
            self._states = torch.zeros(B, 34, c.state_dim, dtype=self._params[0].dtype, device=p.device)
            self._cache = TemporalKVCache.for_model(self.model, B) if self.use_cache else None
        self._where = (p.device, p.dtype)
        self._key = self._weights_key()
        self._graph, self._out = None, None

    @staticmethod
    def _bf16_copy(model):
        return copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)

    def _weights_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self._params)

    @property
    def nbytes(self) -> int:
        """Bytes of the static buffers (cache, inputs), without the weights and the graph's own pool."""
        cache = self._cache.nbytes if self._cache is not None else 0
        return cache + sum(t.numel() * t.element_size() for t in (self._ctx, self._states))

    def sync_weights(self) -> None:
        """Copy the model's weights into the bf16 copy now (after writes through `.data`, which no version
        counter sees); a no-op for fp32/tf32, which read the model's own parameters."""
        if self.model is not self.source:
            with torch.no_grad(), torch.inference_mode(False):
                for dst, src in zip(self.model.parameters(), self._params, strict=True):
                    dst.copy_(src)
        self._key = self._weights_key()

    def _follow_model(self) -> None:
        """Rebuild when the parameters changed device or dtype; refresh the bf16 copy after in-place updates;
        capture again when fp32 parameters moved to other memory."""
        p = self._params[0]
        if (p.device, p.dtype) != self._where:
            self._build()
            return
        key = self._weights_key()
        if key == self._key:
            return
        if self.model is not self.source:
            self.sync_weights()
            return
        if [k[0] for k in key] != [k[0] for k in self._key]:
            self._graph = None
        self._key = key

    def _rollout(self) -> torch.Tensor:
        sg = self.model.state_encoder(self._states)
        return rollout(self.model, self._ctx, sg, self.num_frames, self._cache)[0]  # [B, F, S]

    @contextlib.contextmanager
    def _eval(self):
        """Eval mode, no autograd, no autocast (the caller's would send the blocks down the training path), the
        precision's matmul settings, and the model's GPU as the current device."""
        was = self.model.training
        self.model.eval()
        device = self._ctx.device
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False), precision_scope(self.precision), \
                    (torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()):
                yield
        finally:
            self.model.train(was)

    def _capture(self) -> None:
        """Warm up on a side stream (Triton compiles its kernels, cuBLAS its workspaces, dispatch times its
        first-use choices), then capture one rollout."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._rollout()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._out = self._rollout()
        self._graph = graph

    def __call__(self, context_tokens, states) -> torch.Tensor:
        B, C = self.batch_size, self.context_frames
        check_inputs(self.source, context_tokens, states, self.num_frames, self.use_cache)
        if tuple(context_tokens.shape[:2]) != (B, C):
            raise ValueError(f"context_tokens {tuple(context_tokens.shape)}: this Generator takes batch {B} and "
                             f"{C} context grids; make one per batch size")
        self._follow_model()
        self._ctx.copy_(context_tokens.reshape(self._ctx.shape))
        self._states.copy_(states)
        if self.graph:
            if self._graph is None:
                with self._eval():
                    self._capture()
            with torch.cuda.device(self._ctx.device):
                self._graph.replay()
                out = self._out.clone()
        else:
            with self._eval():
                out = self._rollout()
        return out.reshape(B, self.num_frames, *context_tokens.shape[2:])

    @classmethod
    def cached(cls, model, batch_size: int, **kw) -> Generator:
        """The model's Generator for these arguments, made at the first request and kept on the model (one per
        batch size and setting: each holds its cache and graph; never copied or pickled with the model), so
        generate(..., graph=True) pays set-up once. `Generator.release(model)` frees them."""
        gens = model.__dict__.setdefault(_ATTR, _Generators())
        key = (batch_size, *sorted(kw.items()))
        if key not in gens:
            gens[key] = cls(model, batch_size, **kw)
        return gens[key]

    @staticmethod
    def release(model) -> None:
        """Drop the generators `cached` keeps on `model` (their caches, weight copies and graphs)."""
        model.__dict__.pop(_ATTR, None)
