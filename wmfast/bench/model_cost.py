"""What one ST-Transformer training sample costs: FLOPs, the activation bytes it holds, the peak and kernels of a
training step, and a model of the largest micro-batch that fits a GPU (the suite is wmfast.bench.model_cost_report).

Activation bytes, two methods, both under the training precision (bf16 autocast, on the CPU too) in train mode
(dropout included), each taken as the difference between batch 2 and batch 1 so that per-step constants
(autocast's bf16 weight copies, the loss head's [V, D] buffers) cancel:
- held bytes (primary): the bytes of the storages created during the forward and still alive after it, minus
  the output (`held_bytes`, on wmfast.bench.memory.LiveBytesTracker). The block's input is made inside the count
  and dropped before reading it, so it counts only when the graph keeps it, as the model's residual stream does.
- hook bytes: what `torch.autograd.graph.saved_tensors_hooks` sees packed (parameters excluded). It is blind to
  what torch.utils.checkpoint keeps: non-reentrant checkpoint and selective activation checkpointing (the
  config's recompute="elementwise") install their own hooks, which shadow an outer one, so for such a block it
  reads (nearly) zero while the held bytes are what the block really keeps.

Peak of a step (`step_cost`): CPU: LiveBytesTracker.peak with the model and its AdamW state created inside the
tracker (parameters, gradients and optimizer state all counted); CUDA: torch.cuda.max_memory_allocated. Kernels
of a step: CUDA: the profiler's kernel events; CPU: a proxy, the aten ops that write memory (`OpCounter`).
Compiled: torch._inductor.metrics.generated_kernel_count plus the extern kernel calls of the generated code.

`MemoryModel` predicts a step's peak from these numbers. It is a model, not a measurement.
"""
from __future__ import annotations

import contextlib
import gc
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from wmfast.bench.memory import DispatchObserver, LiveBytesTracker
from wmfast.bench.workloads import compression_batch

TRAIN_DTYPE = torch.bfloat16  # the training precision: bf16 autocast over fp32 master weights
# Device memory as the driver reports it (torch.cuda.get_device_properties().total_memory, GiB = 2^30 bytes),
# not the marketing GB: an H100 SXM "80 GB" reports 79.6 GiB, an H200 "141 GB" 139.8 GiB, a B200 "180 GB" 178.0.
GPU_CAPACITY_GIB = {"H100 80GB": 79.6, "H200 141GB": 139.8, "B200 180GB": 178.0}
MARGIN = 0.10  # the share of capacity left free, as TrainConfig.auto_margin (fragmentation, what a trial misses)
# ops that allocate without a kernel writing memory: not counted as kernels by OpCounter
_ALLOC_ONLY = frozenset({"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
                         "aten.new_empty.default", "aten.new_empty_strided.default"})


def training_autocast(device):
    return torch.autocast(torch.device(device).type, dtype=TRAIN_DTYPE)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _outputs_nbytes(out) -> int:
    """Bytes of the distinct storages of the tensors in `out` (a tensor, tuple or dict of them)."""
    from torch.utils._pytree import tree_leaves

    storages = {_storage_key(t): t.untyped_storage().nbytes() for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
    return sum(storages.values())


# --------------------------------------------------------------------------------------- activation bytes
@dataclass
class HeldBytes:
    held: int  # created in the forward, alive after it, output excluded (the input if the graph keeps it)
    hooked: int  # packed by saved_tensors_hooks, parameters excluded
    output: int
    output_dtype: torch.dtype


def held_bytes(fn, x0: torch.Tensor, *, params=(), autocast=True) -> HeldBytes:
    """Run out = fn(x) on x = a copy of x0 made inside the count and measure both ways (see the module doc).

    x0 should require grad (a leaf standing for the previous layer's output) so that the graph is built.
    `params`: tensors whose storages the hook method ignores (the module's parameters)."""
    skip = {_storage_key(p) for p in params}
    packed: dict[int, int] = {}

    def pack(t):
        key = _storage_key(t)
        if key not in skip:
            packed[key] = t.untyped_storage().nbytes()
        return t

    amp = training_autocast(x0.device) if autocast else contextlib.nullcontext()
    with LiveBytesTracker() as tracker:
        x = x0.clone()  # a new storage: counted while the graph (or a checkpoint's recompute) keeps it
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
            out = fn(x)
        del x
        # the Triton interpreter keeps a launch's arguments alive in reference cycles until the next collection
        # (on a GPU nothing does): collect, so that only what the graph holds is counted
        gc.collect()
        held = tracker.current - _outputs_nbytes(out)
    first = out if isinstance(out, torch.Tensor) else next(iter(out.values() if isinstance(out, dict) else out))
    return HeldBytes(held, sum(packed.values()), _outputs_nbytes(out), first.dtype)


@dataclass
class PerToken:
    """Bytes a token (held and hook methods) from the batch-2 minus batch-1 difference of `held_bytes`."""

    held: float
    hooked: float
    tokens_per_sample: int
    residual_dtype: torch.dtype  # the dtype of the block's output: the residual stream between blocks
    raw: dict = field(default_factory=dict)  # {batch: HeldBytes}

    @property
    def held_per_sample(self) -> int:
        return round(self.held * self.tokens_per_sample)


def per_token(measure, tokens_per_sample: int) -> PerToken:
    """measure(batch) -> HeldBytes at batch 1 and 2; the difference over `tokens_per_sample`."""
    raw = {b: measure(b) for b in (1, 2)}
    d_held, d_hooked = raw[2].held - raw[1].held, raw[2].hooked - raw[1].hooked
    return PerToken(d_held / tokens_per_sample, d_hooked / tokens_per_sample, tokens_per_sample,
                    raw[1].output_dtype, raw)


def block_input(model, batch: int, device) -> torch.Tensor:
    """x [B, T, S, D] as a block past the first sees it: embed, then block 0 (no grad) under autocast, so it has
    the residual stream's dtype (bf16 for block="fused", fp32 for "reference"); a leaf requiring grad."""
    c = model.config
    data = compression_batch(c, batch, device)
    with torch.no_grad(), training_autocast(device):
        x = model.embed(data["tokens"][:, : c.num_frames], model.state_encoder(data["states"]))
        x = model.blocks[0](x)
    return x.detach().requires_grad_()


def block_cost(model, device) -> PerToken:
    """Bytes a token keeps in one block (model.blocks[0]) at the model's shape [B, T, S, D], train mode."""
    c = model.config
    block = model.blocks[0]

    def measure(b):
        return held_bytes(block, block_input(model, b, device), params=list(block.parameters()))

    return per_token(measure, c.num_frames * c.seq_len)


def sample_cost(model, device) -> PerToken:
    """Bytes a sample keeps in the whole model: the forward of compression_loss (the loss and its metrics are the
    output). Per "token" here means per sample (tokens_per_sample = 1)."""
    from wmfast.models import compression_loss

    params = list(model.parameters())

    def measure(b):
        data = compression_batch(model.config, b, device)
        anchor = torch.zeros((), device=device, requires_grad=True)  # held_bytes's input; the batch is the data
        return held_bytes(lambda _x: compression_loss(model, data), anchor, params=params)

    return per_token(measure, 1)


# ------------------------------------------------------------------------------------------- a training step
class OpCounter(DispatchObserver):
    """Counts the aten ops dispatched inside it that write memory (a CPU proxy for kernel launches): an op that
    returns a new storage (pure allocations such as aten.empty excluded) or writes an input in place / out=.
    Views and metadata ops return no new storage and write nothing: not counted. Also the largest new storage."""

    def __init__(self):
        self.count = 0
        self.by_op: Counter = Counter()
        self.largest = (0, "", ())  # (bytes, op, shape)

    def _seen(self, func, out, input_keys: set[int]) -> None:
        from torch.utils._pytree import tree_leaves

        new = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes()
               and _storage_key(t) not in input_keys]
        schema = getattr(func, "_schema", None)  # higher-order ops have none
        writes = schema is not None and any(a.alias_info is not None and a.alias_info.is_write
                                            for a in schema.arguments)
        name = str(func)
        if (new and name not in _ALLOC_ONLY) or writes:
            self.count += 1
            self.by_op[name] += 1
        for t in new:
            if t.untyped_storage().nbytes() > self.largest[0]:
                self.largest = (t.untyped_storage().nbytes(), name, tuple(t.shape))


def train_step(model, opt, batch: dict, device) -> None:
    """One training step as wmfast train runs it: bf16 autocast forward, backward, AdamW step."""
    from wmfast.models import compression_loss

    with training_autocast(device):
        loss, _ = compression_loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def model_and_optimizer(config, device):
    from wmfast.models import STTransformer

    model = STTransformer(config).to(device)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(device).type == "cuda")


def _init_adam_state(model, opt) -> None:
    """AdamW's state as after a first step, without a forward: one step at lr 0 on zero gradients."""
    lrs = [g["lr"] for g in opt.param_groups]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    opt.zero_grad(set_to_none=True)
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr


@dataclass
class StepCost:
    micro_batch: int
    params: int
    peak_bytes: int
    peak_method: str
    seconds: float
    ops_counted: int  # the CPU proxy: aten ops that write memory
    largest_tensor: tuple  # (bytes, op, shape)
    kernels: int | None = None  # CUDA: kernel events of the profiled step


def step_cost(config, micro_batch: int, device) -> StepCost:
    """Peak memory, the largest new tensor and the kernels of one training step at `micro_batch` (see the module
    doc for the methods). CPU: the model and its AdamW state are created inside the tracker, then one step.
    CUDA: one warm-up step (autotuning, AdamW state), then the measured step under the profiler."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_step_cost(config, micro_batch, device)
    with LiveBytesTracker() as tracker:
        model, opt = model_and_optimizer(config, device)
        _init_adam_state(model, opt)
        batch = compression_batch(config, micro_batch, device)
        tracker.peak = tracker.current  # the step's peak from here: parameters and AdamW state are live
        t0 = time.perf_counter()
        with OpCounter() as ops:
            train_step(model, opt, batch, device)
        seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return StepCost(micro_batch, params, tracker.peak, "cpu live-bytes (params, grads, AdamW state included)",
                    seconds, ops.count, ops.largest)


def _cuda_step_cost(config, micro_batch: int, device) -> StepCost:
    model, opt = model_and_optimizer(config, device)
    batch = compression_batch(config, micro_batch, device)
    train_step(model, opt, batch, device)  # warm-up: kernel compilation, autotuning, AdamW state
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with OpCounter() as ops:
        kernels = profiled_kernels(lambda: train_step(model, opt, batch, device))
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device)
    params = sum(p.numel() for p in model.parameters())
    return StepCost(micro_batch, params, peak, "cuda max_memory_allocated", seconds, ops.count, ops.largest, kernels)


def profiled_kernels(fn) -> int | None:
    """Device kernels fn launches (torch.profiler CUDA events, memcpy/memset excluded); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))


_EXTERN_CALL = re.compile(r"\b(?:extern_kernels|torch\.ops)\.[\w.]+\(")


def compiled_kernel_counts(fn) -> dict:
    """Compile what fn runs (it calls a torch.compile'd module, forward and backward) with Inductor's caches off
    (a cache hit generates no kernel) and count: kernels Inductor generated (metrics.generated_kernel_count),
    extern kernel calls (matmuls, SDPA, custom ops: calls of extern_kernels.* and torch.ops.* in the generated
    code) and graphs compiled."""
    import torch._functorch.config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    metrics.reset()
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        _, codes = run_and_get_code(fn)
    extern = sum(len(_EXTERN_CALL.findall(code)) for code in codes)
    return {"generated": metrics.generated_kernel_count, "extern": extern, "graphs": len(codes)}


# -------------------------------------------------------------------------------------------- the memory model
@dataclass(frozen=True)
class MemoryModel:
    """A step's peak, modelled (not measured) as fixed bytes + per-sample bytes x micro-batch.

    fixed: parameters fp32 (4 B) + gradients fp32 (4) + AdamW moments (8) + autocast's bf16 weight copies (2),
    i.e. 18 bytes a parameter, plus the loss head's workspace: one chunk of logits [min(chunk, rows), V] of
    `logit_bytes` each (2: bf16 logits that the Triton kernel overwrites with the gradient; 8 on the torch
    backend: bf16 logits + an fp32 copy + the bf16 gradient) and its fp32 [V, D] weight-gradient accumulator. per_sample: the held bytes a sample (`sample_cost`). With activation
    checkpointing (whole blocks recomputed), a sample holds one block input [T, S, D] a layer in the residual dtype,
    one block's activations while it is recomputed, and what lies outside the blocks (embedding, head)."""

    params: int
    vocab: int
    d_model: int
    rows_per_sample: int  # rows of the loss head a sample: future grids x S
    per_sample: int
    per_sample_ckpt: int
    chunk: int = 4096
    logit_bytes: int = 2

    def fixed_parts(self, micro_batch: int) -> dict[str, int]:
        rows = min(self.chunk, max(1, micro_batch) * self.rows_per_sample)
        return {"params fp32": 4 * self.params, "grads fp32": 4 * self.params, "AdamW moments": 8 * self.params,
                "bf16 weight copies": 2 * self.params, "head logits chunk": rows * self.vocab * self.logit_bytes,
                "head fp32 weight-grad": 4 * self.vocab * self.d_model}

    def peak(self, micro_batch: int, checkpointing: bool = False) -> int:
        per = self.per_sample_ckpt if checkpointing else self.per_sample
        return sum(self.fixed_parts(micro_batch).values()) + per * micro_batch

    def largest_micro_batch(self, capacity_bytes: float, *, margin: float = MARGIN, checkpointing: bool = False,
                            limit: int = 1 << 20) -> int:
        """The largest micro-batch whose modelled peak is <= capacity x (1 - margin); 0 when even 1 is not."""
        budget = capacity_bytes * (1.0 - margin)
        lo, hi = 0, limit  # peak() grows with the micro-batch: bisect for the last that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.peak(mid, checkpointing) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


LOGIT_BYTES = {"triton": 2, "torch": 8}  # the loss head's bytes a logit at its peak, per backend (MemoryModel)


def memory_model(config, params: int, layer: PerToken, sample_per_sample: int, *, logit_bytes: int = 2,
                 layer_recomputed: PerToken | None = None) -> MemoryModel:
    """The MemoryModel of `config` from a block's and the whole model's held bytes. `layer_recomputed`: the block
    measured with recompute="none", what one block holds while whole-block checkpointing recomputes it (the
    trainer turns selective recomputation off under it); None: `layer` (a block that saves everything anyway)."""
    from wmfast.ops.linear_cross_entropy import DEFAULT_CHUNK

    c = config
    layer_sample = layer.held_per_sample
    outside = max(0, sample_per_sample - c.num_layers * layer_sample)  # embedding, final norm, loss head
    stream = c.num_frames * c.seq_len * c.d_model * torch.finfo(layer.residual_dtype).bits // 8
    ckpt = c.num_layers * stream + (layer_recomputed or layer).held_per_sample + outside
    return MemoryModel(params=params, vocab=c.vocab_size, d_model=c.d_model,
                       rows_per_sample=c.future_frames * c.seq_len, per_sample=sample_per_sample,
                       per_sample_ckpt=ckpt, chunk=DEFAULT_CHUNK, logit_bytes=logit_bytes)
