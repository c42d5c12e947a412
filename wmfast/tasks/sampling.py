"""The sampling-track training task: LoRA post-training of the Wan world model by flow matching.

Registered as task "sampling" (training presets "1x-sampling", the recipe, and "tiny-sampling", tests and demo,
in wmfast.train.config). Importing this module is cheap: diffusers is imported when a model is built.

Loss (rectified flow, as Wan): per sample sigma ~ U(0, 1) shifted by 5 (sigma' = 5 s / (1 + 4 s)),
x_t = (1 - sigma') x0 + sigma' noise on the future latents, the context latents clean with timestep 0,
target velocity noise - x0, MSE over the future latents only.

Data (`--data`): a raw 1X split root (frames decoded and VAE-encoded on the fly by a frozen VAE held by
the task, outside the model, DeepSpeed and the optimizer), or the output of `wmfast data encode`
(latents precomputed once by `encode_dataset`; detected by its `latents.json`).
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from wmfast.data.latents import LatentDataset, is_latent_dir, write_latents
from wmfast.tasks.task import Task, register_task

SHIFT = 5.0


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

    def __init__(self, data_dir: str | None, model: str = "tiny", lora_rank: int | None = None, hop: int = 16):
        self.data_dir, self.model_name, self.hop = data_dir, model, hop
        self.pretrained = None if model in ("tiny", "ti2v-5b") else model
        from wmfast.models.wan import check_pretrained_dir, get_preset

        if self.pretrained is not None:
            check_pretrained_dir(self.pretrained)

        self.preset = get_preset("tiny" if model == "tiny" else "ti2v-5b")
        self.lora_rank = self.preset.lora_rank if lora_rank is None else lora_rank
        self._vae = None
        self._datasets: dict = {}  # split -> dataset (or None): opened once, not at every validation

    def configure(self, cfg) -> None:
        """Refuse a random 5B model unless asked for; open the val split on every rank before any collective (a
        broken split then stops every rank, not only rank 0, which is the first to read it in the loop)."""
        if self.pretrained is None and self.preset.name != "tiny" and not getattr(cfg, "random_weights", False):
            raise ValueError(f"the {self.preset.name} model has no weights here: pass --model "
                             "/path/to/Wan2.2-TI2V-5B-Diffusers (a local diffusers directory; nothing is downloaded), "
                             "or --random-weights to train on a randomly initialised 5B model (~20 GB of fp32 weights)")
        if getattr(cfg, "val_every", 0) and self.data_dir is not None:
            self.val_dataset()

    # ---------------------------------------------------------------- model
    def build_model(self):
        from wmfast.models.wan import TINY_BASE_SEED, build_world_model
        from wmfast.models.wan.lora import add_lora

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

    export_dir = "adapter"

    def export(self, model, directory, *, is_main_process, step):
        """The LoRA adapter directory (wmfast.models.wan.lora): loadable by stock diffusers and peft, with the
        state modules beside it for wmfast."""
        from wmfast.models.wan import TINY_BASE_SEED
        from wmfast.models.wan.lora import save_lora

        info = {"preset": self.preset.name, "pretrained": self.pretrained, "step": step,
                "base_seed": TINY_BASE_SEED if self.pretrained is None else None}
        save_lora(model.transformer, directory, is_main_process=is_main_process, info=info)

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
        if is_latent_dir(self.data_dir):
            return LatentDataset(self.data_dir) if split == "train" else None
        if is_latent_dir(latent_dir):
            return LatentDataset(latent_dir)
        from wmfast.data.raw import RawDataError, RawVideoDataset, resolve_split_dir
        from wmfast.models.wan import FrameSchedule

        if split != "train":  # no val split: no validation; a val split that is there but broken is an error
            try:
                resolve_split_dir(self.data_dir, split)
            except RawDataError:
                return None
        raw = RawVideoDataset(self.data_dir, split, frame_offsets=FrameSchedule(self.preset.frame_stride)
                              .frame_indices, hop=self.hop if split == "train" else 77,
                              size=(self.preset.height, self.preset.width))
        return FramesDataset(raw)

    def train_dataset(self):
        return self._opened("train")

    def val_dataset(self):
        return self._opened("val")

    def _opened(self, split: str):
        if split not in self._datasets:
            self._datasets[split] = self._dataset(split)
        return self._datasets[split]

    # ---------------------------------------------------------------- accounting
    def tokens_per_sample(self) -> int:
        from wmfast.models.wan import FrameSchedule

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


register_task("sampling", lambda data_dir, model: SamplingTask(data_dir, model))


def encode_dataset(data_dir: str, out_dir: str, model: str = "tiny", splits=("train", "val"), hop: int = 16,
                   max_samples: int | None = None, batch: int = 1, device: str = "cpu",
                   progress: bool = True) -> dict[str, str]:
    """Precompute the VAE latents of a raw 1X dataset once (`wmfast data encode`): per split
    `out_dir/<split>/latents.npy` [N, 48, F', H', W'] fp32, `states.npy` [N, 77, 25], `latents.json`.
    Uses the task's datasets and VAE (seeded tiny weights, or the pretrained VAE of `model`), so training on the
    result equals training with on-the-fly encoding."""
    from wmfast.models.wan import vae_encode

    task = SamplingTask(data_dir, model, hop=hop)
    vae = task.vae(torch.device(device))
    written = {}
    for split in splits:
        ds = task._dataset(split) if split == "train" else task.val_dataset()
        if ds is None or isinstance(ds, LatentDataset):
            continue
        meta = {"source": os.path.abspath(data_dir), "split": split, "model": model,
                "frame_stride": task.preset.frame_stride}
        written[split] = write_latents(ds, os.path.join(out_dir, split), lambda frames: vae_encode(vae, frames),
                                       meta, max_samples=max_samples, batch=batch, device=device,
                                       desc=f"encode {split}", progress=progress)
    return written
