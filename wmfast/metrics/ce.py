"""Cross-entropy metrics over a 64,000-token vocabulary, chunked over rows.

Logits for the 3,072 future tokens of a batch are [N, 64000]; these functions take them in any float dtype
and upcast one chunk of rows at a time, so no second full-size copy (fp32 or otherwise) is ever made.

Top-k cross-entropy (the challenge's "Top-500 CE"; the official formula is unpublished, so wmfast defines it):
for each token with logits z (V of them), let K be the indices of its k largest logits and
lse_k = log sum_{j in K} exp(z_j) (the softmax renormalised over K). Then
    target y in K:      CE_k = lse_k - z_y
    target y not in K:  CE_k = floor = max(log V, lse_k - z_(k))      z_(k): the k-th largest logit
Why this floor: (1) monotone - a target the model ranks outside its top k never costs less than the least
likely token it kept (lse_k - z_(k) is the largest in-K charge), so pushing a target out of the top k cannot
lower the score; (2) at least log V - a miss costs at least as much as a uniform guess over the whole
vocabulary (11.07 nats for 64,000), so a model cannot game the metric by keeping a confident, narrow top k
that misses. It stays finite (the renormalised softmax gives out-of-K targets probability 0, i.e. infinite
CE), so a mean over tokens is usable. Ties at z_(k) count as inside K. Full-vocabulary CE is always
reported beside it.
"""
from __future__ import annotations

import math

import torch

from wmfast.ops.linear_cross_entropy import DEFAULT_CHUNK


def _flatten(logits: torch.Tensor, targets: torch.Tensor, name: str):
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"{name}: logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} + [V]")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: targets must be int32/int64, got {targets.dtype}")
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long()


def token_cross_entropy(logits, targets, *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-token full-vocabulary CE: logits [..., V], targets [...] -> fp32 [...]. No gradient path kept."""
    z, y = _flatten(logits, targets, "cross_entropy")
    out = torch.empty(y.shape, dtype=torch.float32, device=z.device)
    with torch.no_grad():
        for i in range(0, z.shape[0], chunk_size):
            c = z[i: i + chunk_size].float()
            out[i: i + chunk_size] = c.logsumexp(-1) - c.gather(1, y[i: i + chunk_size, None])[:, 0]
    return out.view(targets.shape)


def cross_entropy(logits, targets, *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean full-vocabulary cross-entropy (nats), fp32 scalar. logits [..., V], targets [...] int."""
    return token_cross_entropy(logits, targets, chunk_size=chunk_size).mean()


def token_topk_cross_entropy(logits, targets, k: int = 500, *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-token top-k CE (module docstring: renormalised over the k largest logits, floor for misses)."""
    z, y = _flatten(logits, targets, "topk_cross_entropy")
    V = z.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"topk_cross_entropy: k={k} must be in [1, V={V}]")
    out = torch.empty(y.shape, dtype=torch.float32, device=z.device)
    log_v = math.log(V)
    with torch.no_grad():
        for i in range(0, z.shape[0], chunk_size):
            c = z[i: i + chunk_size].float()
            top = c.topk(k, dim=-1, sorted=False).values  # [n, k]
            lse_k = top.logsumexp(-1)
            kth = top.min(-1).values
            zy = c.gather(1, y[i: i + chunk_size, None])[:, 0]
            floor = torch.clamp(lse_k - kth, min=log_v)
            out[i: i + chunk_size] = torch.where(zy >= kth, lse_k - zy, floor)
    return out.view(targets.shape)


def topk_cross_entropy(logits, targets, k: int = 500, *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean top-k cross-entropy (the challenge's Top-500 CE as wmfast defines it), fp32 scalar."""
    return token_topk_cross_entropy(logits, targets, k, chunk_size=chunk_size).mean()
