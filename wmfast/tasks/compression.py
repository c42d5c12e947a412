"""The compression-track task: the ST-Transformer on the 1X v2.0 tokenized set (wmfast.models, wmfast.data).

Loss: `compression_loss` (teacher forcing, mean CE over the tokens of the 3 future grids, or with
TrainConfig.loss_reduction="sum" the per-grid means summed, 3x). Validation: full
vocabulary CE and Top-500 CE (wmfast.metrics; the definition is in wmfast/metrics/ce.py) of the future grids.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from wmfast.tasks.task import Task, register_task


class CompressionTask(Task):
    name = "compression"

    def __init__(self, data_dir: str, model: str = "1x-compression", top_k: int = 500):
        from wmfast.data import TokenizedDataset
        from wmfast.models import STTransformerConfig

        self.preset = model
        self.config = STTransformerConfig.from_name(model)
        if not data_dir or not os.path.isdir(data_dir):
            raise ValueError(f"data directory {data_dir!r} does not exist")
        # opening the split validates its metadata and file sizes: a wrong directory fails here, before any work
        self._train = TokenizedDataset(data_dir, "train", vocab_size=self.config.vocab_size)
        self._check_grid(self._train)
        # a missing val split is allowed (validation is then off); the loop warns with this reason on rank 0
        self.val_missing_reason: str | None = None
        try:
            self._val = TokenizedDataset(data_dir, "val", vocab_size=self.config.vocab_size)
            self._check_grid(self._val)
        except FileNotFoundError as e:
            self._val, self.val_missing_reason = None, f"no val split in {data_dir}: {e}"
        except ValueError as e:
            if "no metadata.json" not in str(e):
                raise
            self._val, self.val_missing_reason = None, f"no val split in {data_dir}: {e}"
        if len(self._train) == 0:
            raise ValueError(f"{self._train.dir}: no training sample (a sample needs two windows in one segment)")
        self.top_k = min(top_k, self.config.vocab_size)
        self.future_reduction = "mean"

    def configure(self, cfg) -> None:
        self.future_reduction = cfg.loss_reduction

    def _check_grid(self, ds) -> None:
        if ds.grid_size != self.config.grid_size:
            raise ValueError(f"{ds.dir} has {ds.grid_size}x{ds.grid_size} token grids but the model preset "
                             f"{self.preset!r} expects {self.config.grid_size}x{self.config.grid_size}")

    def build_model(self):
        from wmfast.models import STTransformer

        return STTransformer(self.config)

    def loss(self, model, batch):
        from wmfast.models import compression_loss

        loss, _ = compression_loss(model, batch, future_reduction=getattr(self, "future_reduction", "mean"))
        return loss

    def train_dataset(self):
        return self._train

    def val_dataset(self):
        return self._val

    def collate(self, samples):
        return {"tokens": torch.stack([s["tokens"] for s in samples]),
                "states": torch.stack([s["states"] for s in samples])}

    def flops_per_sample(self) -> float:
        from wmfast.models import flops_per_sample

        return flops_per_sample(self.config)  # formula and its terms: wmfast/models/st_transformer/config.py

    def tokens_per_sample(self) -> int:
        return self.config.num_frames * self.config.seq_len  # 5 x 1024 = 5,120 for the real data

    def blocks(self, model):
        return list(model.blocks)

    def model_config(self):
        return {"kind": "st-transformer", "preset": self.preset, **dataclasses.asdict(self.config)}

    def weight_decay_exempt(self, name, param) -> bool:
        # the model's own list (position embeddings pos_s, pos_t and the state encoder's pos; 1-D params)
        return name.endswith(("pos_s", "pos_t", ".pos"))

    @torch.no_grad()
    def evaluate(self, model, batch):
        """CE and Top-k CE of the future grids, one sample at a time: full logits of one sample are
        [5, S, V] (1.3 GB in fp32 for the real model), of a micro-batch 20x that."""
        from wmfast.metrics import cross_entropy, topk_cross_entropy

        c = self.config
        ce = topk = 0.0
        n = batch["tokens"].shape[0]
        for i in range(n):
            tokens, states = batch["tokens"][i: i + 1], batch["states"][i: i + 1]
            logits = model(tokens[:, : c.num_frames], states)  # [1, T, S, V]
            future = logits[:, c.context_frames - 1:]  # positions 2..4 predict grids 3..5
            targets = tokens[:, c.context_frames:].reshape(1, future.shape[1], -1)
            ce += float(cross_entropy(future, targets))
            topk += float(topk_cross_entropy(future, targets, self.top_k))
        return {"ce": ce / n, f"top{self.top_k}_ce": topk / n}


register_task("compression", lambda data_dir, model: CompressionTask(data_dir, model))
