"""Linear cross-entropy: the mean CE of the logits h @ weight.T against targets, computed chunk by chunk so that
the [N, V] logits never exist (the training loss of the ST-Transformer's tied output head)."""
from __future__ import annotations

import torch

DEFAULT_CHUNK = 4096  # rows: a [4096, 64000] fp32 chunk of logits is 1 GiB


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of (h @ w.T) against targets, chunk by chunk: the gradients are computed in the forward (the
    logits of a chunk are needed for both), so [N, V] logits never exist; backward scales them."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk_size: int, need_grad: bool):
        N = h.shape[0]
        token_loss = torch.empty(N, dtype=torch.float32, device=h.device)
        correct = torch.empty(N, dtype=torch.bool, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
        for i in range(0, N, chunk_size):
            hc, yc = h[i: i + chunk_size], targets[i: i + chunk_size]
            logits = hc @ w.t()  # [n, V] in the autocast dtype when autocast is on
            z = logits.float()
            lse = z.logsumexp(-1)
            token_loss[i: i + chunk_size] = lse - z.gather(1, yc[:, None])[:, 0]
            correct[i: i + chunk_size] = z.argmax(-1) == yc
            if need_grad:
                p = (z - lse[:, None]).exp_()  # softmax, in place on the fp32 copy
                p[torch.arange(p.shape[0], device=p.device), yc] -= 1.0
                p = p.to(logits.dtype)
                grad_h[i: i + chunk_size] = (p @ w.to(logits.dtype)).to(h.dtype)
                grad_w += (p.t() @ hc.to(logits.dtype)).float()
            del logits, z
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(w.dtype))
        ctx.n = N
        ctx.mark_non_differentiable(token_loss, correct)
        return token_loss.mean(), token_loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _g_tokens, _g_correct):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n  # d(mean)/d(token loss)
        return grad_h * scale.to(grad_h.dtype), grad_w * scale.to(grad_w.dtype), None, None, None


def linear_cross_entropy(h, weight, targets, *, chunk_size: int = DEFAULT_CHUNK):
    """Mean CE of the logits h @ weight.T without materialising them: h [N, D], weight [V, D], targets [N].

    Returns (loss: differentiable scalar, token_loss: [N] fp32 detached, correct: [N] bool (argmax == target)).
    Peak extra memory: one [chunk_size, V] fp32 block plus fp32 [V, D] weight-gradient accumulator."""
    if h.ndim != 2 or weight.ndim != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)}, weight {tuple(weight.shape)}, targets "
                         f"{tuple(targets.shape)}: expected [N, D], [V, D], [N]")
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets.long(), chunk_size, need_grad)
