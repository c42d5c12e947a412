"""wmfast.modules: AdaLN-Zero conditioning and the DiT block on the fused ops (Triton under the interpreter)
against the same block on the torch reference backend."""
from __future__ import annotations

import pytest
import torch
from wmfast.kernels._launch import triton_interpret

from wmfast.modules import AdaLNZero, DiTBlock
from wmfast.ops import use_backend

# CPU tensors under the interpreter (CI), else the GPU: the Triton backend runs the compiled kernels there.
DEVICE = "cpu" if triton_interpret() or not torch.cuda.is_available() else "cuda"


def test_adaln_zero_init_and_shapes():
    m = AdaLNZero(cond_dim=5, dim=8)
    assert torch.count_nonzero(m.linear.weight) == 0 and torch.count_nonzero(m.linear.bias) == 0
    assert m(torch.randn(2, 5)).shape == (2, 6, 8)
    assert m(torch.randn(2, 3, 5)).shape == (2, 3, 6, 8)


@pytest.mark.parametrize("cond_shape, frame_len", [((2, 5), None), ((2, 3, 5), 2), ((2, 6, 5), None)],
                         ids=["per-sample", "per-frame", "per-token"])
@use_backend("triton")
def test_block_is_identity_at_init_and_gates_get_gradients(cond_shape, frame_len):
    block = DiTBlock(dim=16, num_heads=2, cond_dim=5).to(DEVICE)
    x = torch.randn(2, 6, 16, device=DEVICE, requires_grad=True)
    y = block(x, torch.randn(cond_shape, device=DEVICE), frame_len=frame_len)
    assert torch.equal(y, x)  # zero-initialised gates: exactly the identity
    y.square().sum().backward()
    w = block.adaln.linear.weight.grad.view(6, 16, 5)
    assert torch.count_nonzero(w[2]) > 0 and torch.count_nonzero(w[5]) > 0  # gate rows learn from step 0
    assert torch.count_nonzero(w[[0, 1, 3, 4]]) == 0  # shift/scale: zero while the gates are zero


def _trained_like_block():
    torch.manual_seed(1)
    block = DiTBlock(dim=16, num_heads=2, cond_dim=5)
    with torch.no_grad():
        block.adaln.linear.weight.normal_(0, 0.3)  # leave the zero init, so every path is exercised
    return block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_triton_matches_torch_backend(dtype):
    block = _trained_like_block().to(DEVICE, dtype)
    x = torch.randn(2, 6, 16, dtype=dtype, device=DEVICE)
    cond = torch.randn(2, 3, 5, dtype=dtype, device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        block.zero_grad()
        xx = x.clone().requires_grad_()
        with use_backend(backend):
            y = block(xx, cond, frame_len=2)
            y.float().square().sum().backward()
        results[backend] = (y, xx.grad, block.adaln.linear.weight.grad, block.mlp[0].weight.grad)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    for a, e in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a.float(), e.float(), **tol)


def _train_losses(backend: str, steps: int = 4) -> list[float]:
    """A tiny 2-block DiT (per-frame conditioning) trained with AdamW on a fixed regression target."""
    with use_backend(backend):
        return _train(steps)


def _train(steps: int) -> list[float]:
    torch.manual_seed(3)
    blocks = torch.nn.ModuleList(DiTBlock(dim=16, num_heads=2, cond_dim=4, mlp_ratio=2.0) for _ in range(2))
    head = torch.nn.Linear(16, 16)
    blocks.to(DEVICE), head.to(DEVICE)
    params = list(blocks.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, cond, target = (torch.randn(*shape).to(DEVICE) for shape in ((2, 6, 16), (2, 3, 4), (2, 6, 16)))
    losses = []
    for _ in range(steps):
        h = x
        for block in blocks:
            h = block(h, cond, frame_len=2)
        loss = torch.nn.functional.mse_loss(head(h), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_convergence_matches_reference():
    """Training with the Triton kernels follows the reference's loss curve (Liger's convergence test, tiny)."""
    fused = _train_losses("triton")
    ref = _train_losses("torch")
    assert fused[-1] < fused[0]  # it learns (the zero-initialised gates open after the first step)
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(ref), rtol=1e-4, atol=1e-5)
