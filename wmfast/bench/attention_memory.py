"""The memory-complexity table, measured: full (block-causal) vs factorized (spatial + causal temporal)
attention, eager (materialised scores) and fused, and the ratio beside the design card's formula.

What is measured, per (T, S) at fixed batch B, heads H and head dim D:
- full: attention over all N = T*S tokens with a block-causal mask (frame t sees frames <= t);
  q, k, v [B, H, N, D].
- factorized: spatial attention within each frame (q, k, v [B*T, H, S, D]) then causal temporal attention
  at each spatial location (q, k, v [B*S, H, T, D]). Each step gets its inputs in the layout it wants,
  as the model's own projections would produce them, so that layout copies are not counted.
- eager: scores = q k^T, masked in place, softmax, @ v (what 1xgpt-style models do). fused: SDPA
  (flash / memory-efficient), flex_attention with a block mask for the full block-causal case on CUDA.
- modes: "fwd" (no grad), "fwd+bwd" (a training step of the attention), and, for eager, "saved": the
  bytes autograd keeps for backward (non-input tensors through saved_tensors_hooks), what accumulates over
  the layers of a model in training.
- GPU only: the largest batch that fits a training step of the 136M model with full vs factorized attention
  at T = 5 (wmfast.bench.largest_batch).
- memory: the peak allocated during one call above the inputs (wmfast.bench.timing.peak_memory): CUDA
  max_memory_allocated, or on the CPU the live-bytes estimate of a TorchDispatchMode (fused kernels'
  internal scratch is invisible to it, so CPU fused numbers are lower bounds).

The formula (design card, `attention_memory_table`): memory(factorized) / memory(full) = (T S^2 + S T^2) / (T S)^2
(T = 5, S = 1024: 26.2M vs 5.27M scores -> 20.1%). The two
factorized steps run one after the other, so their *peaks* do not add: the peak ratio is
max(T S^2, S T^2) / (T S)^2, lower than the formula by 1/S (0.39 percentage points at S = 256), while the
*saved* bytes do add. The check: every eager ratio within 1 percentage point of the formula.

`measure_attention_memory` counts the same on the model layout [B, T, S, H, Dh] with the model's own eager
attention (wmfast.models.st_transformer.eager_attention) under the live-bytes tracker (wmfast.bench.memory):
the bytes of the attention probabilities (softmax outputs: one element per score) and the live bytes (peak,
and retained for the backward at the end of the forward) of tensors created inside the call.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from wmfast.bench import figures
from wmfast.bench.context import BenchContext
from wmfast.bench.memory import LiveBytesTracker, saved_bytes

# (T, S) pairs of the issue: T sweep at S = 1024, S sweep at T = 5; B, H, D of the 136M ST-Transformer
# (d = 512, 8 heads of 64), batch 1 so that T = 16 / S = 4096 full attention (2 x 6.7 GB of bf16 scores)
# fits an 80 GB GPU in training.
FULL_SHAPES = [(t, 1024) for t in (2, 3, 5, 8, 16)] + [(5, 256), (5, 4096)]
FULL_CFG = {"B": 1, "H": 8, "D": 64, "dtype": torch.bfloat16}
# The lease profile: the model's T = 5 at S = 1024 and the neighbours of the table (seconds, not minutes).
LEASE_SHAPES = [(2, 1024), (5, 1024), (8, 1024), (5, 256)]
# CPU smoke test (CI): S >= 128 keeps the max-vs-sum gap (1/S) under 1 point; the largest point (T = 8,
# S = 128: 4 MB of fp32 scores) keeps the whole suite at a few seconds on 2 cores.
QUICK_SHAPES = [(2, 128), (5, 128), (8, 128), (5, 256)]
QUICK_CFG = {"B": 1, "H": 1, "D": 16, "dtype": torch.float32}
TOLERANCE_PP = 1.0
MODES = ("fwd", "fwd+bwd", "saved")
CHECKED_MODES = ("fwd", "saved")


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


def formula_ratio(T: int, S: int) -> float:
    """(T S^2 + S T^2) / (T S)^2: the design card's table (attention_memory_table, the one source of the formula)."""
    return attention_memory_table(T, S)["ratio"]


def sequential_ratio(T: int, S: int) -> float:
    """The peak ratio when spatial and temporal steps run one after the other: max(TS^2, ST^2) / (TS)^2."""
    return max(T * S * S, S * T * T) / (T * S) ** 2


# ------------------------------------------------------------------------------------ implementations
def eager_attention(q, k, v, blocked=None):
    """Materialised-scores attention. q, k, v: [..., L, D]; blocked: [L, L] bool, True where masked."""
    scores = torch.matmul(q, k.transpose(-2, -1))  # [..., L, L]
    # in place: neither op's backward needs its input, so autograd allows it and no second [L, L] is made
    scores.mul_(q.shape[-1] ** -0.5)
    if blocked is not None:
        scores.masked_fill_(blocked, float("-inf"))
    probs = scores.softmax(dim=-1)
    del scores  # freed before the second matmul, as in a well-written eager model
    return torch.matmul(probs, v)


def block_causal_blocked(T: int, S: int, device) -> torch.Tensor:
    """[T*S, T*S] bool, True where token i (frame i // S) may NOT see token j (frame j // S > frame i)."""
    frame = torch.arange(T * S, device=device) // S
    return frame[None, :] > frame[:, None]


@dataclass
class Inputs:
    full: tuple  # q, k, v [B, H, N, D]
    spatial: tuple  # [B*T, H, S, D]
    temporal: tuple  # [B*S, H, T, D]
    blocked_full: torch.Tensor
    blocked_t: torch.Tensor


def make_inputs(T, S, B, H, D, dtype, device, requires_grad) -> Inputs:
    def qkv(*shape):
        return tuple(torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad) for _ in range(3))

    return Inputs(qkv(B, H, T * S, D), qkv(B * T, H, S, D), qkv(B * S, H, T, D),
                  block_causal_blocked(T, S, device), torch.ones(T, T, dtype=torch.bool, device=device).triu(1))


def providers(device: torch.device, inp: Inputs, T: int, S: int) -> dict:
    """{(impl, attention): fn(grad) -> outputs} for impl in eager/fused, attention in full/factorized."""
    fused_full, fused_name = _fused_full(device, inp, T, S)
    return {
        ("eager", "full"): lambda: (eager_attention(*inp.full, inp.blocked_full),),
        ("eager", "factorized"): lambda: (eager_attention(*inp.spatial), eager_attention(*inp.temporal, inp.blocked_t)),
        ("fused", "full"): fused_full,
        ("fused", "factorized"): lambda: (F.scaled_dot_product_attention(*inp.spatial),
                                          F.scaled_dot_product_attention(*inp.temporal, is_causal=True)),
    }, fused_name


def _fused_full(device, inp: Inputs, T: int, S: int):
    """Block-causal fused attention: flex_attention + block mask on CUDA (O(N) memory), else SDPA with the
    boolean mask (memory-efficient kernel; it may expand the mask, which is then counted)."""
    if device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            block_mask = create_block_mask(lambda b, h, q, kv: q // S >= kv // S, None, None, T * S, T * S,
                                           device=device)
            flex = torch.compile(flex_attention, dynamic=False)
            with torch.no_grad():  # compile now, inside the try: a failure falls back instead of ending the suite
                flex(*inp.full, block_mask=block_mask)
            return (lambda: (flex(*inp.full, block_mask=block_mask),)), "flex_attention"
        except Exception as e:  # noqa: BLE001 - an old torch or a compile failure: say so and use SDPA
            print(f"attention-memory: flex_attention unavailable ({type(e).__name__}: {e}); fused full uses SDPA")
    allowed = ~inp.blocked_full
    return (lambda: (F.scaled_dot_product_attention(*inp.full, attn_mask=allowed),)), "sdpa+mask"


# ------------------------------------------------------------------------------------------- the suite
def _step(fn, mode: str, grads: tuple):
    """The callable measured for `mode`: forward without grad, or forward + backward with fixed grads."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return fn()
        return fwd

    def fwd_bwd():
        torch.autograd.backward(fn(), grads)
    return fwd_bwd


def _grads(outs_like: dict) -> dict:
    return {key: tuple(torch.randn_like(o) for o in outs) for key, outs in outs_like.items()}


def measure_shape(ctx: BenchContext, T: int, S: int, cfg: dict) -> list[dict]:
    """Measure every (impl, attention, mode) at one (T, S); write timing rows; return ratio rows."""
    B, H, D, dtype = cfg["B"], cfg["H"], cfg["D"], cfg["dtype"]
    shape = f"B={B} T={T} S={S} H={H} D={D} {str(dtype).removeprefix('torch.')}"
    inp = make_inputs(T, S, B, H, D, dtype, ctx.device, requires_grad=True)
    all_inputs = inp.full + inp.spatial + inp.temporal
    provs, fused_name = providers(ctx.device, inp, T, S)
    with torch.no_grad():
        grads = _grads({k: fn() for k, fn in provs.items()})  # also warms up (flex compile)
    N = T * S
    dense = {"full": 4 * B * H * N * N * D, "factorized": 4 * B * H * (T * S * S + S * T * T) * D}
    peaks: dict[tuple, int | None] = {}
    for (impl, attn), fn in provs.items():
        provider = f"{attn}-{impl}" + (f"({fused_name})" if (impl, attn) == ("fused", "full") else "")
        for mode in ("fwd", "fwd+bwd"):
            step = _step(fn, mode, grads[(impl, attn)])
            flops = dense[attn] * (1 if mode == "fwd" else 3.5)  # backward: 5 matmuls to the forward's 2
            m = ctx.bench("attention-memory", shape, provider, mode, step, flops=flops, dtype=dtype,
                          grad_to_none=all_inputs)
            peaks[(impl, attn, mode)] = m.peak_mem_bytes
        if impl == "eager":
            peaks[(impl, attn, "saved")] = saved_bytes(fn, all_inputs + (inp.blocked_full, inp.blocked_t))
    method = "cuda max_memory_allocated" if ctx.device.type == "cuda" else "cpu live-bytes estimate"
    return _ratio_rows(T, S, shape, peaks, method)


def _ratio_rows(T: int, S: int, shape: str, peaks: dict, method: str) -> list[dict]:
    formula, seq = formula_ratio(T, S), sequential_ratio(T, S)
    rows = []
    for impl in ("eager", "fused"):
        for mode in MODES if impl == "eager" else MODES[:2]:
            full, fact = peaks.get((impl, "full", mode)), peaks.get((impl, "factorized", mode))
            ratio = fact / full if full and fact is not None else None
            diff = None if ratio is None else 100 * (ratio - formula)
            # the formula counts materialised scores: fused kernels have none, and the fwd+bwd peak also holds
            # the q, k, v gradients (6 T S D for factorized vs 3 T S D for full), which it leaves out
            checked = impl == "eager" and mode in CHECKED_MODES
            rows.append({"T": T, "S": S, "shape": shape, "impl": impl, "mode": mode,
                         "full_bytes": full, "factorized_bytes": fact, "measured_ratio": ratio,
                         "formula_ratio": formula, "sequential_ratio": seq, "diff_pp": diff,
                         "method": "autograd saved_tensors_hooks" if mode == "saved" else method,
                         "check": ("" if not checked else "n/a" if diff is None
                                   else "pass" if abs(diff) <= TOLERANCE_PP else "FAIL")})
    return rows


RATIO_COLUMNS = ("T", "S", "shape", "impl", "mode", "full_bytes", "factorized_bytes", "measured_ratio",
                 "formula_ratio", "sequential_ratio", "diff_pp", "method", "check")


def measure_attention_memory(T: int, S: int, *, batch: int = 1, heads: int = 2, head_dim: int = 4,
                             dtype=torch.float32, device="cpu") -> dict:
    """Run the model's eager full and factorized attention forward (autograd on, as in training) and count bytes.

    Returns {"full": {...}, "factorized": {...}} each with score_bytes (softmax outputs), peak_bytes and
    retained_bytes (live at the end of the forward: what the backward keeps), all for tensors allocated in
    the call. Keep head_dim small against S so the q/k/v-sized extras stay negligible beside the scores."""
    from wmfast.models.st_transformer.eager_attention import eager_factorized_attention, eager_full_attention

    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, T, S, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    result = {}
    for name, fn in (("full", eager_full_attention), ("factorized", eager_factorized_attention)):
        with LiveBytesTracker() as tracker:
            o = fn(q, k, v)
            retained = tracker.current
        result[name] = {"score_bytes": tracker.softmax_bytes, "peak_bytes": tracker.peak, "retained_bytes": retained}
        del o
    return result


def run(ctx: BenchContext) -> list[dict]:
    """The attention-memory suite: ratio rows (also written to attention_memory.csv), plots, largest batch."""
    shapes, cfg = (QUICK_SHAPES, QUICK_CFG) if ctx.quick else (LEASE_SHAPES if ctx.lease else FULL_SHAPES, FULL_CFG)
    if not ctx.quick and ctx.device.type != "cuda":  # the GPU shapes would need tens of GB on the CPU
        ctx.log("attention-memory: no GPU; running the quick CPU shapes")
        shapes, cfg = QUICK_SHAPES, QUICK_CFG
    rows = []
    for T, S in shapes:
        rows += measure_shape(ctx, T, S, cfg)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    write_ratio_csv(rows, Path(ctx.out_dir) / "attention_memory.csv")
    for line in ratio_table(rows):
        ctx.log(line)
    plot_ratios(rows, Path(ctx.out_dir) / "attention_memory.png", off_gpu=figures.running_off_gpu(ctx.device))
    if ctx.device.type == "cuda" and not ctx.quick:
        _largest_batch(ctx)
    else:
        ctx.log("attention-memory: largest batch of the 136M model: GPU only (skipped)")
    return rows


def _largest_batch(ctx: BenchContext) -> None:
    try:
        import wmfast.models  # noqa: F401
    except ImportError as e:
        ctx.log(f"attention-memory: largest batch skipped (wmfast.models not importable: {e})")
        return
    from wmfast.bench import largest_batch

    found = largest_batch.run(ctx)
    ctx.log(f"attention-memory: largest batch, 136M model, T=5, training step: {found}")


def write_ratio_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RATIO_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in RATIO_COLUMNS})


def _cell(v) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def read_ratio_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("T", "S"):
            r[k] = int(r[k])
        for k in ("measured_ratio", "formula_ratio", "sequential_ratio", "diff_pp"):
            r[k] = float(r[k]) if r[k] not in ("", None) else None
    return rows


def ratio_table(rows: list[dict]) -> list[str]:
    """Markdown: per (T, S), formula beside the measured factorized/full ratios (percent)."""
    cols = [("eager", "fwd"), ("eager", "fwd+bwd"), ("eager", "saved"), ("fused", "fwd"), ("fused", "fwd+bwd")]
    head = ("| T | S | formula | max-of-steps | " + " | ".join(f"{i} {m}" for i, m in cols)
            + f" | eager {'+'.join(CHECKED_MODES)} within {TOLERANCE_PP:g} pt |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by_key = {(r["T"], r["S"], r["impl"], r["mode"]): r for r in rows}
    for T, S in dict.fromkeys((r["T"], r["S"]) for r in rows):
        first = by_key[(T, S, "eager", "fwd")]
        cells = [_pct(by_key.get((T, S, i, m), {}).get("measured_ratio")) for i, m in cols]
        checks = [by_key[(T, S, "eager", m)]["check"] for m in CHECKED_MODES if (T, S, "eager", m) in by_key]
        verdict = "FAIL" if "FAIL" in checks else "n/a" if "n/a" in checks else "pass"
        lines.append(f"| {T} | {S} | {_pct(first['formula_ratio'])} | {_pct(first['sequential_ratio'])} | "
                     + " | ".join(cells) + f" | {verdict} |")
    return lines


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def plot_ratios(rows: list[dict], path: Path, *, off_gpu: bool | None = None) -> Path:
    """Two panels (T sweep, S sweep): measured factorized/full ratios beside the formula. off_gpu: mark the figure
    as not GPU measurements (None: when a row's peak-memory method is the CPU estimate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_per_s = {s: len({r["T"] for r in rows if r["S"] == s}) for s in {r["S"] for r in rows}}
    S_fix = max(t_per_s, key=t_per_s.get)  # the S of the T sweep
    sweeps = [("T", [r for r in rows if r["S"] == S_fix], f"S = {S_fix}"),
              ("S", [r for r in rows if r["T"] == 5], "T = 5")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (var, sub, fixed) in zip(axes, sweeps):
        xs = sorted({r[var] for r in sub})
        formula = {r[var]: r["formula_ratio"] for r in sub}
        ax.plot(xs, [100 * formula[x] for x in xs], "k-", lw=2, label="formula (TS²+ST²)/(TS)²")
        for (impl, mode), style in {("eager", "fwd"): "o--", ("eager", "fwd+bwd"): "s--", ("eager", "saved"): "^:",
                                    ("fused", "fwd"): "x-.", ("fused", "fwd+bwd"): "+-."}.items():
            pts = [(r[var], 100 * r["measured_ratio"]) for r in sub
                   if r["impl"] == impl and r["mode"] == mode and r["measured_ratio"] is not None]
            if pts:
                ax.plot(*zip(*sorted(pts)), style, label=f"measured {impl} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(var)
        ax.set_ylabel("factorized / full memory (%)")
        ax.set_title(f"attention memory, {fixed}")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    if off_gpu is None:
        off_gpu = any(str(r.get("method", "")).startswith("cpu") for r in rows)
    return figures.save_figure(fig, path, off_gpu=off_gpu)
