"""Loading ST-Transformer weights: a `wmfast train` run or checkpoint directory (any ZeRO stage), a torch.save
file, or a .safetensors file; the wrapper prefixes of DDP, torch.compile and DeepSpeed are dropped."""
from __future__ import annotations

import json
import os

import torch

from wmfast.data.checkpoints import TRAINER_STATE, latest_checkpoint
from wmfast.models.st_transformer.config import STTransformerConfig
from wmfast.models.st_transformer.model import STTransformer

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


def _clean_state_dict(sd: dict) -> dict:
    """Drop the prefixes DDP / torch.compile / DeepSpeed and activation-checkpoint wrappers add to names."""
    out = {}
    for k, v in sd.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k.replace("_checkpoint_wrapped_module.", "")] = v
    return out


def _zero_stage(obj, trainer_state: dict) -> int:
    """The ZeRO stage a DeepSpeed checkpoint was written with: DeepSpeed stores the run's config in the model
    states file ("ds_config"); wmfast's trainer_state.json has it too (train_config.zero_stage)."""
    ds_config = obj.get("ds_config") if isinstance(obj, dict) else None
    if isinstance(ds_config, dict) and isinstance(ds_config.get("zero_optimization"), dict):
        return int(ds_config["zero_optimization"].get("stage", 0))
    return int((trainer_state.get("train_config") or {}).get("zero_stage", 0))


def _load_deepspeed_dir(path: str, map_location) -> tuple[dict | None, dict]:
    """(model config, fp32 weights) of a `wmfast train` checkpoint directory. Under ZeRO-3 the model states
    files hold only empty placeholders of the partitioned parameters (the run saves with
    stage3_gather_16bit_weights_on_model_save=False, which avoids gathering the model on one rank at every
    save): the weights are rebuilt from every rank's fp32 master partition by DeepSpeed's zero_to_fp32."""
    trainer_state = {}
    state_json = os.path.join(path, TRAINER_STATE)
    if os.path.isfile(state_json):
        with open(state_json) as f:
            trainer_state = json.load(f)
    # ZeRO-3 names its model states per data-parallel rank (zero_pp_rank_R_...): rank 0's carries the config
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    weights = next((os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))), None)
    if weights is None:
        raise ValueError(f"{path}: a checkpoint directory needs {' or '.join(names)}")
    obj = torch.load(weights, map_location=map_location, weights_only=False)
    config_dict = trainer_state.get("model_config") or (obj.get("config") if isinstance(obj, dict) else None)
    if _zero_stage(obj, trainer_state) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        parent, tag = os.path.split(os.path.abspath(path))
        return config_dict, get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)
    return config_dict, obj["module"] if isinstance(obj, dict) and isinstance(obj.get("module"), dict) else obj


def load_checkpoint(path: str, *, preset: str | None = None, map_location="cpu") -> STTransformer:
    """An STTransformer with the weights of `path`:
    - a `wmfast train` run directory (its newest complete checkpoint);
    - a training checkpoint directory (wmfast train: DeepSpeed's mp_rank_00_model_states.pt with the weights
      under "module", or, for ZeRO-3 (zero_pp_rank_*_model_states.pt files), the fp32 partitions of every rank's optimizer states, consolidated with
      deepspeed.utils.zero_to_fp32; trainer_state.json's "model_config" gives the config);
    - a torch.save file: {"model" | "module" | "state_dict": weights, optional "config": dict} or bare weights;
    - a .safetensors file of weights.
    The config comes from the checkpoint when it has one, else from `preset` (a ValueError if neither)."""
    config_dict, sd = None, None
    if os.path.isdir(os.path.join(path, "checkpoints")):  # a `wmfast train` run dir: its newest complete checkpoint
        found = latest_checkpoint(os.path.join(path, "checkpoints"))
        if found is None:
            raise ValueError(f"{path}: a run directory with no complete checkpoint under checkpoints/")
        path = found[1]
    if os.path.isdir(path):
        config_dict, sd = _load_deepspeed_dir(path, map_location)
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device=str(map_location))
    else:
        obj = torch.load(path, map_location=map_location, weights_only=False)
        for key in ("model", "module", "state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                config_dict = obj.get("config")
                sd = obj[key]
                break
        else:
            sd = obj
    if config_dict:
        config = STTransformerConfig.from_dict(config_dict)
    elif preset:
        config = STTransformerConfig.from_name(preset)
    else:
        raise ValueError(f"{path}: the checkpoint holds no model config; pass a preset")
    model = STTransformer(config)
    model.load_state_dict(_clean_state_dict(sd))
    return model
