"""Greedy generation with the ST-Transformer on samples of a tokenized 1X dataset: from the 3 context grids
and the states, generate the 3 future grids and score them against the ground truth (teacher-forced full and
Top-500 cross-entropy, the challenge's metric; greedy token accuracy; latency), in one or more precisions
(`--dtype fp32,tf32,bf16`: each also reports how many greedy tokens agree with fp32's)."""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

from wmfast.cli._args import blame, check_device, device_name, output_file, positive_int

logger = logging.getLogger("wmfast")

PRECISIONS = ("fp32", "tf32", "bf16")  # wmfast.inference.PRECISIONS, without importing torch for --help


def _precisions(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of distinct "
                                         f"{', '.join(PRECISIONS)}")
    return sorted(names, key=PRECISIONS.index)  # fp32 first: the others are compared with it


def add_arguments(p):
    p.add_argument("--data", required=True, help="tokenized dataset root (train_v2.0/, val_v2.0/) or split dir")
    p.add_argument("--split", default="val", help="split to draw samples from ('' = DATA is the split dir)")
    p.add_argument("--checkpoint", default=None, help="training checkpoint dir, .pt or .safetensors")
    p.add_argument("--preset", default="1x-compression",
                   help="model preset (random weights without --checkpoint; the config if the checkpoint has none)")
    p.add_argument("--samples", type=positive_int, default=4, help="samples to score, evenly spaced over the split")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--no-cache", action="store_true", help="recompute every frame each step (the reference)")
    p.add_argument("--dtype", type=_precisions, default=["fp32"], metavar="fp32[,tf32,bf16]",
                   help="precision(s) to decode in: fp32 (full-precision matmuls), tf32, bf16 (a bf16 copy of the "
                        "weights); with several, each reports its greedy-token agreement with fp32")
    p.add_argument("--graph", action="store_true",
                   help="replay the whole rollout as one CUDA graph (captured at the first batch; GPU only)")
    p.add_argument("--top-k", type=positive_int, default=500, help="k of the top-k cross-entropy")
    p.add_argument("--device", type=device_name, default="auto", help="cuda, cpu, or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (no --checkpoint)")
    p.add_argument("--json", default=None, help="also write the summary to this JSON file")


def _model(args, torch):
    from wmfast.models import STTransformer, STTransformerConfig, describe, load_checkpoint

    if args.checkpoint:
        with blame("--checkpoint", args.checkpoint):
            model = load_checkpoint(args.checkpoint, preset=args.preset)
    else:
        torch.manual_seed(args.seed)
        with blame("--preset", args.preset):
            model = STTransformer(STTransformerConfig.from_name(args.preset))
        model.preset_name = args.preset
        logger.info("no --checkpoint: random weights (the numbers below are those of an untrained model)")
    logger.info(describe(model.config))
    return model


def teacher_forced_scores(model, tokens, states, k: int, *, rows: int = 1024) -> dict:
    """Sums over the future tokens of full CE, top-k CE and argmax hits, teacher forced. The logits are made
    `rows` tokens at a time from the hidden states, so no [B, 3, S, V] tensor exists."""
    import torch

    from wmfast.metrics import token_cross_entropy, token_topk_cross_entropy

    c = model.config
    h = model.hidden(tokens[:, : c.num_frames], states)[:, c.context_frames - 1:]  # [B, 3, S, D]
    h, target = h.reshape(-1, h.shape[-1]), tokens[:, c.context_frames:].reshape(-1)
    out = {"ce": 0.0, "topk_ce": 0.0, "tf_correct": 0}
    for i in range(0, h.shape[0], rows):
        logits, y = model.logits(h[i: i + rows]), target[i: i + rows]
        out["ce"] += token_cross_entropy(logits, y).sum()
        out["topk_ce"] += token_topk_cross_entropy(logits, y, k).sum()
        out["tf_correct"] += (logits.argmax(-1) == y).sum()
    return {key: torch.as_tensor(v).double() for key, v in out.items()}


def _decode(model, args, precision, tokens, states, torch, generators) -> tuple:
    """(generated ids [B, 3, S], seconds, the Generator, whether it was made for this call) through this
    precision's Generator for the batch size."""
    from wmfast.inference import Generator

    B = tokens.shape[0]
    new = (precision, B) not in generators
    if new:
        generators[precision, B] = Generator(model, B, precision=precision, use_cache=not args.no_cache,
                                             graph=args.graph)
    gen = generators[precision, B]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = gen(tokens[:, : model.config.context_frames], states)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return out.reshape(B, out.shape[1], -1), time.perf_counter() - t0, gen, new


def _summary(c, n, per: dict, k: int) -> dict:
    n_tok, per_frame = per["tokens"], per["tokens"] / c.future_frames
    times = per["seconds"] or per["setup"]  # calls of a Generator made earlier; else only first calls were timed
    out = {"cross_entropy": float(per["ce"]) / n_tok, f"top{k}_cross_entropy": float(per["topk_ce"]) / n_tok,
           "teacher_forced_accuracy": float(per["tf_correct"]) / n_tok,
           "greedy_accuracy_per_frame": [round(float(x) / per_frame, 4) for x in per["gen_correct"]],
           "ms_per_generation": 1e3 * statistics.median(times),
           "ms_per_generation_p90": 1e3 * statistics.quantiles(times, n=10)[-1] if len(times) > 1 else 1e3 * times[0],
           "ms_first_generation": 1e3 * per["setup"][0], "timed_calls": len(per["seconds"])}
    if "agree" in per:
        out["greedy_agreement_with_fp32"] = round(float(per["agree"]) / n_tok, 4)
    return out


def _print_table(results: dict, k: int) -> None:
    print(f"{'precision':<10}{'CE':>8}{f'top{k} CE':>11}{'tf acc':>8}  {'greedy acc per grid':<24}{'agree fp32':>11}"
          f"{'ms median':>11}{'ms p90':>9}{'ms first':>10}")
    for p, r in results.items():
        agree = r.get("greedy_agreement_with_fp32")
        print(f"{p:<10}{r['cross_entropy']:8.4f}{r[f'top{k}_cross_entropy']:11.4f}{r['teacher_forced_accuracy']:8.4f}  "
              f"{r['greedy_accuracy_per_frame']!s:<24}{'-' if agree is None else f'{agree:.4f}':>11}"
              f"{r['ms_per_generation']:11.2f}{r['ms_per_generation_p90']:9.2f}{r['ms_first_generation']:10.2f}")


def run(args) -> int:
    import torch

    from wmfast.data import TokenizedDataset
    from wmfast.inference import precision_scope
    from wmfast.metrics.baselines import copy_last_hits

    args.device = check_device(args.device)
    if args.json:
        output_file(args.json, "--json")
    if args.graph and not args.device.startswith("cuda"):
        raise ValueError(f"--graph needs a CUDA device (--device {args.device})")
    model = _model(args, torch).to(args.device).float().eval()
    c = model.config
    with blame("--data", args.data):
        ds = TokenizedDataset(args.data, args.split or None, vocab_size=c.vocab_size)
    source = f"--checkpoint {args.checkpoint}" if args.checkpoint else f"--preset {args.preset}"
    if ds.grid_size != c.grid_size:
        raise ValueError(f"--data {ds.dir}: grids are {ds.grid_size}x{ds.grid_size} but the model of {source} takes "
                         f"{c.grid_size}x{c.grid_size}")
    n = min(args.samples, len(ds))
    if n < 1:
        raise ValueError(f"--data {ds.dir}: the split has no samples")
    indices = [round(i * (len(ds) - 1) / max(n - 1, 1)) for i in range(n)]
    k = min(args.top_k, c.vocab_size)
    per = {p: {"ce": 0, "topk_ce": 0, "tf_correct": 0, "gen_correct": 0, "seconds": [], "setup": [], "tokens": 0}
           for p in args.dtype}
    generators: dict = {}
    copy_correct = 0  # the copy-last-grid baseline's hits per future grid
    with torch.no_grad():
        for i in range(0, n, args.batch_size):
            batch = torch.utils.data.default_collate([ds[j] for j in indices[i: i + args.batch_size]])
            tokens, states = batch["tokens"].to(args.device), batch["states"].to(args.device)
            B = tokens.shape[0]
            target = tokens[:, c.context_frames:].reshape(B, c.future_frames, -1)
            copy_correct = copy_correct + copy_last_hits(tokens, c.context_frames).sum(dim=(0, 2))
            reference = None
            for p in args.dtype:
                gen, seconds, generator, new = _decode(model, args, p, tokens, states, torch, generators)
                with precision_scope(p):
                    scores = teacher_forced_scores(generator.model, tokens, states, k)
                acc = per[p]
                for key, value in scores.items():
                    acc[key] += value
                acc["setup" if new else "seconds"].append(seconds)  # a first call includes the set-up
                acc["tokens"] += target.numel()
                acc["gen_correct"] += (gen == target).sum(dim=(0, 2))  # per future frame
                if p == "fp32":
                    reference = gen
                elif reference is not None:
                    acc["agree"] = acc.get("agree", 0) + (gen == reference).sum()
    results = {p: _summary(c, n, per[p], k) for p in args.dtype}
    per_frame = per[args.dtype[0]]["tokens"] / c.future_frames
    summary = {"samples": n, "split_dir": ds.dir, "checkpoint": args.checkpoint,
               "preset": getattr(model, "preset_name", None) or "(from the checkpoint's config)",
               "batch_size": args.batch_size, "use_cache": not args.no_cache, "graph": args.graph,
               "device": args.device}
    for key, value in results[args.dtype[0]].items():
        summary[key] = value
        if key == "greedy_accuracy_per_frame":  # its reference: every future grid predicted as the last context grid
            summary["copy_last_grid_accuracy_per_frame"] = [round(float(x) / per_frame, 4) for x in copy_correct]
    if len(args.dtype) > 1:
        summary["precisions"] = results
    for key, value in summary.items():
        if key != "precisions":
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if len(args.dtype) > 1:
        _print_table(results, k)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0
