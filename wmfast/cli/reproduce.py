"""`wmfast reproduce`: the seed's four findings, reproduced at small scale with trained models, on the CPU.

The findings (arXiv 2510.07092), each checked on synthetic data whose future is only partly determined by the
context and the states (`wmfast data synth --uncertain`), so that an ensemble has something to average:
  1. averaging an ensemble of N sampled futures raises the PSNR of frame 76 while the frame gets blurrier, and more
     N raises it further (sampling track: the tiny Wan2.2-architecture model, LoRA + state AdaLN-Zero trained by
     `wmfast train`, sampled by `wmfast eval-psnr`);
  2. more denoising steps raise PSNR (about +0.5 dB on the challenge's test set);
  3. the compression model, trained from scratch with teacher forcing, predicts the next token grids far better
     than copying the last grid, in CE and Top-500 CE (the tiny ST-Transformer, `wmfast train` + `wmfast generate`);
  4. factorized spatio-temporal attention costs about 20% of full attention's memory (T=5, S=1024) while learning
     as well (both attentions trained on the same data; attention memory measured).
Every stage runs the user-facing command (printed with its arguments), so the numbers are those a user gets.

Outputs under --out: reproduce.json (the settings), data/ (tokens, raw, latents), runs/ (the three training runs),
compression/ (generate reports), sampling/eval_psnr/ (psnr.csv), results.md (the table, each finding with its
verdict), results.json, ce_curves.png, psnr_vs_n.png, psnr_vs_steps.png. A second run in the same --out with the
same settings rewrites the data and resumes the finished training runs (nothing left to train); other settings
(--quick or not, --seed) are refused there. --quick: the same pipeline, small (about 2 minutes on 2 CPU cores).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Scale:
    tok_shards: int
    tok_frames: int
    tok_val_frames: int
    st_steps: int
    raw_shards: int
    raw_frames: int
    raw_val_frames: int
    lora_steps: int
    eval_samples: int
    ensemble: tuple[int, ...]
    steps: tuple[int, ...]
    solvers: tuple[str, ...]


FULL = Scale(tok_shards=16, tok_frames=4080, tok_val_frames=4080, st_steps=1500, raw_shards=4, raw_frames=1232,
             raw_val_frames=1232, lora_steps=2000, eval_samples=8, ensemble=(1, 2, 4, 8, 16), steps=(2, 4, 8, 16, 32),
             solvers=("euler", "unipc"))
QUICK = Scale(tok_shards=16, tok_frames=2040, tok_val_frames=4080, st_steps=300, raw_shards=1, raw_frames=616,
              raw_val_frames=231, lora_steps=100, eval_samples=2, ensemble=(1, 2, 4, 8, 16), steps=(2, 8),
              solvers=("euler",))
TINY_GRID, TINY_VOCAB, RAW_SIZE = 8, 512, 64


def add_arguments(p):
    p.add_argument("--out", default="wmfast_reproduce", help="directory for every output")
    p.add_argument("--quick", action="store_true", help="the same pipeline, small: about 2 minutes on 2 CPU cores")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the training runs")


def _cli(argv: list[str]) -> None:
    from wmfast.cli import main
    from wmfast.cli.demo import StageFailed

    print("$ wmfast " + " ".join(argv), flush=True)
    code = main(argv)
    if code:
        print(f"wmfast reproduce: `wmfast {' '.join(argv)}` exited with {code}", flush=True)
        raise StageFailed(code)


def _train(argv: list[str]) -> None:
    """`wmfast train ARGV`, resuming the run when an earlier reproduce in the same --out left a checkpoint (the
    settings were checked equal by `_check_settings`)."""
    from wmfast.cli.demo import _resuming

    _cli(_resuming(argv, "reproduce"))


def _check_settings(out: str, settings: dict) -> None:
    """--out is new, or holds a reproduce run of the same settings (its training runs are resumed, not mixed with
    other data or step counts); records the settings in OUT/reproduce.json."""
    path = os.path.join(out, "reproduce.json")
    settings = json.loads(json.dumps(settings))  # as read back (tuples become lists)
    if os.path.exists(path):
        try:
            with open(path) as f:
                earlier = json.load(f)
        except (OSError, ValueError):
            earlier = None
        if earlier != settings:
            raise ValueError(f"--out {out} holds a reproduce run with other settings ({path}: {earlier}, this run: "
                             f"{settings}); its training runs would be resumed on other data: use another --out or "
                             "delete it")
    with open(path, "w") as f:
        json.dump(settings, f)


def _paths(out: str) -> dict[str, str]:
    j = os.path.join
    return {"tokens": j(out, "data", "tokens"), "raw": j(out, "data", "raw"), "latents": j(out, "data", "latents"),
            "lora": j(out, "runs", "lora"), "compression": j(out, "compression"),
            "eval_psnr": j(out, "sampling", "eval_psnr"),
            **{f"st_{v}": j(out, "runs", f"st_{v}") for v in ("factorized", "full")}}


def _data(p: dict, s: Scale, seed: int) -> None:
    _cli(["data", "synth", "--uncertain", "--out", p["tokens"], "--shards", str(s.tok_shards), "--frames",
          str(s.tok_frames), "--val-frames", str(s.tok_val_frames), "--grid-size", str(TINY_GRID), "--vocab-size",
          str(TINY_VOCAB), "--seed", str(seed)])
    _cli(["data", "synth", "--raw", "--uncertain", "--out", p["raw"], "--shards", str(s.raw_shards), "--frames",
          str(s.raw_frames), "--val-frames", str(s.raw_val_frames), "--size", str(RAW_SIZE), "--seed", str(seed)])
    _cli(["data", "encode", "--data", p["raw"], "--out", p["latents"], "--model", "tiny", "--device", "cpu"])


def _compression(p: dict, s: Scale, seed: int) -> dict:
    from wmfast.cli._repro_compression import VARIANTS, evaluate

    generated = {}
    for variant, preset in VARIANTS.items():
        run_dir = p[f"st_{variant}"]
        _train(["train", "--config", "tiny", "--model", preset, "--data", p["tokens"], "--out", run_dir, "--steps",
                str(s.st_steps), "--warmup", str(max(1, s.st_steps // 20)),
                "--val-every", str(max(1, s.st_steps // 12)),
                "--ckpt-every", str(s.st_steps), "--log-every", str(max(1, s.st_steps // 100)), "--seed", str(seed)])
        generated[variant] = os.path.join(p["compression"], f"generate_{variant}.json")
        os.makedirs(p["compression"], exist_ok=True)
        no_cache = ["--no-cache"] if variant == "full" else []  # the temporal KV cache is factorized attention's
        _cli(["generate", "--data", p["tokens"], "--checkpoint", run_dir, "--samples", "100000", "--json",
              generated[variant], *no_cache])
    runs = {v: p[f"st_{v}"] for v in VARIANTS}
    return evaluate(p["tokens"], generated, runs, vocab_size=TINY_VOCAB, grid_size=TINY_GRID, k=500)


def _sampling(p: dict, s: Scale, seed: int) -> dict:
    from types import SimpleNamespace

    from wmfast.cli._repro_sampling import read_rows, references
    from wmfast.cli._sampling import load_model

    _train(["train", "--config", "tiny-sampling", "--data", p["latents"], "--out", p["lora"], "--steps",
            str(s.lora_steps), "--global-batch", "8", "--micro-batch", "8", "--ckpt-every", str(s.lora_steps),
            "--log-every", str(max(1, s.lora_steps // 100)), "--seed", str(seed)])
    _cli(["eval-psnr", "--model", "tiny", "--lora", p["lora"], "--data", p["raw"], "--split", "val",
          "--ensemble", ",".join(map(str, s.ensemble)), "--steps", ",".join(map(str, s.steps)),
          "--solver", ",".join(s.solvers), "--limit", str(s.eval_samples), "--device", "cpu", "--no-progress",
          "--out", p["eval_psnr"]])
    model = load_model(SimpleNamespace(model="tiny", lora=p["lora"], device="cpu", fp8=False, compile=False))
    refs = references(p["raw"], "val", model, s.eval_samples)
    return {"rows": read_rows(os.path.join(p["eval_psnr"], "psnr.csv")), "references": refs}


def run(args) -> int:
    from wmfast.cli._args import output_dir
    from wmfast.cli._repro_report import write_report
    from wmfast.cli.demo import StageFailed

    out = output_dir(args.out)
    os.makedirs(out, exist_ok=True)
    scale = QUICK if args.quick else FULL
    _check_settings(out, {"scale": "quick" if args.quick else "full", "seed": args.seed, **asdict(scale)})
    p = _paths(out)
    t0 = time.perf_counter()
    seconds = {}
    try:
        for name, stage in (("data", _data), ("compression", _compression), ("sampling", _sampling)):
            print(f"\n=== {name} ===", flush=True)
            start = time.perf_counter()
            result = stage(p, scale, args.seed)
            seconds[name] = time.perf_counter() - start
            if name == "compression":
                compression = result
            elif name == "sampling":
                sampling = result
    except StageFailed as e:
        return e.code
    results = {"scale": "quick" if args.quick else "full", "settings": asdict(scale), "seed": args.seed,
               "seconds": seconds, "compression": compression, "sampling": sampling}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(write_report(results, out))
    print(f"\nwmfast reproduce: done in {time.perf_counter() - t0:.0f} s; results.md and plots under "
          f"{os.path.abspath(out)}")
    return 0
