"""The task interface: everything model-specific the training loop needs, and nothing else.

A task = a model + a loss function + a data module. The loop (wmfast.train) never looks inside the
model: it asks the task for the model, the per-micro-batch loss, the datasets, the blocks to checkpoint, the
FLOPs of one sample and the validation metrics. Tasks register under a name (`register_task`); the TrainConfig
names the task to run. The built-in ones (compression, sampling, toy) register when wmfast.tasks is imported.
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate


class Task(abc.ABC):
    """One training problem. Subclasses implement the abstract methods; the rest have sensible defaults."""

    name: str = "task"

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model on the CPU in fp32 (the loop moves and wraps it). Called under the run's
        seed, so two calls give identical weights."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of one micro-batch (mean over its samples). `model` may be a DeepSpeed engine."""

    @abc.abstractmethod
    def train_dataset(self) -> Dataset:
        """Map-style dataset of training samples (the loop shards and shuffles it deterministically)."""

    def val_dataset(self) -> Dataset | None:
        return None

    def configure(self, cfg: Any) -> None:
        """Read the training options that concern the task (called by the loop with the TrainConfig before any
        work; default: none)."""

    def collate(self, samples: list[Any]) -> Any:
        return default_collate(samples)

    @abc.abstractmethod
    def flops_per_sample(self) -> float:
        """Training FLOPs of one sample (forward + backward), used for MFU."""

    def tokens_per_sample(self) -> int:
        """Tokens one sample feeds the model (for tokens/s)."""
        return 0

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated blocks, each wrapped in activation checkpointing when that is enabled."""
        return []

    # Name of the directory `export` writes inside every checkpoint and, at the end of the run, inside the run
    # directory (None: the task exports nothing).
    export_dir: str | None = None

    def export(self, model: nn.Module, directory: str, *, is_main_process: bool, step: int) -> None:
        """Write what users take away from a checkpoint (e.g. a LoRA adapter) into `directory`. Collective: every
        rank calls it (a ZeRO-3 gather needs them all); only `is_main_process` writes. `model` is unwrapped."""

    def model_config(self) -> dict[str, Any]:
        """JSON-able model configuration, stored in every checkpoint."""
        return {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: Any) -> dict[str, float]:
        """Validation metrics of one batch (means over its samples); default: the loss."""
        return {"loss": float(self.loss(model, batch))}

    def weight_decay_exempt(self, name: str, param: nn.Parameter) -> bool:
        """Matrices (ndim >= 2) decay unless exempted here; position embeddings are matrices but do not decay."""
        return any(key in name for key in ("pos_emb", "pos_embed", "position_emb"))


# name -> factory(data_dir, model_name) -> Task
TASKS: dict[str, Callable[[str, str], Task]] = {}


def register_task(name: str, factory: Callable[[str, str], Task]) -> None:
    TASKS[name] = factory


def make_task(name: str, data_dir: str, model: str) -> Task:
    """A registered task, or 'package.module:factory' (factory(data_dir, model) -> Task) for one of your own."""
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)(data_dir, model)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](data_dir, model)


def param_groups(model: nn.Module, task: Task, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (not biases, norm gains, position embeddings).

    Returns [decay, no_decay] groups with a "names" key listing the parameter names (tests check it)."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():  # tied parameters appear once
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and not task.weight_decay_exempt(name, p):
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    return [{"params": decay, "weight_decay": weight_decay, "names": decay_names},
            {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names}]
