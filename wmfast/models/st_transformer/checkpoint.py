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


def _torch_load(path: str, map_location):
    """torch.load, with a file that is not a torch checkpoint (truncated, empty, another format) named in one line."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # zip, unpickling and EOF errors of a damaged or foreign file
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {reason})") from e


def _check_track(path: str, trainer_state: dict) -> None:
    """A `wmfast train` checkpoint of another model (the sampling track's Wan LoRA run) refused by name."""
    model_config = trainer_state.get("model_config") or {}
    # the compression task writes kind "st-transformer"; a bare STTransformerConfig.to_dict() has d_model
    if model_config and model_config.get("kind", "st-transformer" if "d_model" in model_config else None) != \
            "st-transformer":
        train_config = trainer_state.get("train_config") or {}
        raise ValueError(f"{path} holds a {train_config.get('name', '?')} model (task "
                         f"{train_config.get('task', '?')}, {model_config.get('preset', '?')} model preset); this "
                         "command needs an ST-Transformer checkpoint (the compression track)")


def _load_deepspeed_dir(path: str, map_location) -> tuple[dict | None, dict]:
    """(model config, fp32 weights) of a `wmfast train` checkpoint directory. Under ZeRO-3 the model states
    files hold only empty placeholders of the partitioned parameters (the run saves with
    stage3_gather_16bit_weights_on_model_save=False, which avoids gathering the model on one rank at every
    save): the weights are rebuilt from every rank's fp32 master partition by DeepSpeed's zero_to_fp32."""
    trainer_state = {}
    state_json = os.path.join(path, TRAINER_STATE)
    if os.path.isfile(state_json):
        with open(state_json) as f:
            try:
                trainer_state = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{state_json}: not valid JSON ({e})") from None
    _check_track(path, trainer_state)
    # ZeRO-3 names its model states per data-parallel rank (zero_pp_rank_R_...): rank 0's carries the config
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    weights = next((os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))), None)
    if weights is None:
        raise ValueError(f"{path}: a checkpoint directory needs {' or '.join(names)}")
    obj = _torch_load(weights, map_location)
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
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist")
    if os.path.isdir(os.path.join(path, "checkpoints")):  # a `wmfast train` run dir: its newest complete checkpoint
        found = latest_checkpoint(os.path.join(path, "checkpoints"))
        if found is None:
            raise ValueError(f"{path}: a run directory with no complete checkpoint under checkpoints/")
        path = found[1]
    if os.path.isdir(path):
        config_dict, sd = _load_deepspeed_dir(path, map_location)
    elif path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(path, device=str(map_location))
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        obj = _torch_load(path, map_location)
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
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: holds no state dict of tensors")
    model, sd = STTransformer(config), _clean_state_dict(sd)
    _check_weights(path, model, sd, config_dict, preset)
    model.load_state_dict(sd)
    model.preset_name = (config_dict or {}).get("preset") or (None if config_dict else preset)
    return model


def _check_weights(path: str, model: STTransformer, sd: dict, config_dict: dict | None, preset: str | None) -> None:
    """One line instead of load_state_dict's list of every key when the weights are not this model's."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if not (missing or unexpected or shapes):
        return
    source = "its own config" if config_dict else f"preset {preset!r}"
    example = (f"e.g. {shapes[0]} is {list(sd[shapes[0]].shape)} there, {list(own[shapes[0]].shape)} here"
               if shapes else f"e.g. {(missing or unexpected)[0]!r} {'missing' if missing else 'unexpected'}")
    raise ValueError(f"{path}: the weights do not fit an ST-Transformer of {source} ({len(missing)} missing, "
                     f"{len(unexpected)} unexpected, {len(shapes)} of another shape; {example}): a checkpoint of "
                     "another model or preset")
