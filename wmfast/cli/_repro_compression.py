"""`wmfast reproduce`, compression track: the trained ST-Transformers (factorized and full attention) against the
copy-last-grid baseline and the generator's ceiling, their loss curves, and the measured attention memory."""
from __future__ import annotations

import json
import os

VARIANTS = {"factorized": "tiny", "full": "tiny-full"}  # attention -> ST-Transformer preset


def split_tokens(data_dir: str, split: str, vocab_size: int):
    """int [N, 6, G, G]: the tokens of every sample of `split`."""
    import torch

    from wmfast.data import TokenizedDataset

    ds = TokenizedDataset(data_dir, split, vocab_size=vocab_size)
    return torch.stack([ds[i]["tokens"] for i in range(len(ds))])


def copy_hit_rate(data_dir: str, split: str, vocab_size: int, context_frames: int):
    """([F] float: the copy-last-grid hit rate of each future grid over every sample of `split`, the hits
    [N, F, S], the tokens [N, 6, G, G])."""
    from wmfast.metrics.baselines import copy_last_hits

    tokens = split_tokens(data_dir, split, vocab_size)
    hits = copy_last_hits(tokens, context_frames)
    return hits.float().mean(dim=(0, 2)), hits, tokens


def ceiling(grid_size: int, vocab_size: int, k: int, uncertain: bool) -> dict[str, float]:
    """Expected CE, Top-k CE and greedy accuracy of an oracle that knows the clean scene (wmfast.data.synthetic)."""
    from wmfast.data.synthetic import future_token_law
    from wmfast.metrics.baselines import expected_scores

    out = {"ce": 0.0, "topk_ce": 0.0, "accuracy": 0.0}
    for share, named, p_named, p_rest in future_token_law(grid_size, vocab_size, uncertain):
        scores = expected_scores(named, p_named, p_rest, vocab_size, k)
        for key in out:
            out[key] += share * scores[key]
    return out


def curves(run_dir: str) -> dict[str, list]:
    """Training loss and validation CE / Top-k CE against the step, from RUN_DIR/metrics.jsonl."""
    from wmfast.train.runlog import read_jsonl

    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    top = next((key for key in (val[0] if val else {}) if key.startswith("val_top")), None)
    return {"train_step": [r["step"] for r in train], "train_loss": [r["loss"] for r in train],
            "val_step": [r["step"] for r in val], "val_ce": [r["val_ce"] for r in val],
            "val_topk_ce": [r[top] for r in val] if top else []}


def attention_memory() -> list[dict]:
    """Measured attention memory of full vs factorized attention (the model's eager attention, CPU live-bytes
    tracker) at the tiny model's shape (T=5, S=64) and the real one (T=5, S=1024), beside the formula."""
    from wmfast.bench.attention_memory import formula_ratio, measure_attention_memory

    rows = []
    for T, S in ((5, 64), (5, 1024)):
        m = measure_attention_memory(T, S, heads=1, head_dim=4)
        full, fact = m["full"], m["factorized"]
        rows.append({"T": T, "S": S, "formula_pct": 100 * formula_ratio(T, S),
                     "scores_pct": 100 * fact["score_bytes"] / full["score_bytes"],
                     "retained_pct": 100 * fact["retained_bytes"] / full["retained_bytes"],
                     "peak_pct": 100 * fact["peak_bytes"] / full["peak_bytes"],
                     "full_score_bytes": full["score_bytes"], "factorized_score_bytes": fact["score_bytes"]})
    return rows


def evaluate(data_dir: str, generated: dict[str, str], runs: dict[str, str], *, vocab_size: int, grid_size: int,
             k: int, context_frames: int = 3) -> dict:
    """Everything the report shows for the compression track. generated: variant -> `wmfast generate --json`
    file; runs: variant -> run directory."""
    import torch

    from wmfast.metrics.baselines import copy_last_scores, copy_with_marginal_ce

    train_rate, _, train_tokens = copy_hit_rate(data_dir, "train", vocab_size, context_frames)
    _, val_hits, val_tokens = copy_hit_rate(data_dir, "val", vocab_size, context_frames)
    copy = copy_last_scores(val_hits, train_rate, vocab_size, k)
    counts = torch.bincount(train_tokens[:, context_frames:].reshape(-1), minlength=vocab_size).double()
    marginal = (counts + 1) / (counts + 1).sum()  # the train split's future-token frequencies (add-one)
    copy_marginal = copy_with_marginal_ce(val_tokens, context_frames, train_rate, marginal)
    models = {}
    for variant, path in generated.items():
        with open(path) as f:
            g = json.load(f)
        models[variant] = {"ce": g["cross_entropy"], "topk_ce": g[f"top{k}_cross_entropy"],
                           "teacher_forced_accuracy": g["teacher_forced_accuracy"],
                           "greedy_accuracy_per_grid": g["greedy_accuracy_per_frame"], "samples": g["samples"]}
    return {"k": k, "vocab_size": vocab_size, "grid_size": grid_size, "models": models,
            "copy_last_grid": {"ce": copy["ce"], "topk_ce": copy["topk_ce"],
                               "accuracy_per_grid": copy["accuracy_per_grid"],
                               "hit_rate_from_train": [float(x) for x in train_rate]},
            "copy_last_grid_with_marginal": {"ce": copy_marginal},
            "ceiling": ceiling(grid_size, vocab_size, k, uncertain=True),
            "curves": {variant: curves(run) for variant, run in runs.items()},
            "memory": attention_memory()}


def plot(results: dict, path: str, subtitle: str) -> str:
    """Validation CE (left) and training loss (right) against the step for both attentions, with the copy-last-grid
    baseline and the generator's ceiling as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (variant, c) in enumerate(results["curves"].items()):
        ax_val.plot(c["val_step"], c["val_ce"], "o-", color=f"C{i}", ms=3, label=f"{variant} attention: val CE")
        if c["val_topk_ce"]:
            ax_val.plot(c["val_step"], c["val_topk_ce"], "s--", color=f"C{i}", ms=3,
                        label=f"{variant} attention: val Top-{results['k']} CE")
        final = results["models"].get(variant)
        if final and c["val_step"]:  # the scores of the table: every val sample, not the loop's first batches
            ax_val.plot([c["val_step"][-1]], [final["ce"]], "*", color=f"C{i}", ms=12,
                        label=f"{variant} attention: final CE, all {final['samples']} val samples")
        ax_train.plot(c["train_step"], c["train_loss"], color=f"C{i}", lw=1, label=f"{variant} attention")
    for ax in (ax_val, ax_train):
        ax.axhline(results["copy_last_grid"]["ce"], color="k", ls=":", label="copy last grid (CE)")
        ax.axhline(results["ceiling"]["ce"], color="C2", ls="-.", label="generator's ceiling (CE)")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_val.set_ylabel("val cross-entropy of the 3 future grids (nats)")
    ax_val.set_title("curves: the training loop's validation batches", fontsize=8)
    ax_train.set_ylabel("training loss (teacher-forced CE, nats)")
    fig.suptitle("ST-Transformer (tiny, from scratch) on the uncertain synthetic tokens\n" + subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
