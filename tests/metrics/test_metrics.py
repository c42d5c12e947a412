"""wmfast.metrics: full-vocabulary and top-k CE against hand-computed cases; chunked linear CE vs autograd."""
import math

import pytest
import torch
import torch.nn.functional as F

from wmfast.metrics import cross_entropy, linear_cross_entropy, token_topk_cross_entropy, topk_cross_entropy


def test_cross_entropy_hand_case():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]])
    targets = torch.tensor([2, 0])
    # row 0: uniform over 4 -> log 4; row 1: p(0) = 3 / 6 -> log 2
    expected = (math.log(4) + math.log(2)) / 2
    assert cross_entropy(logits, targets).item() == pytest.approx(expected, abs=1e-6)
    assert cross_entropy(logits, targets, chunk_size=1).item() == pytest.approx(expected, abs=1e-6)


def test_topk_cross_entropy_hand_cases():
    V = 8
    z = torch.full((3, V), -10.0)
    z[:, 0], z[:, 1], z[:, 2] = math.log(2.0), 0.0, -1.0  # top-2 = {0, 1}: renormalised p = 2/3, 1/3
    targets = torch.tensor([0, 1, 2])
    ce = token_topk_cross_entropy(z, targets, k=2)
    assert ce[0].item() == pytest.approx(math.log(1.5), abs=1e-5)
    assert ce[1].item() == pytest.approx(math.log(3.0), abs=1e-5)
    # target 2 is outside the top 2: floor = max(log V, lse_2 - z_(2)) = max(log 8, log 3) = log 8
    assert ce[2].item() == pytest.approx(math.log(V), abs=1e-5)
    # a confident, narrow model pays the larger branch: lse_k - z_(k)
    z2 = torch.tensor([[20.0, 0.0, -5.0, -5.0]])
    miss = token_topk_cross_entropy(z2, torch.tensor([3]), k=2)
    kept = token_topk_cross_entropy(z2, torch.tensor([1]), k=2)
    assert miss.item() == pytest.approx(kept.item(), abs=1e-5) and miss.item() > math.log(4)
    # k = V is the full-vocabulary CE
    full = torch.randn(5, V)
    y = torch.randint(0, V, (5,))
    torch.testing.assert_close(topk_cross_entropy(full, y, k=V), F.cross_entropy(full, y))


def test_topk_is_monotone_and_chunk_invariant():
    torch.manual_seed(1)
    logits = torch.randn(50, 300).to(torch.bfloat16)
    y = torch.randint(0, 300, (50,))
    a = token_topk_cross_entropy(logits, y, k=20)
    b = token_topk_cross_entropy(logits, y, k=20, chunk_size=7)
    torch.testing.assert_close(a, b)
    # monotone: a miss costs at least as much as the worst kept target of the same row
    z = logits.float()
    kept = z.topk(20).indices
    worst_kept = token_topk_cross_entropy(logits, kept[:, -1], k=20)
    miss = ~(z.gather(1, y[:, None])[:, 0] >= z.topk(20).values[:, -1])
    assert miss.any() and (a[miss] >= worst_kept[miss] - 1e-5).all()
    assert (a >= 0).all()


def test_metrics_validate_shapes():
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(torch.zeros(4, 10), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="k=11"):
        topk_cross_entropy(torch.zeros(4, 10), torch.zeros(4, dtype=torch.long), k=11)


def test_3d_logits_and_no_full_copy():
    logits = torch.randn(2, 3, 16, 1000)
    y = torch.randint(0, 1000, (2, 3, 16))
    ref = F.cross_entropy(logits.reshape(-1, 1000), y.reshape(-1))
    torch.testing.assert_close(cross_entropy(logits, y, chunk_size=10), ref)
    assert topk_cross_entropy(logits, y, k=500).item() <= cross_entropy(logits, y).item() + 1e-5


@pytest.mark.parametrize("chunk", [1000, 7], ids=["one_chunk", "odd_chunks"])
def test_linear_cross_entropy_matches_autograd(chunk):
    torch.manual_seed(0)
    N, D, V = 61, 24, 300
    h = torch.randn(N, D, requires_grad=True)
    w = (torch.randn(V, D) * 0.3).requires_grad_()
    y = torch.randint(0, V, (N,))
    loss, tok, correct = linear_cross_entropy(h, w, y, chunk_size=chunk)
    (loss * 2.5).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logits = h2 @ w2.t()
    ref = F.cross_entropy(logits, y)
    (ref * 2.5).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(tok, F.cross_entropy(logits, y, reduction="none").detach())
    assert torch.equal(correct, logits.argmax(-1) == y)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_linear_cross_entropy_no_grad_path():
    h, w = torch.randn(5, 4), torch.randn(9, 4)
    y = torch.randint(0, 9, (5,))
    with torch.no_grad():
        loss, _, _ = linear_cross_entropy(h.requires_grad_(), w, y)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(h.detach() @ w.t(), y))


@pytest.mark.parametrize("fn", [cross_entropy, topk_cross_entropy], ids=["ce", "topk_ce"])
def test_chunking_never_copies_the_full_logits(fn):
    from wmfast.bench.memory import LiveBytesTracker

    N, V, chunk = 2048, 1000, 256
    logits = torch.randn(N, V, dtype=torch.bfloat16)
    y = torch.randint(0, V, (N,))
    kw = {"k": 100} if fn is topk_cross_entropy else {}
    with LiveBytesTracker() as mode:
        fn(logits, y, chunk_size=chunk, **kw)
    chunk_fp32 = chunk * V * 4  # the upcast chunk; its softmax temporaries are the same size
    assert mode.peak <= 3 * chunk_fp32 < N * V * 4, (mode.peak, chunk_fp32)  # far below a full fp32 copy


@pytest.mark.gpu
def test_linear_cross_entropy_bf16_cuda():
    torch.manual_seed(0)
    h = torch.randn(3000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(64000, 64, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, 64000, (3000,), device="cuda")
    loss, _, _ = linear_cross_entropy(h, w, y, chunk_size=1024)
    loss.backward()
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = F.cross_entropy(h32 @ w32.t(), y)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-2
    for g, r in ((h.grad, h32.grad), (w.grad, w32.grad)):
        assert (g.float() - r).abs().max().item() < 0.05 * r.abs().max().item() + 1e-4
