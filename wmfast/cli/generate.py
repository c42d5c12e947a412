"""Greedy generation with the ST-Transformer on samples of a tokenized 1X dataset: from the 3 context grids
and the states, generate the 3 future grids and score them against the ground truth (teacher-forced full and
Top-500 cross-entropy, the challenge's metric; greedy token accuracy; latency)."""
from __future__ import annotations

import json
import logging
import time

logger = logging.getLogger("wmfast")


def add_arguments(p):
    p.add_argument("--data", required=True, help="tokenized dataset root (train_v2.0/, val_v2.0/) or split dir")
    p.add_argument("--split", default="val", help="split to draw samples from ('' = DATA is the split dir)")
    p.add_argument("--checkpoint", default=None, help="training checkpoint dir, .pt or .safetensors")
    p.add_argument("--preset", default="1x-compression",
                   help="model preset (random weights without --checkpoint; the config if the checkpoint has none)")
    p.add_argument("--samples", type=int, default=4, help="samples to score, evenly spaced over the split")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--no-cache", action="store_true", help="recompute every frame each step (the reference)")
    p.add_argument("--compile", action="store_true", help="CUDA-graph the decode step (torch.compile)")
    p.add_argument("--top-k", type=int, default=500, help="k of the top-k cross-entropy")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (no --checkpoint)")
    p.add_argument("--json", default=None, help="also write the summary to this JSON file")


def _model(args, torch):
    from wmfast.models import STTransformer, STTransformerConfig, describe, load_checkpoint

    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, preset=args.preset)
    else:
        torch.manual_seed(args.seed)
        model = STTransformer(STTransformerConfig.from_name(args.preset))
        logger.info("no --checkpoint: random weights (the numbers below are those of an untrained model)")
    logger.info(describe(model.config))
    return model


def _score_batch(model, batch, args, torch, k: int) -> dict:
    from wmfast.metrics import token_cross_entropy, token_topk_cross_entropy

    c = model.config
    tokens, states = batch["tokens"].to(args.device), batch["states"].to(args.device)
    B, F = tokens.shape[0], c.future_frames
    target = tokens[:, c.context_frames:].reshape(B, F, -1)  # [B, 3, S]
    logits = model(tokens[:, : c.num_frames], states)[:, c.context_frames - 1:]  # teacher forced: [B, 3, S, V]
    out = {"ce": token_cross_entropy(logits, target).sum(), "topk_ce": token_topk_cross_entropy(logits, target, k).sum(),
           "tf_correct": (logits.argmax(-1) == target).sum(), "tokens": target.numel()}
    del logits
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    gen = model.generate(tokens[:, : c.context_frames], states, use_cache=not args.no_cache, compile_step=args.compile)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    out["seconds"] = time.perf_counter() - t0
    out["gen_correct"] = (gen.reshape(B, F, -1) == target).sum(dim=(0, 2))  # per future frame
    return out


def run(args) -> int:
    import torch

    from wmfast.data import TokenizedDataset

    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = _model(args, torch).to(args.device).eval()
    c = model.config
    ds = TokenizedDataset(args.data, args.split or None, vocab_size=c.vocab_size)
    if ds.grid_size != c.grid_size:
        raise ValueError(f"{ds.dir}: grids are {ds.grid_size}x{ds.grid_size} but the model takes "
                         f"{c.grid_size}x{c.grid_size} (preset {args.preset!r})")
    n = min(args.samples, len(ds))
    if n < 1:
        raise ValueError(f"{ds.dir}: no samples")
    indices = [round(i * (len(ds) - 1) / max(n - 1, 1)) for i in range(n)]
    k = min(args.top_k, c.vocab_size)
    totals: dict = {}
    with torch.no_grad():
        for i in range(0, n, args.batch_size):
            batch = torch.utils.data.default_collate([ds[j] for j in indices[i: i + args.batch_size]])
            for key, value in _score_batch(model, batch, args, torch, k).items():
                totals[key] = totals.get(key, 0) + value
    n_tok = totals["tokens"]
    per_frame = n_tok / c.future_frames
    summary = {
        "samples": n, "split_dir": ds.dir, "checkpoint": args.checkpoint, "preset": args.preset,
        "cross_entropy": float(totals["ce"]) / n_tok, f"top{k}_cross_entropy": float(totals["topk_ce"]) / n_tok,
        "teacher_forced_accuracy": float(totals["tf_correct"]) / n_tok,
        "greedy_accuracy_per_frame": [round(float(x) / per_frame, 4) for x in totals["gen_correct"]],
        "ms_per_generation": 1e3 * totals["seconds"] / -(-n // args.batch_size), "batch_size": args.batch_size,
        "use_cache": not args.no_cache, "device": args.device,
    }
    for key, value in summary.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0
