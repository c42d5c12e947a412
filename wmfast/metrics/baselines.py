"""Reference points for the compression track's scores: the copy-last-grid baseline and the expected scores of a
known token distribution (a generator's ceiling).

Copy-last-grid: predict every future grid as the last context grid. Its greedy accuracy per future grid is the
share of tokens equal to the last context grid's. As a distribution (for CE and Top-k CE) it puts probability a_g on
the copied id and spreads 1 - a_g evenly over the other V - 1 ids, with a_g the copy's hit rate on future grid g
measured on data the scores are not computed on (the training split): the best CE any rule "copy, with this
confidence" reaches, so a model that beats it has learnt more than copying. Both CE flavours are computed by the
metric functions themselves (wmfast.metrics.ce) on one row per outcome, so ties and the Top-k floor are treated
exactly as for a model.
"""
from __future__ import annotations

import math

import torch

from wmfast.metrics.ce import token_cross_entropy, token_topk_cross_entropy


def copy_last_hits(tokens: torch.Tensor, context_frames: int) -> torch.Tensor:
    """tokens [B, T, ...] int (context grids first) -> bool [B, T - context_frames, S]: future token == the token
    at the same place in the last context grid."""
    B, T = tokens.shape[:2]
    flat = tokens.reshape(B, T, -1)
    return flat[:, context_frames:] == flat[:, context_frames - 1: context_frames]


def _outcome_scores(log_probs: torch.Tensor, targets: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-outcome full and top-k CE of one distribution (log_probs [V]) for each target id."""
    logits = log_probs.expand(len(targets), -1)
    y = torch.tensor(targets)
    return token_cross_entropy(logits, y).double(), token_topk_cross_entropy(logits, y, k).double()


def expected_scores(named: int, p_named: float, p_rest: float, vocab_size: int, k: int) -> dict[str, float]:
    """Expected CE, Top-k CE and greedy accuracy when a token is one of `named` ids with probability p_named each,
    else any other id with probability p_rest each, and the prediction is that very distribution."""
    if not 1 <= named < vocab_size:
        raise ValueError(f"expected_scores: named={named} must be in [1, vocab_size={vocab_size})")
    total = named * p_named + (vocab_size - named) * p_rest
    if not math.isclose(total, 1.0, rel_tol=1e-9):
        raise ValueError(f"expected_scores: probabilities sum to {total}, not 1")
    log_probs = torch.full((vocab_size,), math.log(p_rest), dtype=torch.float64)
    log_probs[:named] = math.log(p_named)
    ce, topk = _outcome_scores(log_probs, [0, named], k)  # a named id, one of the others (all alike)
    weights = torch.tensor([named * p_named, (vocab_size - named) * p_rest], dtype=torch.float64)
    return {"ce": float((weights * ce).sum()), "topk_ce": float((weights * topk).sum()),
            "accuracy": max(p_named, p_rest)}


def copy_last_scores(hits: torch.Tensor, hit_rate: torch.Tensor, vocab_size: int, k: int) -> dict:
    """Scores of the copy-last-grid predictor with confidence `hit_rate` [F] (per future grid, clamped to
    [1/V, 1 - 1e-6]) on tokens whose hits are `hits` [B, F, S]: {"ce", "topk_ce", "accuracy_per_grid" (list),
    "ce_per_grid" (list)}."""
    F = hits.shape[1]
    if hit_rate.shape != (F,):
        raise ValueError(f"copy_last_scores: hit_rate shape {tuple(hit_rate.shape)}, expected ({F},)")
    ce_sum = topk_sum = 0.0
    per_grid = []
    for g in range(F):
        a = min(max(float(hit_rate[g]), 1.0 / vocab_size), 1 - 1e-6)
        log_probs = torch.full((vocab_size,), math.log((1 - a) / (vocab_size - 1)), dtype=torch.float64)
        log_probs[0] = math.log(a)
        ce, topk = _outcome_scores(log_probs, [0, 1], k)  # hit, miss
        n_hit = int(hits[:, g].sum())
        n_miss = hits[:, g].numel() - n_hit
        grid_ce = float(ce[0] * n_hit + ce[1] * n_miss)
        ce_sum += grid_ce
        topk_sum += float(topk[0] * n_hit + topk[1] * n_miss)
        per_grid.append(grid_ce / hits[:, g].numel())
    n = hits.numel()
    return {"ce": ce_sum / n, "topk_ce": topk_sum / n, "ce_per_grid": per_grid,
            "accuracy_per_grid": [float(hits[:, g].float().mean()) for g in range(F)]}


def copy_with_marginal_ce(tokens: torch.Tensor, context_frames: int, hit_rate: torch.Tensor,
                          marginal: torch.Tensor) -> float:
    """Mean CE of the copy-last-grid predictor whose miss mass follows a token marginal instead of spreading evenly:
    P(copied id) = a_g, P(other id y) = (1 - a_g) u(y) / (1 - u(copied id)). tokens [B, T, ...] int (context
    first), hit_rate [F], marginal u [V] (positive, summing to 1). A stronger reference than `copy_last_scores`:
    what copying plus knowing how often each id occurs reaches."""
    B, T = tokens.shape[:2]
    flat = tokens.reshape(B, T, -1).long()
    last, future = flat[:, context_frames - 1: context_frames], flat[:, context_frames:]
    u = marginal.double()
    a = hit_rate.double().clamp(1e-6, 1 - 1e-6).view(1, -1, 1)
    miss = (1 - a) * u[future] / (1 - u[last]).clamp_min(1e-12)
    p = torch.where(future == last, a.expand_as(miss), miss)
    return float(-p.log().mean())
