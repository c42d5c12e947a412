"""PSNR of the ensemble prediction against ensemble size N and denoising steps, over a split.

For each sample and each step count, one ensemble of the largest N is sampled; the ensemble of size n is its
first n members (member i is seeded seed + i, so that is exactly what `wmfast sample --ensemble n` draws).
Both averagings are scored: pixel (decode every member, average the frames) and latent (average the latents,
decode once). PSNR: uint8 frames, per frame over all pixels and channels, mean over samples
(wmfast.metrics.psnr). Writes psnr.csv, psnr.md and psnr.png under --out and prints the table.
"""
from __future__ import annotations

import csv
import os

from wmfast.cli import _sampling as common


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as e:
        raise ValueError(f"expected a comma-separated list of integers, got {text!r}") from e
    if not values or values[0] < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(p):
    common.add_model_arguments(p)
    p.add_argument("--ensemble", default="1,2,4,8,16", help="ensemble sizes N, comma-separated")
    p.add_argument("--steps", default="10,25,50", help="denoising step counts, comma-separated")
    p.add_argument("--limit", type=int, default=None, help="score only the first K samples of the split")
    p.add_argument("--out", default=None, help="output directory (default: eval_psnr_<split>)")


def score_sample(model, sample, cfg, ns: list[int]) -> dict[tuple[str, int], float]:
    """{(mode, n): PSNR} for one sample: one ensemble of max(ns) members, scored on its first n members."""
    import torch

    from wmfast import ops
    from wmfast.inference.ensemble import predict_sample
    from wmfast.metrics.psnr import psnr, to_uint8

    pred = predict_sample(model, sample.context, sample.states, cfg, modes=("pixel",))
    members = pred.frames.members  # [N, 3, H, W], decoded once
    scores = {}
    with torch.no_grad():
        for n in ns:
            pixel_mean, _ = ops.ensemble_mean_var(members[:n])
            latent_mean, _ = ops.ensemble_mean_var(pred.latents[:n])
            latent_frame = model.decode_latents(latent_mean[None])[0, -1]
            scores["pixel", n] = psnr(to_uint8(pixel_mean), sample.target)
            scores["latent", n] = psnr(to_uint8(latent_frame), sample.target)
    return scores


def run(args) -> int:
    from tqdm.auto import tqdm

    ns, steps_list = _int_list(args.ensemble), _int_list(args.steps)
    model = common.load_model(args)
    dataset = common.open_split(args.data, args.split, model)
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    if count == 0:
        raise ValueError(f"the {args.split} split of {args.data} has no samples")
    totals: dict[tuple[int, str, int], float] = {}
    for index in tqdm(range(count), desc="samples", disable=args.no_progress):
        sample = common.load_sample(dataset, index)
        for steps in steps_list:
            cfg = common.ensemble_config(args, max(ns), steps)
            for (mode, n), value in score_sample(model, sample, cfg, ns).items():
                totals[steps, mode, n] = totals.get((steps, mode, n), 0.0) + value
    rows = [{"steps": s, "ensemble": n, "psnr_pixel": totals[s, "pixel", n] / count,
             "psnr_latent": totals[s, "latent", n] / count, "samples": count} for s in steps_list for n in ns]
    out = args.out or f"eval_psnr_{args.split}"
    os.makedirs(out, exist_ok=True)
    write_tables(rows, out)
    plot(rows, os.path.join(out, "psnr.png"))
    print(markdown_table(rows))
    print(f"wrote {out}/psnr.csv, psnr.md, psnr.png")
    return 0


def markdown_table(rows) -> str:
    lines = ["| steps | N | PSNR pixel avg (dB) | PSNR latent avg (dB) | samples |", "|---|---|---|---|---|"]
    lines += [f"| {r['steps']} | {r['ensemble']} | {r['psnr_pixel']:.3f} | {r['psnr_latent']:.3f} | {r['samples']} |"
              for r in rows]
    return "\n".join(lines)


def write_tables(rows, out: str) -> None:
    with open(os.path.join(out, "psnr.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "psnr.md"), "w") as f:
        f.write(markdown_table(rows) + "\n")


def plot(rows, path: str) -> None:
    """PSNR against N (log2 axis), one colour per step count; solid = pixel averaging, dashed = latent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, steps in enumerate(sorted({r["steps"] for r in rows})):
        sel = [r for r in rows if r["steps"] == steps]
        ns = [r["ensemble"] for r in sel]
        ax.plot(ns, [r["psnr_pixel"] for r in sel], "o-", color=f"C{i}", label=f"{steps} steps, pixel avg")
        ax.plot(ns, [r["psnr_latent"] for r in sel], "s--", color=f"C{i}", label=f"{steps} steps, latent avg")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ensemble size N")
    ax.set_ylabel("PSNR of frame 76 (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
