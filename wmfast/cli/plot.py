"""Draw the loss, learning-rate and throughput curves of a training run directory to PNG (from RUN_DIR/metrics.jsonl,
titled with the run's preset and task from RUN_DIR/config.json).

Only numeric series are drawn (a record's strings and booleans, such as val_precision, are metadata), and a
record that lacks a key (a resumed run, a run without validation or without MFU) leaves a gap, not an error.
"""
from __future__ import annotations

import json
import math
import os

# What each task's training loss is, for the loss axis (wmfast.tasks: compression and toy train on next-token
# cross-entropy, sampling on the flow-matching MSE of the predicted velocity). Other tasks: "loss".
LOSS_NAMES = {"compression": "cross-entropy (nats)", "toy": "cross-entropy (nats)",
              "sampling": "flow-matching MSE (velocity)"}
# Validation series drawn one per style so that close curves (val_ce beside val_top500_ce) stay apart.
VAL_STYLES = (("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1))), ("P", (0, (1, 1))))


def add_arguments(p):
    p.add_argument("run_dir", help="a `wmfast train` run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")


def last_per_step(records: list[dict], kind: str) -> list[dict]:
    """One record per step, the last written: a resumed run logs the steps after its checkpoint again."""
    by_step = {r["step"]: r for r in records  # records that are not objects with a numeric step are not plotted
               if isinstance(r, dict) and r.get("kind") == kind and is_number(r.get("step"))}
    return [by_step[s] for s in sorted(by_step)]


def is_number(value) -> bool:
    """A finite int or float; bool, str, None, NaN and inf are not plotted."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records whose `key` is a number (is_number)."""
    pts = [(r["step"], r[key]) for r in records if is_number(r.get(key))]
    return [s for s, _ in pts], [v for _, v in pts]


def numeric_keys(records: list[dict], prefix: str) -> list[str]:
    """The keys starting with `prefix` that hold a number in at least one record, sorted."""
    return sorted({k for r in records for k, v in r.items() if k.startswith(prefix) and is_number(v)})


def read_run_config(run_dir: str) -> dict:
    """The "train" section of RUN_DIR/config.json (a TrainConfig: name, task, model, ...); {} when the file is
    missing or unreadable (a run directory copied without it)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            train = json.load(f).get("train")
    except (OSError, ValueError, AttributeError):
        return {}
    return train if isinstance(train, dict) else {}


def run_title(run_dir: str, config: dict) -> str:
    """"run <parent/dir>: preset <name> (task <task>, model <model>)", or saying that config.json is missing (the
    parent too: run directories are often named alike, e.g. `run`)."""
    name = os.path.join(*os.path.abspath(run_dir).split(os.sep)[-2:])
    if not config:
        return f"run {name}: preset unknown (no readable config.json)"
    return (f"run {name}: preset {config.get('name', '?')} (task {config.get('task', '?')}, "
            f"model {config.get('model', '?')})")


def loss_name(config: dict) -> str:
    return LOSS_NAMES.get(config.get("task"), "loss")


def _say_empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color="gray")


def draw_run(run_dir: str):
    """The figure of a run (loss | learning rate | throughput with MFU), not saved; ValueError when there is no
    metrics.jsonl or no training record in it."""
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
    config = read_run_config(run_dir)
    loss = loss_name(config)
    fig, (ax_loss, ax_lr, ax_speed) = plt.subplots(1, 3, figsize=(16, 4.5))
    _draw_loss(ax_loss, train, val, loss)
    _draw_lr(ax_lr, train)
    _draw_throughput(ax_speed, train)
    fig.suptitle(run_title(run_dir, config))
    fig.tight_layout()
    return fig


def _draw_loss(ax, train: list[dict], val: list[dict], loss: str) -> None:
    steps, values = series(train, "loss")
    if steps:
        ax.plot(steps, values, lw=1, color="tab:blue", label="train loss")
    keys = numeric_keys(val, "val_")
    for i, key in enumerate(keys):
        marker, style = VAL_STYLES[i % len(VAL_STYLES)]
        ax.plot(*series(val, key), marker=marker, linestyle=style, color=f"C{i + 1}", ms=5, label=key)
    if not steps and not keys:
        _say_empty(ax, "loss")
    ax.set(xlabel="step", ylabel=loss, title="train / val loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _draw_lr(ax, train: list[dict]) -> None:
    steps, values = series(train, "lr")
    if steps:
        ax.plot(steps, values)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    else:
        _say_empty(ax, "learning rate")
    ax.set(xlabel="step", ylabel="learning rate", title="LR schedule")
    ax.grid(alpha=0.3)


def _draw_throughput(ax, train: list[dict]) -> None:
    steps, values = series(train, "samples_per_s")
    if steps:
        ax.plot(steps, values, label="samples/s")
    ax.set(xlabel="step", ylabel="samples/s", title="throughput")
    ax.grid(alpha=0.3)
    mfu_steps, mfu = series(train, "mfu")
    handles, labels = ax.get_legend_handles_labels()
    if mfu_steps:
        twin = ax.twinx()
        twin.plot(mfu_steps, [100 * m for m in mfu], color="tab:red", label="MFU %")
        twin.set_ylabel("MFU (%)")
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if not steps and not mfu_steps:
        _say_empty(ax, "throughput")
    if handles:
        ax.legend(handles, labels, fontsize=8)


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Draw the run (draw_run) to `out` (default RUN_DIR/curves.png); returns the PNG path."""
    import matplotlib.pyplot as plt

    fig = draw_run(run_dir)
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args) -> int:
    from wmfast.cli._args import output_file

    if args.out:
        output_file(args.out, "--out")
    out = plot_run(args.run_dir, args.out)
    print(f"wmfast plot: wrote {out}")
    return 0
