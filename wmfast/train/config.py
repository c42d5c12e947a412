"""Typed training configuration: named presets, validation, and the DeepSpeed JSON generated from it.

`TrainConfig.from_name("1x-compression")` is the recipe of the 1X compression-track winner (arXiv 2510.07092):
AdamW betas (0.9, 0.95), weight decay 0.05 on matrices only, peak LR 8e-4, 2,000 warm-up steps then linear
decay to 0, global batch 160 (20 per GPU x 8), bf16 autocast, 80 epochs of ~306k samples (~153k steps).
`"tiny"` trains the tiny ST-Transformer on a small synthetic set in seconds on a CPU (tests, quick start).
`"1x-sampling"` is the sampling-track recipe (LoRA on Wan2.2, task "sampling"), `"tiny-sampling"` its CPU-sized
version. A preset names its task by the name it is registered under (wmfast.tasks); more presets can be added
with `register_preset`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PRECISIONS = ("auto", "autocast-bf16", "bf16", "fp32")
NAN_POLICIES = ("stop", "skip")


@dataclass
class TrainConfig:
    """Everything the loop needs besides the data directory. Units: steps are optimizer steps."""

    name: str = "custom"
    task: str = "compression"  # key of wmfast.tasks.TASKS
    model: str = "tiny"  # model preset inside the task (e.g. STTransformerConfig.from_name(model))
    # a real-size preset without pretrained weights trains from random weights only when this is set (a task that
    # needs weights, like the sampling task's 5B Wan, refuses otherwise)
    random_weights: bool = False
    # batch: global = micro_batch * grad_accum * world_size; micro_batch "auto" searches the largest that fits
    global_batch: int = 8
    micro_batch: int | str = 4
    steps: int = 40
    # optimizer (AdamW): decay only on matrices (ndim >= 2) the task does not exempt (position embeddings)
    lr: float = 8e-4
    warmup_steps: int = 2000
    lr_schedule: str = "linear"  # "linear": decay to 0 after the warm-up; "constant": hold the peak (1x-sampling)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    # how the task reduces its loss over predicted frames (compression: "mean" over the tokens of the 3 future
    # grids, or "sum" of the per-grid means = 3x; see wmfast.models.compression_loss and docs/training.md)
    loss_reduction: str = "mean"
    # distributed / numerics
    zero_stage: int = 2
    precision: str = "auto"  # auto: autocast-bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    # regional torch.compile: each of the task's blocks compiled on its own (wmfast.modules.compile.compile_blocks)
    compile: bool = False
    # crash safety and reporting (0 disables the periodic action; a final checkpoint is always written)
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    val_every: int = 1000
    val_batches: int = 50
    log_every: int = 10
    nan_policy: str = "stop"  # stop: end the run keeping the last good checkpoint; skip: drop the step
    # under "skip": the most consecutive steps that may be dropped; one more non-finite step stops the run as "stop"
    nan_skip_limit: int = 3
    seed: int = 0
    num_workers: int = 0
    # micro-batch search: a size fits when its trial does not OOM and peak memory <= (1 - margin) * capacity
    auto_margin: float = 0.10
    auto_max_micro_batch: int = 0  # 0: up to the per-rank batch
    # user JSON merged over the generated DeepSpeed config (keys the user sets win)
    deepspeed_override: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_name(cls, name: str, **overrides) -> TrainConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown training preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        cfg = PRESETS[name]()
        return cfg.replace(**overrides) if overrides else cfg

    def replace(self, **changes) -> TrainConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def validate(self, world_size: int = 1) -> None:
        """Raise ValueError for any inconsistent setting, before any work is done."""
        self._validate_ranges()
        if self.global_batch % world_size:
            raise ValueError(f"global_batch={self.global_batch} must be a positive multiple of the "
                             f"world size {world_size}")
        per_rank = self.global_batch // world_size
        if self.micro_batch != "auto" and per_rank % self.micro_batch:
            raise ValueError(f"micro_batch={self.micro_batch} does not divide the per-rank batch {per_rank} "
                             f"(global_batch={self.global_batch} / world_size={world_size})")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "bf16" and self.zero_stage == 0:
            # DeepSpeed keeps fp32 master weights only in its ZeRO optimizers; without ZeRO it refuses bf16 weights
            # with fp32 gradient accumulation ("unsupported mix of model_dtype ... and grad_accum_dtype")
            raise ValueError("precision='bf16' needs zero_stage >= 1 (the fp32 master weights live in the ZeRO "
                             "optimizer); with zero_stage 0 use precision 'autocast-bf16' (bf16 compute, fp32 weights)")
        if self.lr_schedule not in ("linear", "constant"):
            raise ValueError(f"lr_schedule must be 'linear' or 'constant', got {self.lr_schedule!r}")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if not 0.0 <= self.auto_margin < 1.0:
            raise ValueError(f"auto_margin must be in [0, 1), got {self.auto_margin}")

    def _validate_ranges(self) -> None:
        """One ValueError per numeric field out of its range, naming the field and the value (`lr=-1.0 must be
        > 0`): a bad value otherwise surfaces later, transformed, from DeepSpeed or the optimizer."""
        for name, low in (("lr", None), ("eps", None), ("weight_decay", 0.0), ("grad_clip", 0.0)):
            _check_float(name, getattr(self, name), low)
        for name, low in (("global_batch", 1), ("steps", 1), ("warmup_steps", 0), ("keep_checkpoints", 1),
                          ("ckpt_every", 0), ("val_every", 0), ("val_batches", 1), ("log_every", 1),
                          ("nan_skip_limit", 1), ("num_workers", 0), ("auto_max_micro_batch", 0)):
            _check_int(name, getattr(self, name), low)
        if self.micro_batch != "auto":
            _check_int("micro_batch", self.micro_batch, 1, " or 'auto'")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={tuple(self.betas)!r} must be two numbers in [0, 1)")

    def grad_accum(self, micro_batch: int, world_size: int) -> int:
        return self.global_batch // (micro_batch * world_size)


def _check_float(name: str, value: Any, low: float | None) -> None:
    """`value` finite and > 0 (low None) or >= low."""
    bound = "> 0" if low is None else f">= {low:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number {bound}")  # noqa: TRY004 - a config error like the rest
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite and {bound}")
    if value < (low or 0.0) or (low is None and value == 0):
        raise ValueError(f"{name}={value!r} must be {bound}")


def _check_int(name: str, value: Any, low: int, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(  # noqa: TRY004 - a config error like the rest
            f"{name}={value!r} must be an integer >= {low}{alternative}")
    if value < low:
        raise ValueError(f"{name}={value!r} must be >= {low}{alternative}")


def resolve_precision(precision: str, device_type: str) -> str:
    """'auto' -> autocast-bf16 on CUDA (the recipe: AMP bf16, fp32 master weights), fp32 on CPU."""
    if precision == "auto":
        return "autocast-bf16" if device_type == "cuda" else "fp32"
    if precision in ("bf16", "autocast-bf16") and device_type == "cpu":
        return precision  # allowed (slow); DeepSpeed supports bf16 on its CPU accelerator
    return precision


def deepspeed_config(cfg: TrainConfig, micro_batch: int, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON for `cfg` (the optimizer and LR schedule are passed as client objects, so that
    no DeepSpeed op is JIT-built: torch's fused AdamW on GPU, plain torch AdamW on CPU)."""
    ds: dict[str, Any] = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum(micro_batch, world_size),
        "gradient_clipping": cfg.grad_clip,
        "steps_per_print": 10**9,  # the loop does its own reporting
        "wall_clock_breakdown": False,
        # torch.optim.AdamW is not on DeepSpeed's list of tested ZeRO optimizers, but ZeRO only needs
        # param_groups/step/state_dict, which it has.
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": cfg.zero_stage},
    }
    if cfg.zero_stage >= 2:
        ds["zero_optimization"].update({"overlap_comm": True, "contiguous_gradients": True,
                                        "reduce_bucket_size": 5e7})
    if cfg.zero_stage == 3:
        # memory_efficient_linear (DeepSpeed's default) replaces torch.nn.functional.linear for the whole process,
        # and keeps it replaced after the engine is gone ("persists unless manually reset"): every later model's
        # linear layers then run DeepSpeed's autograd function, with different numerics. Off.
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False,
                                        "memory_efficient_linear": False})
    if precision == "bf16":
        # bf16 weights/grads, fp32 master weights in the ZeRO optimizer; accumulate grads in fp32
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return merge_override(ds, cfg.deepspeed_override)


def merge_override(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: dict values merge key by key, anything else in `override` replaces `base`."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_override(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_override(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    if not os.path.isfile(path):
        raise ValueError(f"DeepSpeed override JSON {path!r} does not exist")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - a bad file is a user error, reported like the others
            f"DeepSpeed override JSON {path!r} must hold an object, got {type(data).__name__}")
    return data


# ---- presets -----------------------------------------------------------------------------------------------
PRESETS: dict[str, Callable[[], TrainConfig]] = {}


def register_preset(name: str, factory: Callable[[], TrainConfig]) -> None:
    """Add a named preset (e.g. the sampling track's "1x-sampling"); names are unique."""
    if name in PRESETS:
        raise ValueError(f"training preset {name!r} is already registered")
    PRESETS[name] = factory


def _preset_1x_compression() -> TrainConfig:
    # 306k samples x 80 epochs / 160 per step = 153,000 optimizer steps
    return TrainConfig(name="1x-compression", task="compression", model="1x-compression", global_batch=160,
                       micro_batch=20, steps=153_000, lr=8e-4, warmup_steps=2000, betas=(0.9, 0.95),
                       weight_decay=0.05, grad_clip=1.0, zero_stage=2, precision="auto", ckpt_every=2000,
                       val_every=2000, val_batches=100, log_every=20)


def _preset_tiny() -> TrainConfig:
    # seconds on 2 CPU cores: a short warm-up and a high LR so the loss visibly falls in a few dozen steps
    return TrainConfig(name="tiny", task="compression", model="tiny", global_batch=8, micro_batch=4, steps=40,
                       lr=3e-3, warmup_steps=5, zero_stage=2, precision="auto", ckpt_every=20, keep_checkpoints=2,
                       val_every=20, val_batches=2, log_every=1)


register_preset("1x-compression", _preset_1x_compression)
register_preset("tiny", _preset_tiny)


def _preset_1x_sampling() -> TrainConfig:
    # The winning recipe (arXiv 2510.07092): LoRA rank 32, AdamW, constant LR 4e-4, global batch 1,024
    # (128 x 8 GPUs), bf16, gradient checkpointing; ZeRO-2. The step count was not published (36 h).
    return TrainConfig(name="1x-sampling", task="sampling", model="ti2v-5b", global_batch=1024, micro_batch="auto",
                       steps=4000, lr=4e-4, warmup_steps=0, lr_schedule="constant", betas=(0.9, 0.999),
                       weight_decay=0.0, grad_clip=1.0, zero_stage=2, precision="bf16",
                       activation_checkpointing=True, ckpt_every=250, val_every=250, val_batches=20, log_every=10)


def _preset_tiny_sampling() -> TrainConfig:
    # seconds on 2 CPU cores: the tiny Wan on a few synthetic samples
    return TrainConfig(name="tiny-sampling", task="sampling", model="tiny", global_batch=4, micro_batch=2, steps=30,
                       lr=3e-3, warmup_steps=0, lr_schedule="constant", betas=(0.9, 0.999), weight_decay=0.0,
                       zero_stage=2, precision="fp32", ckpt_every=15, keep_checkpoints=1, val_every=0, log_every=1)


register_preset("1x-sampling", _preset_1x_sampling)
register_preset("tiny-sampling", _preset_tiny_sampling)
