"""The sampling-track training task: LoRA post-training of the Wan world model by flow matching.

Registered with wmfast.train as task "sampling" with presets "1x-sampling" (the recipe) and "tiny-sampling"
(tests, demo). Importing this module is cheap: diffusers is imported when a model is built.

Loss (rectified flow, as Wan): per sample sigma ~ U(0, 1) shifted by 5 (sigma' = 5 s / (1 + 4 s)),
x_t = (1 - sigma') x0 + sigma' noise on the future latents, the context latents clean with timestep 0,
target velocity noise - x0, MSE over the future latents only.

Data (`--data`): a raw 1X split root (frames decoded and VAE-encoded on the fly by a frozen VAE held by
the task, outside the model, DeepSpeed and the optimizer), or the output of `wmfast data encode`
(latents precomputed once; detected by its `latents.json`).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from wmfast.train.config import TrainConfig, register_preset
from wmfast.train.task import Task, register_task

SHIFT = 5.0
LATENTS_META = "latents.json"


def shift_sigma(s: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    return shift * s / (1 + (shift - 1) * s)


def flow_matching_loss(model, latents: torch.Tensor, states: torch.Tensor, num_context: int,
                       shift: float = SHIFT, generator: torch.Generator | None = None) -> torch.Tensor:
    """latents [B, C, F', H', W'] clean (context first), states [B, 77, 25] -> scalar MSE on the future latents.
    `model`: a WanWorldModel or a DeepSpeed engine wrapping one."""
    module = getattr(model, "module", model)
    B, n_frames = latents.shape[0], latents.shape[2]
    dev = latents.device
    s = shift_sigma(torch.rand(B, device=dev, generator=generator), shift)              # [B]
    noise = torch.randn(latents.shape, device=dev, generator=generator, dtype=latents.dtype)
    sig = s.view(B, 1, 1, 1, 1).to(latents.dtype)
    x_t = torch.cat([latents[:, :, :num_context], ((1 - sig) * latents + sig * noise)[:, :, num_context:]], dim=2)
    timestep = (1000 * s)[:, None].expand(B, n_frames).clone()
    timestep[:, :num_context] = 0                                                         # clean context frames
    cond = module.prepare_conditioning(states.to(latents.dtype))
    v = model(x_t, timestep, cond)
    target = (noise - latents)[:, :, num_context:]
    return (v[:, :, num_context:].float() - target.float()).square().mean()


class LatentDataset(Dataset):
    """`wmfast data encode` output: latents.npy [N, C, F', H', W'] (memmap) + states.npy [N, 77, 25]."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, LATENTS_META)) as f:
            self.meta = json.load(f)
        self.latents = np.load(os.path.join(directory, "latents.npy"), mmap_mode="r")
        self.states = np.load(os.path.join(directory, "states.npy"), mmap_mode="r")
        if len(self.latents) != len(self.states):
            raise ValueError(f"{directory}: {len(self.latents)} latents but {len(self.states)} state rows")

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latents": torch.from_numpy(np.array(self.latents[i], dtype=np.float32)),
                "states": torch.from_numpy(np.array(self.states[i], dtype=np.float32))}


class FramesDataset(Dataset):
    """A RawVideoDataset reduced to what the loss needs: {"frames": uint8 [F, 3, H, W], "states"}."""

    def __init__(self, raw):
        self.raw = raw

    def __len__(self):
        return len(self.raw)

    def __getitem__(self, i):
        item = self.raw[i]
        return {"frames": item["frames"], "states": item["states"]}


class SamplingTask(Task):
    name = "sampling"

    def __init__(self, data_dir: str | None, model: str = "tiny", lora_rank: int = 32, hop: int = 16):
        self.data_dir, self.model_name, self.lora_rank, self.hop = data_dir, model, lora_rank, hop
        self.pretrained = None if model in ("tiny", "ti2v-5b") else model
        from wmfast.models.wan import get_preset

        self.preset = get_preset("tiny" if model == "tiny" else "ti2v-5b")
        self._vae = None

    # ---------------------------------------------------------------- model
    def build_model(self):
        from wmfast.models.wan import TINY_BASE_SEED, build_world_model
        from wmfast.models.wan_lora import add_lora

        # A from-scratch base comes from a fixed seed (not the run's --seed), the base `wmfast sample` builds.
        model = build_world_model(self.preset, self.pretrained, vae=False, base_seed=TINY_BASE_SEED)
        add_lora(model.transformer, rank=self.lora_rank)
        return model

    def vae(self, device):
        """The frozen VAE (never a submodule of the trained model). Random tiny weights come from a fixed seed
        (build_vae) so every rank, `wmfast data encode` and sampling get the same VAE."""
        if self._vae is None:
            from wmfast.models.wan import build_vae

            self._vae = build_vae(self.preset, self.pretrained)
        return self._vae.to(device)

    def blocks(self, model):
        return list(getattr(model, "module", model).transformer.blocks)

    def model_config(self):
        return {"preset": self.preset.name, "pretrained": self.pretrained, "lora_rank": self.lora_rank,
                "frame_stride": self.preset.frame_stride}

    # ---------------------------------------------------------------- loss
    def latents_of(self, model, batch) -> torch.Tensor:
        module = getattr(model, "module", model)
        dtype = next(module.transformer.parameters()).dtype
        if "latents" in batch:
            return batch["latents"].to(dtype)
        from wmfast.models.wan import vae_encode

        frames = batch["frames"]
        return vae_encode(self.vae(frames.device), frames).to(dtype)

    def loss(self, model, batch):
        module = getattr(model, "module", model)
        return flow_matching_loss(model, self.latents_of(model, batch), batch["states"],
                                  module.schedule.num_context_latents)

    # ---------------------------------------------------------------- data
    def _dataset(self, split: str):
        if self.data_dir is None:
            raise ValueError("the sampling task needs --data (a raw 1X split root or a `wmfast data encode` output)")
        latent_dir = os.path.join(self.data_dir, split)
        if os.path.isfile(os.path.join(self.data_dir, LATENTS_META)):
            return LatentDataset(self.data_dir) if split == "train" else None
        if os.path.isfile(os.path.join(latent_dir, LATENTS_META)):
            return LatentDataset(latent_dir)
        from wmfast.data.raw import RawDataError, RawVideoDataset
        from wmfast.models.wan_schedule import FrameSchedule

        try:
            raw = RawVideoDataset(self.data_dir, split, frame_offsets=FrameSchedule(self.preset.frame_stride)
                                  .frame_indices, hop=self.hop if split == "train" else 77,
                                  size=(self.preset.height, self.preset.width))
        except RawDataError:
            if split == "train":
                raise
            return None
        return FramesDataset(raw)

    def train_dataset(self):
        return self._dataset("train")

    def val_dataset(self):
        return self._dataset("val")

    # ---------------------------------------------------------------- accounting
    def tokens_per_sample(self) -> int:
        from wmfast.models.wan_schedule import FrameSchedule

        p = self.preset
        return FrameSchedule(p.frame_stride).num_latents * (p.height // 32) * (p.width // 32)

    def flops_per_sample(self) -> float:
        """~3x the forward (activation gradients through every frozen layer; LoRA weight gradients are
        negligible). Forward per layer and token: 2 * (6 D^2 (self q, k, v, o; cross q, o) + 2 D ffn) for the
        linears, 4 L D + 4 S D for self- and cross-attention scores and values (S = text tokens)."""
        cfg = self.preset.transformer
        D, ffn, S = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], self.preset.text_len
        L = self.tokens_per_sample()
        per_token = 2 * (6 * D * D + 2 * D * ffn) + 4 * L * D + 4 * S * D
        return 3.0 * per_token * L * cfg["num_layers"]

    def weight_decay_exempt(self, name, param) -> bool:
        return True  # LoRA/state adapters: no weight decay (the team's value was not published)


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


register_task("sampling", lambda data_dir, model: SamplingTask(data_dir, model))
register_preset("1x-sampling", _preset_1x_sampling)
register_preset("tiny-sampling", _preset_tiny_sampling)


def encode_dataset(data_dir: str, out_dir: str, model: str = "tiny", splits=("train", "val"), hop: int = 16,
                   max_samples: int | None = None, batch: int = 1, device: str = "cpu",
                   progress: bool = True) -> dict[str, str]:
    """Precompute the VAE latents of a raw 1X dataset once (`wmfast data encode`): per split
    `out_dir/<split>/latents.npy` [N, 48, F', H', W'] fp32, `states.npy` [N, 77, 25], `latents.json`.
    Uses the task's VAE (seeded tiny weights, or the pretrained VAE of `model`), so training on the result
    equals training with on-the-fly encoding."""
    from tqdm import tqdm

    task = SamplingTask(data_dir, model, hop=hop)
    vae = task.vae(torch.device(device))
    from wmfast.models.wan import vae_encode

    written = {}
    for split in splits:
        ds = task._dataset(split) if split == "train" else task.val_dataset()
        if ds is None or isinstance(ds, LatentDataset):
            continue
        n = min(len(ds), max_samples) if max_samples else len(ds)
        split_dir = os.path.join(out_dir, split)
        os.makedirs(split_dir, exist_ok=True)
        lat, states = None, np.zeros((n, 77, 25), np.float32)
        for a in tqdm(range(0, n, batch), desc=f"encode {split}", disable=not progress):
            items = [ds[i] for i in range(a, min(a + batch, n))]
            z = vae_encode(vae, torch.stack([it["frames"] for it in items]).to(device)).float().cpu().numpy()
            if lat is None:
                lat = np.lib.format.open_memmap(os.path.join(split_dir, "latents.npy"), mode="w+",
                                                dtype=np.float32, shape=(n, *z.shape[1:]))
            lat[a:a + len(items)] = z
            states[a:a + len(items)] = np.stack([it["states"].numpy() for it in items])
        lat.flush()
        np.save(os.path.join(split_dir, "states.npy"), states)
        with open(os.path.join(split_dir, LATENTS_META), "w") as f:
            json.dump({"source": os.path.abspath(data_dir), "split": split, "model": model, "count": n,
                       "frame_stride": task.preset.frame_stride, "shape": list(lat.shape[1:])}, f, indent=1)
        written[split] = split_dir
    return written


def sampling_demo(out_dir: str = "wmfast_demo/sampling", steps: int = 30, frames: int = 480,
                  progress: bool = True) -> dict[str, str]:
    """The sampling track end to end on the CPU in about a minute: a synthetic raw set (64x64), LoRA training
    of the tiny Wan (`tiny-sampling`, frames VAE-encoded on the fly), and the adapter exported from the final
    checkpoint. Returns the paths ({"data", "run", "adapter"}); `wmfast sample --model tiny --lora ADAPTER
    --data DATA` then predicts frame 76 with an ensemble."""
    from wmfast.data.raw import write_synthetic_raw_dataset
    from wmfast.models.wan_lora import export_adapter
    from wmfast.train import train

    data = os.path.join(out_dir, "raw")
    write_synthetic_raw_dataset(data, shards=1, frames=frames, size=64, val_frames=3 * 77, progress=progress)
    cfg = TrainConfig.from_name("tiny-sampling", steps=steps, ckpt_every=steps, val_every=steps)
    result = train(cfg, data, os.path.join(out_dir, "run"), progress=progress)
    if result.status != "done" or result.checkpoint is None:
        raise RuntimeError(f"sampling demo: training ended with status {result.status}")
    adapter = os.path.dirname(export_adapter(result.checkpoint, os.path.join(out_dir, "adapter")))
    return {"data": data, "run": result.run_dir, "adapter": adapter, "last_loss": f"{result.last_loss:.4f}"}
