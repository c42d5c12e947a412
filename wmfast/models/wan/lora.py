"""LoRA post-training of the Wan world model with peft, saved in diffusers' LoRA format.

- rank 32 on every DiT linear layer: self- and cross-attention `to_q, to_k, to_v, to_out.0` and both FFN
  layers `ffn.net.0.proj, ffn.net.2`; everything else of the base frozen.
- the state embedder and the per-block state projections are `modules_to_save`: fully trainable, and
  saved inside the adapter file.
- saving goes through diffusers' `save_lora_weights` WITH the adapter metadata (else alpha is lost and a
  reload assumes alpha = r), to `<dir>/pytorch_lora_weights.safetensors`; loading passes the directory and
  `weight_name=` (passing the file path drops the metadata).
- the file loads into a fresh WmWanTransformer (LoRA + state modules) and into a plain diffusers
  WanTransformer3DModel / pipeline transformer (LoRA only; the state keys have no module there and are
  ignored by peft with a warning).
- ZeRO-3: parameters are partitioned (empty [0] tensors on every rank) unless gathered, so the adapter is
  gathered with deepspeed.zero.GatheredParameters before its state dict is taken.
"""
from __future__ import annotations

import contextlib
import os

import torch
from peft import LoraConfig, get_peft_model_state_dict

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
STATE_MODULES = ["state_embedder", "state_proj"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_config(rank: int = 32, alpha: float | None = None, state_modules: bool = True) -> LoraConfig:
    """peft config of the 1x-sampling recipe (alpha defaults to the rank: scale 1)."""
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(LORA_TARGETS),
                      modules_to_save=list(STATE_MODULES) if state_modules else None, init_lora_weights=True)


def add_lora(transformer, rank: int = 32, alpha: float | None = None, adapter_name: str = "default"):
    """Injects the adapter in place; returns the list of trainable parameters (LoRA + state modules)."""
    transformer.add_adapter(lora_config(rank, alpha), adapter_name=adapter_name)
    return [p for p in transformer.parameters() if p.requires_grad]


def _zero3_params(module):
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def adapter_state_dict(transformer, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors (LoRA A/B + state modules), full-size on every rank even under ZeRO-3."""
    name = adapter_name or _active_adapter(transformer)
    params = _zero3_params(transformer)
    ctx = contextlib.nullcontext()
    if params:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with ctx:
        sd = get_peft_model_state_dict(transformer, adapter_name=name)
        sd = {k: v.detach().clone().cpu() for k, v in sd.items()}
    empty = [k for k, v in sd.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"adapter_state_dict: {len(empty)} empty tensors (e.g. {empty[0]}): partitioned "
                           "parameters were not gathered")
    return sd


def _active_adapter(transformer) -> str:
    names = list(getattr(transformer, "peft_config", {}))
    if not names:
        raise ValueError("the transformer has no LoRA adapter (call add_lora first)")
    return names[0] if len(names) == 1 else transformer.active_adapters()[0]


def save_lora(transformer, directory: str, adapter_name: str | None = None, is_main_process: bool = True) -> str:
    """Writes `<directory>/pytorch_lora_weights.safetensors` (diffusers LoRA format, keys `transformer.*`,
    adapter metadata with rank and alpha). Every rank must call it under ZeRO-3 (the gather is collective);
    only `is_main_process` writes. Returns the file path."""
    from diffusers import WanPipeline

    name = adapter_name or _active_adapter(transformer)
    sd = adapter_state_dict(transformer, name)
    if is_main_process:
        os.makedirs(directory, exist_ok=True)
        WanPipeline.save_lora_weights(directory, transformer_lora_layers=sd, weight_name=WEIGHT_NAME,
                                      transformer_lora_adapter_metadata=transformer.peft_config[name].to_dict())
    return os.path.join(directory, WEIGHT_NAME)


def load_lora(transformer, directory: str, adapter_name: str = "default") -> None:
    """Loads a saved adapter (rank, alpha, state modules) into a WmWanTransformer or a plain diffusers
    WanTransformer3DModel (LoRA only), and activates it."""
    if not os.path.isfile(os.path.join(directory, WEIGHT_NAME)):
        raise FileNotFoundError(f"load_lora: no {WEIGHT_NAME} in {directory}")
    transformer.load_lora_adapter(directory, weight_name=WEIGHT_NAME, prefix="transformer",
                                  adapter_name=adapter_name)
    transformer.set_adapters([adapter_name])


def export_adapter(checkpoint: str, out_dir: str, model: str = "tiny", rank: int = 32) -> str:
    """A `wmfast train` checkpoint directory (…/checkpoints/step_N, any ZeRO stage) -> the adapter file.

    DeepSpeed's ZeRO checkpoint holds fp32 master copies of exactly the trainable parameters (LoRA + state
    modules); they are consolidated on the CPU, loaded into a fresh model with the adapter and saved."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from wmfast.models.wan.model import build_world_model

    root, tag = os.path.split(os.path.abspath(checkpoint).rstrip("/"))
    sd = get_fp32_state_dict_from_zero_checkpoint(root, tag)
    preset = "tiny" if model == "tiny" else "ti2v-5b"
    world = build_world_model(preset, None if model in ("tiny", "ti2v-5b") else model, vae=False)
    add_lora(world.transformer, rank=rank)
    trainable = {n for n, p in world.named_parameters() if p.requires_grad}
    missing = trainable - set(sd)
    if missing:
        raise ValueError(f"export_adapter: {checkpoint} lacks {len(missing)} adapter tensors (e.g. {min(missing)})")
    world.load_state_dict({k: v for k, v in sd.items() if k in trainable}, strict=False)
    return save_lora(world.transformer, out_dir)
