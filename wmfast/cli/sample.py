"""Ensemble sampling with the Wan2.2 world model: N samples of the future as one batch, averaged.

Writes the predicted 77th frame (frame 76, 2 s after the last context frame) as a PNG, the PSNR of both
averagings against the ground truth, and with --strip a side-by-side strip: the last context frame, each
member, the ensemble mean, the per-pixel spread and the ground truth.

Quick start (random tiny model, no download, seconds on 2 CPU cores):
    wmfast data synth --raw --out /tmp/raw --shards 1 --frames 154 --size 64
    wmfast sample --model tiny --data /tmp/raw --ensemble 4 --steps 4 --strip --out /tmp/sample

--profile prints where the time went (conditioning, denoise, decode, average: seconds and share of the total, each
device synchronized at its end) and, on CUDA, the peak GPU memory of each phase; sample.json always carries the
timings ("timings", seconds).
"""
from __future__ import annotations

import json
import os
import time

from wmfast.cli import _sampling as common
from wmfast.cli._args import output_dir, positive_int


def add_arguments(p):
    common.add_model_arguments(p)
    p.add_argument("--index", type=int, default=0, help="which sample of the split to predict")
    p.add_argument("--ensemble", type=positive_int, default=8, help="ensemble size N")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps (model evaluations)")
    p.add_argument("--solver", choices=common.SOLVERS, default="euler",
                   help="euler (default: first order, fused update) or unipc (Wan2.2's default sampler: 2nd-order "
                        "predictor-corrector on diffusers' schedule)")
    p.add_argument("--average", choices=("pixel", "latent"), default="pixel",
                   help="pixel: decode every member then average (the team's way); latent: average the latents, "
                        "decode once (N-1 fewer VAE decodes). The PSNR of both is printed when pixel is chosen")
    p.add_argument("--strip", action="store_true", help="also write strip.png (context, members, mean, spread, truth)")
    p.add_argument("--cache-threshold", type=float, default=0.0, metavar="T",
                   help="step skipping (first-block cache): the schedule of skipped steps is calibrated on this sample "
                        "with one member at threshold T, then the ensemble runs with it (0, the default: off; "
                        "`wmfast eval-psnr --cache-threshold` measures PSNR and time against T)")
    p.add_argument("--decode-batch", type=positive_int, default=None, metavar="K",
                   help="members per VAE decode (default: all N at once, halved automatically when out of memory)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode each frame in 2x2 overlapping spatial tiles (less decode memory; changes the decoded "
                        "pixels: each tile is decoded on its own, then blended over the overlap)")
    p.add_argument("--profile", action="store_true",
                   help="print the time per phase (and the peak GPU memory on CUDA) and add the peaks to sample.json")
    p.add_argument("--out", required=True, help="output directory")


def run(args) -> int:
    return predict(args)


def predict(args) -> int:
    from wmfast.inference.ensemble import check_cache_threshold
    from wmfast.inference.predict import calibrate_sample_skips, predict_sample, set_vae_tiling
    from wmfast.metrics.psnr import psnr, to_uint8

    output_dir(args.out)
    check_cache_threshold(args.cache_threshold, "--cache-threshold")
    model = common.load_model(args)
    if args.vae_tiling:
        set_vae_tiling(model)
    dataset = common.open_split(args.data, args.split, model)
    if not 0 <= args.index < len(dataset):
        raise ValueError(f"--index {args.index}: the {args.split} split has {len(dataset)} samples")
    sample = common.load_sample(dataset, args.index)
    start = time.perf_counter()
    skip = calibrate_sample_skips(model, sample.context, sample.states,
                                  common.ensemble_config(args, 1, args.steps, args.solver), args.cache_threshold)
    calibration_s = time.perf_counter() - start if args.cache_threshold else 0.0
    cfg = common.ensemble_config(args, args.ensemble, args.steps, args.solver, skip)
    # Pixel averaging decodes every member anyway, so the latent mean costs one more decode: report both.
    modes = ("pixel", "latent") if args.average == "pixel" or args.strip else ("latent",)
    pred = predict_sample(model, sample.context, sample.states, cfg, modes, decode_batch=args.decode_batch,
                          track_memory=args.profile)
    frames = pred.frames
    chosen = frames.pixel_mean if args.average == "pixel" else frames.latent_mean
    os.makedirs(args.out, exist_ok=True)
    target_png = os.path.join(args.out, "frame76.png")
    common.save_png(to_uint8(chosen), target_png)
    report = {"ensemble": args.ensemble, "steps": args.steps, "solver": args.solver, "average": args.average,
              "index": args.index, "seed": args.seed, "prediction": target_png, "denoise_s": pred.denoise_s,
              "decode_batch": args.decode_batch, "vae_tiling": args.vae_tiling, "timings": pred.timings,
              "cache_threshold": args.cache_threshold, "skipped_steps": list(skip), "calibration_s": calibration_s}
    if pred.peak_memory:
        report["peak_memory_bytes"] = pred.peak_memory
    truth = sample.target
    for mode, frame in (("pixel", frames.pixel_mean), ("latent", frames.latent_mean)):
        if frame is not None:
            report[f"psnr_{mode}"] = psnr(to_uint8(frame), truth)
    if args.strip:
        from wmfast.cli.strip import save_strip, strip_title

        report["strip"] = save_strip(os.path.join(args.out, "strip.png"), sample.context[-1], frames, sample.target,
                                     title=strip_title(args.index, args.split, args.ensemble, args.steps, args.solver))
    with open(os.path.join(args.out, "sample.json"), "w") as f:
        json.dump(report, f, indent=2)
    scores = ", ".join(f"{m} averaging {report[f'psnr_{m}']:.2f} dB" for m in ("pixel", "latent")
                       if f"psnr_{m}" in report)
    skipped = f", {len(skip)} skipped after {calibration_s:.2f} s of calibration" if args.cache_threshold else ""
    print(f"wrote {target_png} (N={args.ensemble}, {args.steps} {args.solver} steps{skipped} in {pred.denoise_s:.2f} s, "
          f"{args.average} averaging); "
          f"PSNR vs ground truth: {scores}")
    if args.profile:
        print(profile_table(pred.timings, pred.peak_memory))
    return 0


def profile_table(timings: dict[str, float], peak_memory: dict[str, int] | None = None) -> str:
    """The --profile table: one row per phase (seconds, share of the total, peak GiB when measured), the time
    outside the phases (host work between them) and the total."""
    from wmfast.inference.predict import PHASES

    total = timings["total"]
    peaks = peak_memory or {}
    rows = [(name, timings[name], peaks.get(name)) for name in PHASES]
    rows.append(("other", max(0.0, total - sum(timings[name] for name in PHASES)), None))
    rows.append(("total", total, peaks.get("total")))
    head = "| phase | seconds | share |" + (" peak GiB |" if peaks else "")
    lines = [head, "|---|---|---|" + ("---|" if peaks else "")]
    for name, sec, peak in rows:
        line = f"| {name} | {sec:.3f} | {100 * sec / total if total > 0 else 0:.1f}% |"
        if peaks:
            line += " - |" if peak is None else f" {peak / 2**30:.2f} |"
        lines.append(line)
    if peaks:
        lines.append("peak GPU memory: torch.cuda.max_memory_allocated per phase (weights included)")
    return "\n".join(lines)
