"""Draw the loss and throughput curves of a training run directory to PNG (from RUN_DIR/metrics.jsonl)."""
from __future__ import annotations

import os
import sys


def add_arguments(p):
    p.add_argument("run_dir", help="a `wmfast train` run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")


def last_per_step(records: list[dict], kind: str) -> list[dict]:
    """One record per step, the last written: a resumed run logs the steps after its checkpoint again."""
    by_step = {r["step"]: r for r in records if r.get("kind") == kind and "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def plot_run(run_dir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wmfast.train.runlog import read_jsonl

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist (is {run_dir!r} a wmfast train run directory?)")
    records = read_jsonl(path)
    train, val = last_per_step(records, "train"), last_per_step(records, "val")
    if not train:
        raise ValueError(f"{path} has no training records yet")
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in train], label="train loss", lw=1)
    for key in sorted({k for r in val for k in r if k.startswith("val_")}):
        pts = [(r["step"], r[key]) for r in val if key in r]
        ax.plot(*zip(*pts), marker="o", label=key)
    ax.set(xlabel="step", ylabel="loss / CE (nats)", title="loss")
    ax.legend()
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set(xlabel="step", ylabel="learning rate", title="LR schedule")
    ax = axes[2]
    ax.plot(steps, [r["samples_per_s"] for r in train], label="samples/s")
    ax.set(xlabel="step", ylabel="samples/s", title="throughput")
    mfu = [(s, r["mfu"]) for s, r in zip(steps, train) if r.get("mfu") is not None]
    if mfu:
        twin = ax.twinx()
        twin.plot(*zip(*[(s, 100 * m) for s, m in mfu]), color="tab:red", label="MFU %")
        twin.set_ylabel("MFU (%)")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args) -> int:
    try:
        out = plot_run(args.run_dir, args.out)
    except ValueError as e:
        print(f"wmfast plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wmfast plot: wrote {out}")
    return 0
