"""Attention memory: the table of score elements for full vs factorized attention, and a measurement of it.

Full attention (block-causal over time, or not: the score matrix is materialised whole either way by an
eager implementation) holds (T S)^2 scores per (batch, head); factorized attention holds T S^2 (spatial:
one S x S matrix a frame) + S T^2 (temporal: one T x T matrix a token). With T = 5, S = 1024:
26.2M vs 5.27M scores -> 20.1%.

`measure_attention_memory` runs eager (score-materialising) full and factorized attention under a
TorchDispatchMode that sees every tensor the ops allocate, so it counts bytes exactly instead of reading
process RSS (which the allocator, other threads and page caching blur): the bytes of the attention
probabilities (softmax outputs: one element per score) and the live bytes (peak, and retained for the
backward at the end of the forward) of tensors created inside the call.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def attention_memory_table(T: int, S: int, *, batch: int = 1, heads: int = 1, bytes_per_element: int = 4) -> dict:
    """Attention-score elements per (batch, head) for full vs factorized attention over T frames of S tokens.

    Returns {"T", "S", "full", "factorized", "spatial", "temporal", "ratio", "full_bytes", "factorized_bytes",
    "rows"}: rows is the seed's table [{"method", "complexity", "score_elements", "relative"}], relative to
    full attention (T=5, S=1024 -> ratio 0.2010). *_bytes multiply by batch * heads * bytes_per_element."""
    if T < 1 or S < 1:
        raise ValueError(f"T={T} and S={S} must be >= 1")
    full = (T * S) ** 2
    spatial, temporal = T * S * S, S * T * T
    factorized = spatial + temporal
    scale = batch * heads * bytes_per_element
    return {
        "T": T, "S": S, "full": full, "factorized": factorized, "spatial": spatial, "temporal": temporal,
        "ratio": factorized / full, "full_bytes": full * scale, "factorized_bytes": factorized * scale,
        "rows": [
            {"method": "full attention", "complexity": "O((T S)^2)", "score_elements": full, "relative": 1.0},
            {"method": "spatio-temporal attention", "complexity": "O(T S^2 + S T^2)", "score_elements": factorized,
             "relative": factorized / full},
        ],
    }


def format_memory_table(table: dict) -> str:
    """The table as Markdown (what the README and the bench report show)."""
    lines = [f"T={table['T']}, S={table['S']}", "| method | memory complexity | score elements | relative cost |",
             "|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['method']} | {r['complexity']} | {r['score_elements'] / 1e6:.2f}M | {r['relative']:.1%} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Eager attention that materialises its scores (what the table counts)
# ---------------------------------------------------------------------------------------------------------
def _attend(q, k, v, mask=None, mask_view=None):
    """q, k, v: [..., L, Dh] -> o; scores [..., L, L] masked in place (True = hidden) through `mask_view`."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        view = scores.view(mask_view) if mask_view is not None else scores
        view.masked_fill_(mask, float("-inf"))
    return scores.softmax(-1) @ v


def eager_full_attention(q, k, v):
    """Block-causal full attention over all T*S tokens, scores materialised. [B, T, S, H, Dh] -> same."""
    B, T, S, H, Dh = q.shape
    q2, k2, v2 = (x.reshape(B, T * S, H, Dh).transpose(1, 2) for x in (q, k, v))  # [B, H, TS, Dh]
    frame = torch.arange(T, device=q.device)
    hidden = (frame[:, None] < frame[None, :])[:, None, :, None]  # [T, 1, T, 1]: broadcast, never [TS, TS]
    o = _attend(q2, k2, v2, hidden, (B, H, T, S, T, S))
    return o.transpose(1, 2).reshape(B, T, S, H, Dh)


def eager_factorized_attention(q, k, v):
    """Spatial (bidirectional, per frame) then causal temporal (per token) attention, scores materialised.
    Both use the same q, k, v so the count is per pair of attentions, as in the table."""
    B, T, S, H, Dh = q.shape
    qs, ks, vs = (x.reshape(B * T, S, H, Dh).transpose(1, 2) for x in (q, k, v))  # [B*T, H, S, Dh]
    o_s = _attend(qs, ks, vs).transpose(1, 2).reshape(B, T, S, H, Dh)
    qt, kt, vt = (x.permute(0, 2, 3, 1, 4) for x in (q, k, v))  # [B, S, H, T, Dh]
    hidden = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    o_t = _attend(qt, kt, vt, hidden).permute(0, 3, 1, 2, 4)
    return o_s + o_t


class _LiveBytes(TorchDispatchMode):
    """Counts the storages that ops allocate inside the mode: live bytes (a storage stays live while any
    tensor made inside the mode still refers to it), their peak, and the bytes of softmax outputs."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = self.softmax_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
                if func is torch.ops.aten._softmax.default:
                    self.softmax_bytes += t.numel() * t.element_size()
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        key = t.untyped_storage().data_ptr()
        if key in self.live:
            self.live[key][1] += 1
        elif key in inputs:  # an in-place op or a view of a tensor made outside: nothing allocated
            return
        else:
            nbytes = t.untyped_storage().nbytes()
            self.live[key] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


def measure_attention_memory(T: int, S: int, *, batch: int = 1, heads: int = 2, head_dim: int = 4,
                             dtype=torch.float32, device="cpu") -> dict:
    """Run eager full and factorized attention forward (with autograd on, as in training) and count bytes.

    Returns {"full": {...}, "factorized": {...}} each with score_bytes (softmax outputs), peak_bytes and
    retained_bytes (live at the end of the forward: what the backward keeps), all for tensors allocated in
    the call. Keep head_dim small against S so the q/k/v-sized extras stay negligible beside the scores."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, T, S, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    result = {}
    for name, fn in (("full", eager_full_attention), ("factorized", eager_factorized_attention)):
        mode = _LiveBytes()
        with mode:
            o = fn(q, k, v)
            retained = mode.current
        result[name] = {"score_bytes": mode.softmax_bytes, "peak_bytes": mode.peak, "retained_bytes": retained}
        del o
    return result
