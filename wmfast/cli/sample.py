"""Ensemble sampling with the Wan2.2 world model: N samples of the future as one batch, averaged.

Writes the predicted 77th frame (frame 76, 2 s after the last context frame) as a PNG, the PSNR of both
averagings against the ground truth, and with --strip a side-by-side strip: the last context frame, each
member, the ensemble mean, the per-pixel spread and the ground truth.

Quick start (random tiny model, no download, seconds on 2 CPU cores):
    wmfast data synth --raw --out /tmp/raw --shards 1 --frames 154 --size 64
    wmfast sample --model tiny --data /tmp/raw --ensemble 4 --steps 4 --strip --out /tmp/sample
"""
from __future__ import annotations

import json
import os
import sys

from wmfast.cli import _sampling as common


def add_arguments(p):
    common.add_model_arguments(p)
    p.add_argument("--index", type=int, default=0, help="which sample of the split to predict")
    p.add_argument("--ensemble", type=int, default=8, help="ensemble size N")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (model evaluations)")
    p.add_argument("--solver", choices=common.SOLVERS, default="euler",
                   help="euler (default: first order, fused update) or unipc (Wan2.2's default sampler: 2nd-order "
                        "predictor-corrector on diffusers' schedule)")
    p.add_argument("--average", choices=("pixel", "latent"), default="pixel",
                   help="pixel: decode every member then average (the team's way); latent: average the latents, "
                        "decode once (N-1 fewer VAE decodes). The PSNR of both is printed when pixel is chosen")
    p.add_argument("--strip", action="store_true", help="also write strip.png (context, members, mean, spread, truth)")
    p.add_argument("--out", required=True, help="output directory")


def run(args) -> int:
    try:
        return predict(args)
    except ValueError as e:  # user errors (paths, --lora, --index, data): one line, exit 2, as `wmfast train`
        print(f"wmfast sample: error: {e}", file=sys.stderr)
        return 2


def predict(args) -> int:
    from wmfast.inference.predict import predict_sample
    from wmfast.metrics.psnr import psnr, to_uint8

    model = common.load_model(args)
    dataset = common.open_split(args.data, args.split, model)
    if not 0 <= args.index < len(dataset):
        raise ValueError(f"--index {args.index}: the {args.split} split has {len(dataset)} samples")
    sample = common.load_sample(dataset, args.index)
    cfg = common.ensemble_config(args, args.ensemble, args.steps, args.solver)
    # Pixel averaging decodes every member anyway, so the latent mean costs one more decode: report both.
    modes = ("pixel", "latent") if args.average == "pixel" or args.strip else ("latent",)
    pred = predict_sample(model, sample.context, sample.states, cfg, modes)
    frames = pred.frames
    chosen = frames.pixel_mean if args.average == "pixel" else frames.latent_mean
    os.makedirs(args.out, exist_ok=True)
    target_png = os.path.join(args.out, "frame76.png")
    common.save_png(to_uint8(chosen), target_png)
    report = {"ensemble": args.ensemble, "steps": args.steps, "solver": args.solver, "average": args.average,
              "index": args.index, "seed": args.seed, "prediction": target_png, "denoise_s": pred.denoise_s}
    truth = sample.target
    for mode, frame in (("pixel", frames.pixel_mean), ("latent", frames.latent_mean)):
        if frame is not None:
            report[f"psnr_{mode}"] = psnr(to_uint8(frame), truth)
    if args.strip:
        report["strip"] = os.path.join(args.out, "strip.png")
        common.save_png(common.make_strip(sample.context[-1], frames, sample.target), report["strip"])
    with open(os.path.join(args.out, "sample.json"), "w") as f:
        json.dump(report, f, indent=2)
    scores = ", ".join(f"{m} averaging {report[f'psnr_{m}']:.2f} dB" for m in ("pixel", "latent")
                       if f"psnr_{m}" in report)
    print(f"wrote {target_png} (N={args.ensemble}, {args.steps} {args.solver} steps in {pred.denoise_s:.2f} s, "
          f"{args.average} averaging); "
          f"PSNR vs ground truth: {scores}")
    return 0
