"""PSNR of the ensemble prediction against ensemble size N, denoising steps and solver, over a split.

For each sample, solver and step count, one ensemble of the largest N is sampled; the ensemble of size n is
its first n members (member i is seeded seed + i, so that is exactly what `wmfast sample --ensemble n` draws).
Both averagings are scored: pixel (decode every member, average the frames) and latent (average the latents,
decode once). PSNR: uint8 frames, per frame over all pixels and channels, mean over samples
(wmfast.metrics.psnr). Beside them: the mean PSNR of the members each on its own (what one sample scores) and the
sharpness (RMS gradient magnitude) of the averaged frames, of the members and of the true frames: averaging raises
PSNR where the members disagree and blurs the frame there. Time: the denoising loop's wall time per sample
(device synchronized) of that largest ensemble, shared by the rows of its solver and step count; the mean leaves
out the first sample when there are more (it pays one-time compilation and warm-up). Step skipping
(--cache-threshold, a list): for each threshold the first-block cache's skip schedule is calibrated once, on the
first sample with one member, then every sample runs with it (a schedule calibrated offline; the rows give the
number of skipped steps). Writes psnr.csv, psnr.md and psnr.png (PSNR against N at the smallest threshold, one
panel per solver), with several thresholds psnr_cache.png (PSNR and seconds against the threshold), under
--out, and prints the table.
"""
from __future__ import annotations

import csv
import os

from wmfast.cli import _sampling as common
from wmfast.cli._args import output_dir, positive_int


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as e:
        raise ValueError(f"{flag}: expected a comma-separated list of integers, got {text!r}") from e
    if not values or values[0] < 1:
        raise ValueError(f"{flag}: expected positive integers, got {text!r}")
    return values


def _threshold_list(text: str) -> list[float]:
    from wmfast.inference.ensemble import check_cache_threshold

    try:
        values = {float(v) for v in text.split(",") if v.strip()}
    except ValueError as e:
        raise ValueError(f"--cache-threshold: expected a comma-separated list of numbers, got {text!r}") from e
    try:
        for v in values or [-1.0]:
            check_cache_threshold(v, "--cache-threshold")
    except ValueError:
        raise ValueError(f"--cache-threshold: expected numbers >= 0, got {text!r}") from None
    return sorted(values)


def _solver_list(text: str) -> list[str]:
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))  # in order, once each
    bad = [n for n in names if n not in common.SOLVERS]
    if bad or not names:
        raise ValueError(f"--solver: expected a comma-separated list of {', '.join(common.SOLVERS)}, got {text!r}")
    return names


def add_arguments(p):
    common.add_model_arguments(p)
    p.add_argument("--ensemble", default="1,2,4,8,16", help="ensemble sizes N, comma-separated")
    p.add_argument("--steps", default="10,25,50", help="denoising step counts, comma-separated")
    p.add_argument("--solver", default="euler",
                   help="solvers, comma-separated: euler (default), unipc (Wan2.2's default sampler); each is scored "
                        "and timed at every step count")
    p.add_argument("--cache-threshold", default="0",
                   help="step-cache thresholds, comma-separated (0: no step skipped). For each, the skip schedule is "
                        "calibrated once on the first sample with one member, then used for every sample")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first K samples of the split")
    p.add_argument("--out", default=None, help="output directory (default: eval_psnr_<split>)")


def score_sample(model, sample, cfg, ns: list[int]) -> tuple[dict[tuple[str, int], float], float]:
    """({(score, n): value}, denoising seconds) for one sample: one ensemble of max(ns) members, scored on its
    first n members. Scores: "pixel" / "latent" (PSNR of the two averagings), "sharp_pixel" / "sharp_latent" (their
    RMS gradient magnitude, wmfast.metrics.psnr.sharpness), "member" (the mean PSNR of the first n members, each
    on its own: what a single sample scores on average), "sharp_member" and "sharp_target" (the true frame's)."""
    import torch

    from wmfast import ops
    from wmfast.inference.predict import predict_sample
    from wmfast.metrics.psnr import psnr, psnr_per_frame, sharpness, to_uint8

    pred = predict_sample(model, sample.context, sample.states, cfg, modes=("pixel",))
    members = pred.frames.members  # [N, 3, H, W], decoded once
    member_u8 = to_uint8(members)
    member_psnr = psnr_per_frame(member_u8, sample.target.expand_as(member_u8))
    scores = {}
    with torch.no_grad():
        for n in ns:
            pixel_mean, _ = ops.ensemble_mean_var(members[:n])
            latent_mean, _ = ops.ensemble_mean_var(pred.latents[:n])
            latent_frame = model.decode_latents(latent_mean[None])[0, -1]
            for mode, frame in (("pixel", to_uint8(pixel_mean)), ("latent", to_uint8(latent_frame))):
                scores[mode, n] = psnr(frame, sample.target)
                scores[f"sharp_{mode}", n] = sharpness(frame)
            scores["member", n] = float(member_psnr[:n].mean())
            scores["sharp_member", n] = sharpness(member_u8[:n])
            scores["sharp_target", n] = sharpness(sample.target)
    return scores, pred.denoise_s


def run(args) -> int:
    ns, steps_list = _int_list("--ensemble", args.ensemble), _int_list("--steps", args.steps)
    solvers, thresholds = _solver_list(args.solver), _threshold_list(args.cache_threshold)
    args.out = output_dir(args.out or f"eval_psnr_{args.split}")
    return evaluate(args, ns, steps_list, solvers, thresholds)


def evaluate(args, ns: list[int], steps_list: list[int], solvers: list[str], thresholds: list[float]) -> int:
    from tqdm.auto import tqdm

    from wmfast.inference.predict import calibrate_sample_skips

    model = common.load_model(args)
    dataset = common.open_split(args.data, args.split, model)
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    if count == 0:
        raise ValueError(f"the {args.split} split of {args.data} has no samples")
    totals: dict[tuple, float] = {}
    seconds: dict[tuple, float] = {}
    schedules: dict[tuple, tuple[int, ...]] = {}  # (solver, steps, threshold) -> skipped steps
    runs = [(solver, steps, th) for solver in solvers for steps in steps_list for th in thresholds]
    timed = range(1, count) if count > 1 else range(count)  # the first sample pays compilation and warm-up
    for index in tqdm(range(count), desc="samples", disable=args.no_progress):
        sample = common.load_sample(dataset, index)
        for key in runs:
            solver, steps, threshold = key
            if key not in schedules:  # calibrated offline: on the first sample, then fixed
                cfg = common.ensemble_config(args, 1, steps, solver)
                schedules[key] = calibrate_sample_skips(model, sample.context, sample.states, cfg, threshold)
            cfg = common.ensemble_config(args, max(ns), steps, solver, schedules[key])
            scores, denoise_s = score_sample(model, sample, cfg, ns)
            for (mode, n), value in scores.items():
                totals[(*key, mode, n)] = totals.get((*key, mode, n), 0.0) + value
            if index in timed:
                seconds[key] = seconds.get(key, 0.0) + denoise_s / len(timed)
    rows = [{"solver": solver, "steps": s, "cache_threshold": th, "skipped_steps": len(schedules[solver, s, th]),
             "ensemble": n, "psnr_pixel": totals[solver, s, th, "pixel", n] / count,
             "psnr_latent": totals[solver, s, th, "latent", n] / count,
             "psnr_member": totals[solver, s, th, "member", n] / count,
             "sharpness_pixel": totals[solver, s, th, "sharp_pixel", n] / count,
             "sharpness_latent": totals[solver, s, th, "sharp_latent", n] / count,
             "sharpness_member": totals[solver, s, th, "sharp_member", n] / count,
             "sharpness_target": totals[solver, s, th, "sharp_target", n] / count,
             "seconds_per_sample": seconds[solver, s, th], "samples": count} for solver, s, th in runs for n in ns]
    out = args.out
    os.makedirs(out, exist_ok=True)
    write_tables(rows, out)
    base = [r for r in rows if r["cache_threshold"] == thresholds[0]]  # PSNR against N: the smallest threshold
    plot(base, os.path.join(out, "psnr.png"))
    written = "psnr.csv, psnr.md, psnr.png"
    if len(thresholds) > 1:
        plot_cache(rows, os.path.join(out, "psnr_cache.png"))
        written += ", psnr_cache.png"
    print(markdown_table(rows))
    print(f"wrote {out}/{written}")
    return 0


def markdown_table(rows) -> str:
    """One row per (solver, steps, N); the time is of the largest N's ensemble, shared by its rows."""
    n_max = max(r["ensemble"] for r in rows)
    header = (f"| solver | steps | cache threshold | skipped steps | N | PSNR pixel avg (dB) | PSNR latent avg (dB) "
              f"| PSNR one member (dB) | sharpness pixel avg | sharpness one member | denoise s/sample (N={n_max}) "
              f"| samples |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['solver']} | {r['steps']} | {r['cache_threshold']:g} | {r['skipped_steps']} | {r['ensemble']} | "
              f"{r['psnr_pixel']:.3f} | {r['psnr_latent']:.3f} | {r['psnr_member']:.3f} | {r['sharpness_pixel']:.2f} | "
              f"{r['sharpness_member']:.2f} | {r['seconds_per_sample']:.3f} | {r['samples']} |" for r in rows]
    lines.append(f"sharpness: RMS gradient magnitude (grey levels per pixel); the true frames: "
                 f"{rows[0]['sharpness_target']:.2f}. PSNR one member: the mean PSNR of the first N members, each "
                 f"scored on its own")
    return "\n".join(lines)


def write_tables(rows, out: str) -> None:
    with open(os.path.join(out, "psnr.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "psnr.md"), "w") as f:
        f.write(markdown_table(rows) + "\n")


def plot(rows, path: str) -> None:
    """PSNR against N (log2 axis), one panel per solver (shared y axis), one colour per step count (the legend
    gives the denoising time); solid = pixel averaging, dashed = latent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    all_steps = sorted({r["steps"] for r in rows})
    fig, axes = plt.subplots(1, len(solvers), figsize=(6 * len(solvers), 4), sharey=True, squeeze=False)
    for ax, solver in zip(axes[0], solvers):
        for i, steps in enumerate(all_steps):
            sel = [r for r in rows if r["solver"] == solver and r["steps"] == steps]
            if not sel:
                continue
            ns, secs = [r["ensemble"] for r in sel], sel[0]["seconds_per_sample"]
            ax.plot(ns, [r["psnr_pixel"] for r in sel], "o-", color=f"C{i}",
                    label=f"{steps} steps ({secs:.2f} s), pixel avg")
            ax.plot(ns, [r["psnr_latent"] for r in sel], "s--", color=f"C{i}", label=f"{steps} steps, latent avg")
        ax.set_xscale("log", base=2)
        ax.set_title(solver)
        ax.set_xlabel("ensemble size N")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("PSNR of frame 76 (dB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cache(rows, path: str) -> None:
    """PSNR (pixel averaging, the largest N) and denoising seconds per sample against the step-cache threshold,
    one line per (solver, steps), each point labelled with its number of skipped steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_max = max(r["ensemble"] for r in rows)
    top = [r for r in rows if r["ensemble"] == n_max]
    fig, (ax_psnr, ax_time) = plt.subplots(1, 2, figsize=(12, 4))
    for i, key in enumerate(dict.fromkeys((r["solver"], r["steps"]) for r in top)):
        sel = [r for r in top if (r["solver"], r["steps"]) == key]
        th = [r["cache_threshold"] for r in sel]
        label = f"{key[0]}, {key[1]} steps"
        ax_psnr.plot(th, [r["psnr_pixel"] for r in sel], "o-", color=f"C{i}", label=label)
        ax_time.plot(th, [r["seconds_per_sample"] for r in sel], "o-", color=f"C{i}", label=label)
        for r in sel:
            ax_time.annotate(f"{r['skipped_steps']} skipped", (r["cache_threshold"], r["seconds_per_sample"]),
                             fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax_psnr.set_ylabel(f"PSNR of frame 76, pixel avg, N={n_max} (dB)")
    ax_time.set_ylabel(f"denoising seconds per sample (N={n_max})")
    for ax in (ax_psnr, ax_time):
        ax.set_xlabel("step-cache threshold (accumulated relative L1 change of the first block)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
