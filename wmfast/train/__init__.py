"""Training: the model-agnostic DeepSpeed ZeRO loop, split by job: config (TrainConfig, presets, the DeepSpeed
JSON), distributed (process group), engine, step (optimizer step, validation), microbatch (`--micro-batch auto`),
checkpoint (crash-safe saves), sampler (deterministic batches), schedule (LR), runlog (metrics.jsonl, MFU),
loop (the run).

    from wmfast.train import TrainConfig, train
    train(TrainConfig.from_name("tiny"), data_dir, run_dir)

Tasks (model + loss + data) come from wmfast.tasks, re-exported here; the trainer imports no model. Importing
this package does not import DeepSpeed (the loop imports it when a run starts).
"""
from wmfast.tasks import TASKS, Task, make_task, param_groups, register_task

from .config import PRESETS, TrainConfig, deepspeed_config, register_preset
from .loop import RunResult, train
from .schedule import lr_at

__all__ = ["PRESETS", "TASKS", "RunResult", "Task", "TrainConfig", "deepspeed_config", "lr_at", "make_task",
           "param_groups", "register_preset", "register_task", "train"]
