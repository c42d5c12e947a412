"""Training: DeepSpeed ZeRO loop, configs with presets, tasks (model + loss + data), checkpoints.

    from wmfast.train import TrainConfig, train
    train(TrainConfig.from_name("tiny"), data_dir, run_dir)

Importing this package does not import DeepSpeed (the loop imports it when a run starts).
"""
from . import compression, toy  # noqa: F401 - register the "compression" and "toy" tasks
from .config import PRESETS, TrainConfig, deepspeed_config, register_preset
from .loop import RunResult, train
from .schedule import lr_at
from .task import TASKS, Task, make_task, param_groups, register_task

__all__ = ["PRESETS", "TASKS", "RunResult", "Task", "TrainConfig", "deepspeed_config", "lr_at", "make_task",
           "param_groups", "register_preset", "register_task", "train"]

# The sampling track's task and presets ("sampling", "1x-sampling", "tiny-sampling"); a cheap import (diffusers
# is imported only when its model is built). Last, so that wmfast.train is complete when it registers.
from wmfast.models import wan_task as _wan_task  # noqa: F401
