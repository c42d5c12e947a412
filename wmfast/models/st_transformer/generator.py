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
bf16 cache. The copy follows the model: when a parameter of the model changes (an optimizer step, a load; seen
through its version counter) the next call copies the weights again, in place, so a captured graph stays valid.
With fp32/tf32 the model's own parameters are used; if one moves (`model.to(...)`) the graph is captured again.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from .kv_cache import TemporalKVCache
from .rollout import check_inputs, check_rollout, rollout

PRECISIONS = ("fp32", "tf32", "bf16")
_ATTR = "_wmfast_generators"  # model.__dict__ entry holding the generators of generate(..., graph=True)


@contextlib.contextmanager
def precision_scope(precision: str):
    """fp32: full-precision fp32 matmuls and convolutions; tf32: TF32 tensor cores for both; bf16: unchanged (the
    weights are bf16). The previous settings are restored on exit."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16":
        yield
        return
    old = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cudnn.allow_tf32 = old[1]


def _weights_key(model) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


class Generator:
    """Greedy rollouts of `model` at `batch_size` with static buffers and (graph=True) one CUDA graph.

    num_frames: grids to generate (default config.future_frames = 3); context_frames: grids given (default
    config.context_frames = 3); precision: "fp32" | "tf32" | "bf16"; use_cache: the temporal KV cache (False: each
    step reruns the model over every grid so far, the reference); graph: capture the rollout in a CUDA graph
    (default: when the model is on a GPU). Call it with context_tokens [B, C, G, G] (or [B, C, S]) and states
    [B, 34, 25] (any device: they are copied in); returns tokens [B, num_frames, ...] in the context's layout."""

    def __init__(self, model, batch_size: int, *, num_frames: int | None = None, context_frames: int | None = None,
                 precision: str = "fp32", use_cache: bool = True, graph: bool | None = None):
        c = model.config
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        p = next(model.parameters())
        graph = p.is_cuda if graph is None else graph
        if graph and not p.is_cuda:
            raise ValueError(f"graph=True needs the model on a CUDA device; its parameters are on {p.device}")
        if p.dtype != torch.float32:
            raise ValueError(f"the model's parameters are {p.dtype}; Generator takes the fp32 model and makes the "
                             "bf16 copy itself (precision='bf16')")
        self.source, self.batch_size, self.precision, self.use_cache, self.graph = model, batch_size, precision, \
            use_cache, graph
        self.num_frames = c.future_frames if num_frames is None else num_frames
        self.context_frames = c.context_frames if context_frames is None else context_frames
        self.model = self._bf16_copy(model) if precision == "bf16" else model
        dtype = next(self.model.parameters()).dtype
        B, C = batch_size, self.context_frames
        check_rollout(c, C, self.num_frames, use_cache)
        self._ctx = torch.zeros(B, C, c.seq_len, dtype=torch.long, device=p.device)
        self._states = torch.zeros(B, 34, c.state_dim, dtype=dtype, device=p.device)
        self._cache = TemporalKVCache.for_model(self.model, B) if use_cache else None
        self._key = _weights_key(model)
        self._graph, self._out = None, None

    @staticmethod
    def _bf16_copy(model):
        gens = model.__dict__.pop(_ATTR, None)  # never deep-copy another generator's graph
        try:
            m = copy.deepcopy(model)
        finally:
            if gens is not None:
                model.__dict__[_ATTR] = gens
        return m.to(torch.bfloat16).eval().requires_grad_(False)

    @property
    def nbytes(self) -> int:
        """Bytes of the static buffers (cache, inputs), without the weights and the graph's own pool."""
        cache = self._cache.nbytes if self._cache is not None else 0
        return cache + sum(t.numel() * t.element_size() for t in (self._ctx, self._states))

    def _sync_weights(self) -> None:
        """Follow the model: copy changed weights into the bf16 copy; recapture when fp32 parameters moved."""
        key = _weights_key(self.source)
        if key == self._key:
            return
        if self.model is not self.source:
            with torch.no_grad():
                for dst, src in zip(self.model.parameters(), self.source.parameters(), strict=True):
                    dst.copy_(src)
        elif [k[0] for k in key] != [k[0] for k in self._key]:
            self._graph = None
        self._key = key

    def _rollout(self) -> torch.Tensor:
        sg = self.model.state_encoder(self._states)
        return rollout(self.model, self._ctx, sg, self.num_frames, self._cache)[0]  # [B, F, S]

    @contextlib.contextmanager
    def _eval(self):
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), precision_scope(self.precision):
                yield
        finally:
            self.model.train(was)

    def _capture(self) -> None:
        """Warm up on a side stream (Triton compiles its kernels, cuBLAS its workspaces, dispatch times its
        first-use choices), then capture one rollout."""
        with self._eval():
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
        check_inputs(self.model, context_tokens, states, self.num_frames, self.use_cache)
        if tuple(context_tokens.shape[:2]) != (B, C):
            raise ValueError(f"context_tokens {tuple(context_tokens.shape)}: this Generator takes batch {B} and "
                             f"{C} context grids; make one per batch size")
        self._sync_weights()
        self._ctx.copy_(context_tokens.reshape(self._ctx.shape))
        self._states.copy_(states)
        if self.graph:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            out = self._out
        else:
            with self._eval():
                out = self._rollout()
        return out.clone().reshape(B, self.num_frames, *context_tokens.shape[2:])

    @classmethod
    def cached(cls, model, batch_size: int, **kw) -> Generator:
        """The model's Generator for these arguments, made at the first request and kept on the model (one per
        batch size and setting: each holds its cache and graph), so generate(..., graph=True) pays set-up once."""
        gens = model.__dict__.setdefault(_ATTR, {})
        key = (batch_size, *sorted(kw.items()))
        if key not in gens:
            gens[key] = cls(model, batch_size, **kw)
        return gens[key]
