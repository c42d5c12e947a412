"""Reference points of the compression scores (the copy-last-grid baseline, the expected scores of a known token
law) against brute force over every target id, and the sharpness measure."""
import math

import pytest
import torch

from wmfast.metrics import sharpness, sharpness_per_frame, token_cross_entropy, token_topk_cross_entropy
from wmfast.metrics.baselines import copy_last_hits, copy_last_scores, copy_with_marginal_ce, expected_scores


def _brute(log_probs: torch.Tensor, k: int):
    """Exact expectations over every target y ~ softmax(log_probs), through the metric functions."""
    V = log_probs.numel()
    p = log_probs.exp()
    logits = log_probs.expand(V, V)
    y = torch.arange(V)
    ce = (p * token_cross_entropy(logits, y).double()).sum()
    topk = (p * token_topk_cross_entropy(logits, y, k).double()).sum()
    return float(ce), float(topk)


@pytest.mark.parametrize(("named", "k"), [(1, 5), (4, 5), (4, 3), (2, 20)])
def test_expected_scores_match_brute_force(named, k):
    V, noise = 20, 0.1
    p_rest = noise / V
    p_named = (1 - (V - named) * p_rest) / named
    log_probs = torch.full((V,), math.log(p_rest), dtype=torch.float64)
    log_probs[:named] = math.log(p_named)
    got = expected_scores(named, p_named, p_rest, V, k)
    ce, topk = _brute(log_probs, k)
    assert got["ce"] == pytest.approx(ce, rel=1e-5) and got["topk_ce"] == pytest.approx(topk, rel=1e-5)
    assert got["accuracy"] == pytest.approx(p_named)
    with pytest.raises(ValueError, match="sum to"):
        expected_scores(named, p_named * 2, p_rest, V, k)


def test_copy_last_hits_and_scores():
    g = torch.Generator().manual_seed(0)
    V, k = 16, 4
    tokens = torch.randint(0, V, (5, 6, 3, 3), generator=g)
    tokens[:, 3] = torch.where(torch.rand(5, 3, 3, generator=g) < 0.7, tokens[:, 2], tokens[:, 3])
    hits = copy_last_hits(tokens, 3)
    assert hits.shape == (5, 3, 9)
    torch.testing.assert_close(hits[:, 0], (tokens[:, 3] == tokens[:, 2]).reshape(5, 9))
    rate = torch.tensor([0.7, 0.1, 0.08])  # each >= 1/V (lower ones are clamped to it)
    got = copy_last_scores(hits, rate, V, k)
    # brute force: the copy distribution as logits for every future token
    ce = topk = 0.0
    for gi in range(3):
        logits = torch.full((5 * 9, V), math.log((1 - rate[gi].item()) / (V - 1)), dtype=torch.float64)
        copied = tokens[:, 2].reshape(-1)
        logits[torch.arange(45), copied] = math.log(rate[gi].item())
        y = tokens[:, 3 + gi].reshape(-1)
        ce += float(token_cross_entropy(logits, y).sum())
        topk += float(token_topk_cross_entropy(logits, y, k).sum())
    assert got["ce"] == pytest.approx(ce / hits.numel(), rel=1e-5)
    assert got["topk_ce"] == pytest.approx(topk / hits.numel(), rel=1e-5)
    assert got["accuracy_per_grid"][0] == pytest.approx(float(hits[:, 0].float().mean()))
    with pytest.raises(ValueError, match="hit_rate shape"):
        copy_last_scores(hits, rate[:2], V, k)


def test_copy_with_marginal_ce():
    g = torch.Generator().manual_seed(1)
    V = 12
    tokens = torch.randint(0, V, (4, 6, 2, 2), generator=g)
    rate = torch.tensor([0.5, 0.2, 0.1])
    u = torch.rand(V, generator=g, dtype=torch.float64) + 0.1
    u /= u.sum()
    total, n = 0.0, 0
    for b in range(4):
        for gi in range(3):
            for s in range(4):
                last, y = int(tokens[b, 2].reshape(-1)[s]), int(tokens[b, 3 + gi].reshape(-1)[s])
                probs = (1 - rate[gi].double()) * u / (1 - u[last])
                probs[last] = rate[gi]
                assert float(probs.sum()) == pytest.approx(1.0)  # a distribution
                total -= math.log(float(probs[y]))
                n += 1
    assert copy_with_marginal_ce(tokens, 3, rate, u) == pytest.approx(total / n, rel=1e-9)


def test_sharpness():
    flat = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    assert sharpness(flat) == 0.0
    edge = flat.clone()
    edge[..., 4:] = 200  # a vertical edge of 100 grey levels: 7 of the 7x7 interior pixels see it
    assert sharpness_per_frame(edge).tolist() == pytest.approx([100 / math.sqrt(7)] * 2)
    shifted = flat.clone()
    shifted[..., 3:] = 200
    mean = ((edge.double() + shifted.double()) / 2).round().to(torch.uint8)  # two edges of 50
    assert sharpness(mean) == pytest.approx(100 / math.sqrt(14))  # an average of disagreeing frames is blurrier
    with pytest.raises(ValueError, match="uint8"):
        sharpness(edge.float())
