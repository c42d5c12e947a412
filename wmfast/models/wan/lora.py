"""LoRA post-training of the Wan world model with peft, and the adapter directory it is shared as.

- rank 32 on every DiT linear layer: self- and cross-attention `to_q, to_k, to_v, to_out.0` and both FFN
  layers `ffn.net.0.proj, ffn.net.2`; the state embedder and the per-block state projections (AdaLN-Zero)
  are trained in full as plain modules; everything else of the base is frozen.
- An adapter directory holds the LoRA twice, once for each public loader, and the state modules apart:
    pytorch_lora_weights.safetensors   diffusers' LoRA format (keys `transformer.*`, the LoRA config with
                                       rank and alpha in the file's metadata): `WanPipeline.load_lora_weights
                                       (dir)`
    pytorch_lora_weights.bin           the same, for `transformer.load_lora_adapter(dir)` with default arguments
                                       (it reads only this name); no metadata there, so alpha / r is folded
                                       into lora_B
    adapter_config.json, adapter_model.safetensors   peft's format: `PeftModel.from_pretrained(model, dir)`
    wmfast_state.safetensors           the state embedder and state projections (plain module names);
                                       only wmfast has the modules, so only wmfast loads them
    wmfast_adapter.json                what the adapter was trained on (preset, weights, rank, step)
  The LoRA files hold LoRA tensors only: a stock diffusers loader refuses a file with other keys, and
  loading the file path instead of the directory drops the metadata (a reload would assume alpha = r).
- ZeRO-3: parameters are partitioned (empty [0] tensors on every rank) unless gathered, so the adapter's
  parameters (only those: never the frozen base) are gathered with deepspeed.zero.GatheredParameters first.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
from peft import LoraConfig, get_peft_model_state_dict

from wmfast.data.checkpoints import TRAINER_STATE, latest_checkpoint

logger = logging.getLogger("wmfast")

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
WEIGHT_NAME, PICKLED_WEIGHT_NAME = "pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
STATE_WEIGHTS = "wmfast_state.safetensors"
ADAPTER_INFO = "wmfast_adapter.json"
ADAPTER_DIR = "adapter"  # the adapter's directory inside a checkpoint and inside a run directory


def lora_config(rank: int = 32, alpha: float | None = None) -> LoraConfig:
    """peft config of the 1x-sampling recipe (alpha defaults to the rank: scale 1)."""
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(LORA_TARGETS),
                      init_lora_weights=True)


def is_state_parameter(name: str) -> bool:
    return name.startswith("state_embedder.") or ".state_proj." in name


def add_lora(transformer, rank: int = 32, alpha: float | None = None, adapter_name: str = "default"):
    """Injects the adapter in place and makes the state modules trainable; returns the trainable parameters."""
    transformer.add_adapter(lora_config(rank, alpha), adapter_name=adapter_name)  # freezes everything else
    for name, p in transformer.named_parameters():
        if is_state_parameter(name):
            p.requires_grad_(True)
    return [p for p in transformer.parameters() if p.requires_grad]


def _gathered(params):
    """Partitioned ZeRO-3 parameters gathered in full on every rank (a collective); others as they are."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def adapter_state_dicts(transformer, adapter_name: str | None = None, keep: bool = True) -> tuple[dict, dict]:
    """(LoRA tensors keyed like peft's `blocks.0.attn1.to_q.lora_A.weight`, state-module tensors keyed by their
    module names), on the CPU and full-size even under ZeRO-3, in the module's dtype (bf16 when DeepSpeed trains
    in bf16; export_adapter reads the fp32 master copies). keep=False: take part in the gather, copy nothing."""
    name = adapter_name or _active_adapter(transformer)
    adapter = [p for n, p in transformer.named_parameters() if "lora_" in n or is_state_parameter(n)]
    with _gathered(adapter):
        if not keep:
            return {}, {}
        lora = {k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(transformer, adapter_name=name)
                .items()}
        state = {n: p.detach().clone().cpu() for n, p in transformer.named_parameters() if is_state_parameter(n)}
    empty = [k for k, v in {**lora, **state}.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"adapter_state_dicts: {len(empty)} empty tensors (e.g. {empty[0]}): partitioned "
                           "parameters were not gathered")
    return lora, state


def _active_adapter(transformer) -> str:
    names = list(getattr(transformer, "peft_config", {}))
    if not names:
        raise ValueError("the transformer has no LoRA adapter (call add_lora first)")
    return names[0] if len(names) == 1 else transformer.active_adapters()[0]


def save_lora(transformer, directory: str, adapter_name: str | None = None, is_main_process: bool = True,
              info: dict | None = None) -> str:
    """Writes the adapter directory (module docstring); `info` goes into wmfast_adapter.json. Every rank must call
    it under ZeRO-3 (the gather is collective); only `is_main_process` writes. Returns the directory."""
    name = adapter_name or _active_adapter(transformer)
    lora, state = adapter_state_dicts(transformer, name, keep=is_main_process)
    if is_main_process:
        write_adapter(directory, lora, state, transformer.peft_config[name], info)
    return directory


def write_adapter(directory: str, lora: dict, state: dict, config: LoraConfig, info: dict | None = None) -> None:
    """The files of an adapter directory (module docstring) from its tensors: `lora` keyed like peft's state dict
    (`blocks.0.attn1.to_q.lora_A.weight`), `state` by module name."""
    from diffusers import WanPipeline
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    WanPipeline.save_lora_weights(directory, transformer_lora_layers=lora, weight_name=WEIGHT_NAME,
                                  transformer_lora_adapter_metadata=config.to_dict())
    # transformer.load_lora_adapter(dir) with default arguments reads only pytorch_lora_weights.bin, which has no
    # metadata (alpha = r is assumed): that copy carries the scale alpha / r inside lora_B.
    scale = config.lora_alpha / config.r
    torch.save({f"transformer.{k}": v * scale if "lora_B" in k else v for k, v in lora.items()},
               os.path.join(directory, PICKLED_WEIGHT_NAME))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in lora.items()},
              os.path.join(directory, PEFT_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(directory)
    if state:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, STATE_WEIGHTS))
    with open(os.path.join(directory, ADAPTER_INFO), "w") as f:
        json.dump({"rank": config.r, "alpha": config.lora_alpha, "state_modules": sorted(state), **(info or {})},
                  f, indent=1)


def resolve_adapter_dir(path: str) -> str:
    """The adapter directory meant by `path`: an adapter directory, a checkpoint directory (its adapter/), or a
    `wmfast train` run directory (the newest complete checkpoint's adapter/, else the run's adapter/)."""
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file; pass the adapter directory (the one holding {WEIGHT_NAME}), a "
                         "checkpoint directory or a run directory")
    candidates = [path, os.path.join(path, ADAPTER_DIR)]
    newest = latest_checkpoint(os.path.join(path, "checkpoints"))
    if newest is not None:
        candidates.insert(1, os.path.join(newest[1], ADAPTER_DIR))
    for c in candidates:
        if os.path.isfile(os.path.join(c, WEIGHT_NAME)):
            return c
    hint = ""
    if newest is not None or os.path.isfile(os.path.join(path, TRAINER_STATE)):
        hint = (": a checkpoint written before training saved adapters; export one with "
                "wmfast.models.wan.lora.export_adapter(CHECKPOINT_DIR, OUT_DIR)")
    raise ValueError(f"{path} holds no LoRA adapter (looked for {WEIGHT_NAME} in {', '.join(candidates)}){hint}")


def read_adapter_info(directory: str) -> dict:
    path = os.path.join(directory, ADAPTER_INFO)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_lora(transformer, path: str, adapter_name: str = "default") -> str:
    """Loads an adapter (rank, alpha, and the state modules when the transformer has them) into a
    WmWanTransformer, or its LoRA into a plain diffusers WanTransformer3DModel, and activates it. `path`: see
    resolve_adapter_dir. Returns the adapter directory it loaded."""
    directory = resolve_adapter_dir(path)
    transformer.load_lora_adapter(directory, weight_name=WEIGHT_NAME, prefix="transformer",
                                  adapter_name=adapter_name)
    transformer.set_adapters([adapter_name])
    has_state = hasattr(transformer, "state_embedder")
    state_file = os.path.join(directory, STATE_WEIGHTS)
    if has_state and os.path.isfile(state_file):
        _load_state_modules(transformer, state_file)
    elif has_state:
        logger.warning("wmfast: %s has no %s: the LoRA is loaded but the robot states do not condition the model "
                       "(its state modules stay at their zero initialisation)", directory, STATE_WEIGHTS)
    return directory


def _load_state_modules(transformer, state_file: str) -> None:
    from safetensors.torch import load_file

    state = load_file(state_file)
    params = dict(transformer.named_parameters())
    expected = {n for n in params if is_state_parameter(n)}
    if set(state) != expected:
        raise ValueError(f"{state_file}: state modules {sorted(set(state) ^ expected)[:3]} do not match this model "
                         "(another preset or state width?)")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{state_file}: {name} has shape {tuple(value.shape)}, the model "
                                 f"{tuple(params[name].shape)} (another preset?)")
            params[name].copy_(value)


def export_adapter(checkpoint: str, out_dir: str) -> str:
    """A `wmfast train` checkpoint directory (…/checkpoints/step_N, any ZeRO stage) -> an adapter directory of its
    fp32 master weights, for checkpoints written without one or when the run trained in bf16.

    DeepSpeed's ZeRO checkpoint holds fp32 master copies of exactly the trainable parameters (LoRA + state
    modules); they are consolidated on the CPU and written with the rank and preset of the run's
    trainer_state.json. No model is built."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state_file = os.path.join(checkpoint, TRAINER_STATE)
    if not os.path.isfile(state_file):
        raise ValueError(f"{checkpoint} is not a complete `wmfast train` checkpoint (no {TRAINER_STATE})")
    with open(state_file) as f:
        trainer_state = json.load(f)
    model = trainer_state.get("model_config", {})
    if "lora_rank" not in model:
        raise ValueError(f"{checkpoint} is not a checkpoint of the sampling task (no LoRA rank in {TRAINER_STATE})")
    root, tag = os.path.split(os.path.abspath(checkpoint).rstrip("/"))
    sd = get_fp32_state_dict_from_zero_checkpoint(root, tag)
    # module names (transformer.blocks.0.attn1.to_q.lora_A.default.weight) -> peft state-dict keys
    lora = {k.removeprefix("transformer.").replace(".default.", "."): v for k, v in sd.items() if ".lora_" in k}
    state = {k.removeprefix("transformer."): v for k, v in sd.items()
             if is_state_parameter(k.removeprefix("transformer."))}
    if not lora or not state:
        raise ValueError(f"export_adapter: {checkpoint} holds no LoRA or no state-module tensors")
    info = {"preset": model.get("preset"), "pretrained": model.get("pretrained"), "step": trainer_state.get("step"),
            "source": os.path.abspath(checkpoint), "dtype": "float32"}
    write_adapter(out_dir, lora, state, lora_config(model["lora_rank"]), info)
    return out_dir
