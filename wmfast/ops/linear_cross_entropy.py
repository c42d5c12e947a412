"""Linear cross-entropy: the mean CE of the logits h @ weight.T against targets, computed chunk by chunk so that
the [N, V] logits never exist (the training loss of the ST-Transformer's tied output head).

Per chunk of rows, the logits [n, V] are made in the matmul dtype (the autocast dtype under autocast), then one
backend turns them into the loss, the argmax check and the gradient d loss / d logits:
- "triton" (CUDA tensors; CPU tensors under TRITON_INTERPRET=1): `wmfast.kernels.cross_entropy`, which
  overwrites the logits with the gradient in place: one [n, V] tensor in the matmul dtype per chunk.
- "torch": the reference `cross_entropy_grad_ref` (an fp32 copy of the chunk, its softmax, a cast back).
The gradients of h and weight are then made in the forward (the logits of a chunk are needed for both):
grad_h chunk = p @ W, grad_W += p.T @ h chunk (matmuls in the logits dtype, grad_W accumulated in fp32); the
backward only scales them by grad_loss / (number of rows not ignored).

Where the backward's scale is applied: after, on grad_h [N, D] and grad_W [V, D], not folded into the kernel's
gradient. grad_loss is only known in the backward, so that multiply stays whatever the kernel does, and a 1/N
folded in first would push fp16 gradients under fp16's range (softmax ~ 1/V = 1.6e-5 times 1/N = 4e-5 is
6e-10, below fp16's smallest subnormal 6e-8).
"""
from __future__ import annotations

import torch

from wmfast.kernels import cross_entropy as _k
from wmfast.ops.common import DTYPES, check_flag
from wmfast.ops.common import shape as _shape
from wmfast.ops.dispatch import OpInputs, traceable_backend

DEFAULT_CHUNK = 4096  # rows: a [4096, 64000] chunk of logits is 0.5 GiB in bf16 (1 GiB as an fp32 copy)
IGNORE_INDEX = _k.IGNORE_INDEX


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of (h @ w.T) against targets over the rows not ignored, chunk by chunk: the gradients are computed
    in the forward (the logits of a chunk are needed for both), so [N, V] logits never exist; backward scales
    them."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk_size: int, ignore_index: int, need_grad: bool, backend: str):
        N = h.shape[0]
        token_loss = torch.empty(N, dtype=torch.float32, device=h.device)
        correct = torch.empty(N, dtype=torch.bool, device=h.device)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_grad else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
        wc = None  # w in the logits dtype, cast once (not per chunk) when autocast computes in another dtype
        for i in range(0, N, chunk_size):
            hc, yc = h[i: i + chunk_size], targets[i: i + chunk_size]
            logits = hc @ (w if wc is None else wc).t()  # [n, V] in the autocast dtype when autocast is on
            if wc is None:
                wc = w.to(logits.dtype)
            if backend == "triton":  # the gradient overwrites the logits
                loss_c, correct_c = _k.cross_entropy_grad_op(logits, yc, 1.0, ignore_index, need_grad)
                p = logits
            else:
                p, loss_c, correct_c = _k.cross_entropy_grad_ref(logits, yc, ignore_index=ignore_index)
            token_loss[i: i + chunk_size] = loss_c
            correct[i: i + chunk_size] = correct_c
            if need_grad:
                grad_h[i: i + chunk_size] = p @ wc
                grad_w += p.t() @ hc.to(p.dtype)  # (added into fp32 without an fp32 copy of the chunk's term)
            del logits, p
        n_valid = (targets != ignore_index).sum().to(torch.float32)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(w.dtype), n_valid)
        ctx.mark_non_differentiable(token_loss, correct)
        return token_loss.sum() / n_valid, token_loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _g_tokens, _g_correct):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        # d(mean over the rows not ignored) / d(token loss); with every row ignored the gradients are 0, as torch's
        scale = grad_loss / n_valid.clamp(min=1.0)
        return grad_h * scale.to(grad_h.dtype), grad_w * scale.to(grad_w.dtype), None, None, None, None, None


def _check_inputs(h, weight, targets, chunk_size) -> None:
    for name, t in (("h", h), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"linear_cross_entropy: {name} must be a tensor, got {type(t).__name__}")  # noqa: TRY004
    if h.ndim != 2 or weight.ndim != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: h {_shape(h)}, weight {_shape(weight)}, targets {_shape(targets)}: "
                         f"expected [N, D], [V, D], [N]")
    if h.numel() == 0 or weight.numel() == 0:
        raise ValueError(f"linear_cross_entropy: h {_shape(h)} and weight {_shape(weight)} must not be empty")
    for name, t in (("h", h), ("weight", weight)):
        if t.dtype not in DTYPES:
            raise ValueError(f"linear_cross_entropy: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if h.dtype != weight.dtype and not torch.is_autocast_enabled(h.device.type):
        raise ValueError(f"linear_cross_entropy: h dtype {h.dtype} != weight dtype {weight.dtype} (mixed dtypes need "
                         f"autocast, which picks the matmul dtype)")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"linear_cross_entropy: targets must be int32 or int64, got {targets.dtype}")
    if not (h.device == weight.device == targets.device):
        raise ValueError(f"linear_cross_entropy: h on {h.device}, weight on {weight.device}, targets on "
                         f"{targets.device}: expected one device")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"linear_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")


def _check_target_range(targets, V: int, ignore_index: int) -> None:
    """ValueError naming the first target outside [0, V) that is not ignore_index. One aminmax and one host sync
    (a second pass only when some target is negative, e.g. ignored rows). Skipped while torch.compile traces or a
    CUDA graph captures (no sync possible there): the kernel then gives such a row a NaN loss instead."""
    if torch.compiler.is_compiling() or (targets.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = torch.stack(torch.aminmax(targets)).tolist()
    if 0 <= lo and hi < V:
        return
    bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
    where = bad.nonzero()
    if where.numel():
        i = int(where[0, 0])
        raise ValueError(f"linear_cross_entropy: targets[{i}] = {int(targets[i])} is outside [0, V={V}) and is not "
                         f"ignore_index={ignore_index} ({int(bad.sum())} such targets; targets {_shape(targets)})")


def linear_cross_entropy(h, weight, targets, *, chunk_size: int = DEFAULT_CHUNK, ignore_index: int = IGNORE_INDEX,
                         check_targets: bool = True):
    """Mean CE of the logits h @ weight.T without materialising them: h [N, D], weight [V, D], targets [N].

    h may be any strided view (torch's matmul reads it as is, or copies one chunk when its last dimension is not
    unit-stride). Rows whose target is `ignore_index` add no loss and no gradient and are left out of the mean
    (torch.nn.functional.cross_entropy's semantics; every row ignored gives NaN, 0 / 0, as torch does). Any
    other target must lie in [0, V): ValueError before any launch (checked with one host sync, skipped while
    torch.compile traces; check_targets=False skips it for a caller whose ids are already checked, e.g. on the
    host by the data reader: such a row then gets a NaN loss). Returns (loss: differentiable fp32 scalar, token_loss: [N] fp32 detached (0 on
    ignored rows), correct: [N] bool, argmax == target (False on ignored rows)). Extra memory beyond the
    gradients ([N, D] in h.dtype, [V, D] fp32 accumulator): per chunk one [chunk_size, V] tensor in the matmul
    dtype on the triton backend; the torch backend adds an fp32 copy of it."""
    _check_inputs(h, weight, targets, chunk_size)
    if check_flag("linear_cross_entropy: check_targets", check_targets):
        _check_target_range(targets, weight.shape[0], ignore_index)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    backend = traceable_backend("linear_cross_entropy", OpInputs.of(h, backward=need_grad))
    return _LinearCrossEntropy.apply(h, weight, targets.long(), chunk_size, int(ignore_index), need_grad, backend)
