"""Greedy head: (index, value) = argmax and max over the vocabulary of the logits h @ weight.T, per token, without
the [N, V] logits (greedy decoding through the tied embedding).

- greedy_head(h, weight) -> (index, value): h [..., D], weight [V, D]; index int64 [...], value fp32 [...].

Semantics: logits accumulate in fp32 from inputs in h.dtype; the FIRST maximal index wins on ties and NaN counts
as larger than everything, exactly like torch.argmax (a NaN in h gives index 0, a NaN weight row wins from its
index on unless an earlier row is NaN too). fp32 inputs follow torch's fp32 matmul precision (legacy or
per-backend API): "highest"/"ieee" (the default) is an exact fp32 dot, "high"/"medium"/"tf32" TF32.

Backends: "triton" (wmfast.kernels.greedy_head: chunked over the vocabulary with a running max / first index in
registers; only [N, SPLITS] partials besides the outputs) and "torch" (the reference, `greedy_head_ref`, chunk by
chunk within a 2**22-element budget; torch.compile traces it natively). The torch backend computes F.linear in
h.dtype, as `(h @ weight.T).argmax(-1)` in plain PyTorch would: for bf16/fp16 the logits are rounded to h.dtype
before the comparison, so two logits that differ in fp32 can tie there (the first wins) and its index can differ
from the Triton backend's on such near-ties; its value is the rounded logit.

Inference only: there is no gradient. A call with grad mode on and an input that requires grad raises
ValueError (wrap decoding in torch.no_grad() / torch.inference_mode(), or pass detached tensors). Every bad input
raises ValueError naming the argument and the shapes, before any launch.
"""
from __future__ import annotations

import torch

from wmfast.kernels import greedy_head as _k
from wmfast.ops.common import DTYPE_NAMES, DTYPES, check_row_count
from wmfast.ops.common import shape as _shape
from wmfast.ops.dispatch import OpInputs, traceable_backend


def _check_inputs(h, weight) -> None:
    for name, t in (("h", h), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"greedy_head: {name} must be a tensor, got {type(t).__name__}")  # noqa: TRY004
    if h.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"greedy_head: h {_shape(h)}, weight {_shape(weight)}: expected h [..., D], weight [V, D]")
    if h.shape[-1] != weight.shape[1]:
        raise ValueError(f"greedy_head: h {_shape(h)} has D={h.shape[-1]} but weight {_shape(weight)} has "
                         f"D={weight.shape[1]}")
    if h.numel() == 0 or weight.numel() == 0:
        raise ValueError(f"greedy_head: empty input: h {_shape(h)}, weight {_shape(weight)}")
    if h.dtype not in DTYPES:
        raise ValueError(f"greedy_head: h dtype {h.dtype} not supported ({DTYPE_NAMES})")
    check_row_count("greedy_head: h", h)
    if weight.dtype != h.dtype:
        raise ValueError(f"greedy_head: weight dtype {weight.dtype} does not match h dtype {h.dtype}")
    if weight.device != h.device:
        raise ValueError(f"greedy_head: weight on {weight.device}, h on {h.device}: expected one device")
    if weight.shape[0] > _k.MAX_V:
        raise ValueError(f"greedy_head: weight {_shape(weight)}: V must be <= {_k.MAX_V}")
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        raise ValueError("greedy_head is inference only (no gradient): call it under torch.no_grad() or "
                         "torch.inference_mode(), or on detached tensors")


def greedy_head(h, weight):
    """(index, value): the first argmax over V of the logits h @ weight.T and that max logit (fp32 accumulation).

    h: [..., D] (float32/float16/bfloat16; any leading shape; a last dim without unit stride is copied).
    weight: [V, D], h's dtype and device (the tied embedding; without unit stride over D it is copied).
    Returns index: int64 [...] and value: float32 [...] (h.shape[:-1]). Ties: the first index; NaN wins (as
    torch.argmax). Inference only (see the module docstring)."""
    _check_inputs(h, weight)
    D = h.shape[-1]
    lead = h.shape[:-1]
    rows = (h if h.stride(-1) == 1 else h.contiguous()).reshape(-1, D)  # [N, D]: a view where the strides allow
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    if traceable_backend("greedy_head", OpInputs(h.device, h.dtype, (D,))) == "triton":
        index, value = _k.greedy_head_op(rows, w)
    else:  # plain PyTorch's logits in h.dtype (fp32: the same as upcast=True)
        index, value = _k.greedy_head_ref(rows, w, upcast=False)
    return index.view(lead), value.view(lead)
