"""Shared by `wmfast sample` and `wmfast eval-psnr`: arguments, model loading, samples and PNGs."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from wmfast.cli._args import blame, check_device, device_name, positive_int

logger = logging.getLogger("wmfast")

# Spread maps use a fixed scale (std 0.25 of the [0, 1] range = full colour), so strips of different samples and
# ensemble sizes compare by eye; a per-image max would stretch noise into apparent certainty differences.
SPREAD_FULL_SCALE = 0.25
SOLVERS = ("euler", "unipc")  # wmfast.inference.solvers.SOLVERS (a test keeps them equal), without importing the
# sampler when a parser is built
TARGET_FRAME = 76  # the scored frame of a 77-frame sample (2 s after the last context frame)


def add_model_arguments(p):
    p.add_argument("--model", required=True,
                   help="a local Wan2.2-TI2V-5B diffusers directory, or 'tiny' (random tiny model, no download)")
    p.add_argument("--lora", default=None,
                   help="the LoRA adapter of a `wmfast train` sampling run: its run directory (newest checkpoint), a "
                        "checkpoint directory or an adapter directory (optional)")
    p.add_argument("--data", required=True, help="a 1X raw-format dataset (root or split directory)")
    p.add_argument("--split", default="val", help="split under --data (default: val)")
    p.add_argument("--max-batch", type=positive_int, default=None,
                   help="members per forward pass (default: all N, halved automatically when out of memory)")
    p.add_argument("--seed", type=int, default=0,
                   help="member i uses seed + i (the tiny model's base weights always use a fixed seed)")
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    p.add_argument("--no-graph", action="store_true", help="do not capture the denoising step in a CUDA graph")
    p.add_argument("--fp8", action="store_true",
                   help="fp8 (e4m3, row-wise scales) weights for the GEMMs of the DiT blocks (GPUs of compute "
                        "capability 8.9+; faster with --compile, which fuses the activation quantization)")
    p.add_argument("--compile", action="store_true",
                   help="compile the DiT blocks with torch.compile (regional: one compiled graph serves every block; "
                        "the first prediction pays the compilation)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def device_of(args) -> torch.device:
    return torch.device(check_device(args.device))


def load_model(args):
    """The world model in eval mode: `tiny` builds a random tiny DiT (CPU-friendly, 64x64 frames) from the fixed
    TINY_BASE_SEED, the base `wmfast train` LoRA-trains (--seed only seeds the members: a LoRA trained at any seed
    samples on its own base) with the tiny VAE fitted to the synthetic frames; a directory loads the TI2V-5B weights
    in bf16 on a GPU (fp32 on the CPU). Nothing is downloaded."""
    from wmfast.models.wan import TINY_BASE_SEED, build_world_model

    adapter = _adapter_dir(args) if args.lora else None  # before the (possibly minutes-long) weight load
    device = device_of(args)
    if args.fp8:  # before the weight load too
        from wmfast.modules.fp8_linear import fp8_support

        if (reason := fp8_support(device)) is not None:
            raise ValueError(f"--fp8: {reason}")
    dtype = torch.bfloat16 if device.type == "cuda" and args.model != "tiny" else torch.float32
    if args.model == "tiny":
        model = build_world_model("tiny", device=device, dtype=dtype, base_seed=TINY_BASE_SEED)
    else:
        model = build_world_model("ti2v-5b", pretrained=args.model, device=device, dtype=dtype)
    if adapter:
        from wmfast.models.wan.lora import load_lora

        load_lora(model.transformer, adapter)
        model.transformer.to(device)  # the adapter loads on the CPU; dtypes stay as loaded (fp32 modules kept)
        logger.info(f"wmfast: LoRA adapter {adapter}")
    if args.fp8:  # after the adapter: its base layers are the ones quantized
        from wmfast.models.wan.fp8 import quantize_dit_fp8

        quantize_dit_fp8(model.transformer)
    if args.compile:
        model.transformer.compile_blocks()
    return model.eval()


def _adapter_dir(args) -> str:
    """The adapter directory --lora names, checked against --model (the preset it was trained on)."""
    from wmfast.models.wan.lora import read_adapter_info, resolve_adapter_dir

    try:
        directory = resolve_adapter_dir(args.lora)
    except ValueError as e:
        raise ValueError(f"--lora: {e}") from None
    trained_on = read_adapter_info(directory).get("preset")
    wanted = "tiny" if args.model == "tiny" else "ti2v-5b"
    if trained_on and trained_on != wanted:
        raise ValueError(f"--lora {args.lora}: the adapter was trained on the {trained_on} model, --model "
                         f"{args.model} is the {wanted} model")
    return directory


def ensemble_config(args, n: int, steps: int, solver: str = "euler", skip_steps: tuple[int, ...] = ()):
    """The EnsembleConfig of one run; `solver` is passed explicitly (eval-psnr's --solver is a list)."""
    from wmfast.inference.ensemble import EnsembleConfig

    return EnsembleConfig(n=n, steps=steps, seed=args.seed, max_batch=args.max_batch,
                          graph=False if args.no_graph else None, progress=not args.no_progress, solver=solver,
                          skip_steps=skip_steps)


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Sample:
    context: torch.Tensor  # [c, 3, H, W] uint8: the context frames the model encodes (model.schedule), oldest first
    states: torch.Tensor   # [77, 25] float32
    target: torch.Tensor   # [3, H, W] uint8: frame 76, the scored frame


def context_offsets(model) -> list[int]:
    """The context frames (30 Hz offsets in 0..16) the model's frame schedule encodes."""
    return list(model.schedule.frame_indices[: model.schedule.context_count])


def open_split(root: str, split: str, model):
    """The split as a RawVideoDataset that decodes only the context frames the model needs and frame 76,
    resized to the model's resolution while converting (the tiny preset runs at 64x64)."""
    from wmfast.data.raw import RawVideoDataset

    if os.path.isfile(os.path.join(root, "metadata.json")):  # --data names the split directory itself
        split = None
    size = (model.preset.height, model.preset.width)
    with blame("--data", root):
        return RawVideoDataset(root, split, frame_offsets=[*context_offsets(model), TARGET_FRAME], size=size)


def load_sample(dataset, index: int) -> Sample:
    item = dataset[index]
    frames = item["frames"]  # [c + 1, 3, H, W] uint8: the context frames, then frame 76
    return Sample(frames[:-1], item["states"].float(), frames[-1])


# ------------------------------------------------------------------------------------------------ images


def save_png(image: torch.Tensor, path: str) -> None:
    """image: [3, H, W] uint8."""
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path)
