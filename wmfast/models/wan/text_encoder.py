"""The constant text input of the Wan world model: the UMT5 embedding of the empty prompt, computed once and
cached beside the weights (or a seeded stand-in for random-weight presets)."""
from __future__ import annotations

import hashlib
import logging
import os

import torch

from wmfast.models.wan.presets import WanPreset

logger = logging.getLogger("wmfast")

TEXT_CACHE_NAME = "wmfast_empty_prompt_{text_len}.pt"  # written beside the pretrained weights


def empty_prompt_embedding(preset: WanPreset, text_encoder: str | None = None, cache: str | None = None,
                           seed: int = 0, required: bool = False) -> torch.Tensor:
    """The constant text embedding [1, S, text_dim] of the empty prompt.

    Order: `cache` (a .pt file) if it exists; else the real UMT5 encoder from `text_encoder` (a pipeline
    directory with text_encoder/ and tokenizer/, loaded locally; the result is written to `cache` when
    given); else, unless `required` (pretrained weights: a random embedding would silently give wrong
    predictions, so that raises), a fixed seeded tensor (tiny presets and from-scratch runs: any constant works)."""
    shape = (1, preset.text_len, preset.transformer["text_dim"])
    if cache and os.path.exists(cache):
        emb = torch.load(cache, map_location="cpu")
        if tuple(emb.shape) != shape:
            raise ValueError(f"text cache {cache}: shape {tuple(emb.shape)}, expected {shape}; delete it to recompute")
        return emb
    if text_encoder is not None:
        emb = _umt5_empty_prompt(text_encoder, preset.text_len)
    elif required:
        raise ValueError(
            f"a pretrained Wan needs the UMT5 embedding of the empty prompt {shape}, and there is neither a UMT5 "
            f"encoder (text_encoder/ and tokenizer/ in the weights directory, or text_encoder=<a Wan2.2 diffusers "
            f"pipeline directory>) nor a cached embedding (text_cache={cache!r} does not exist). Copy text_encoder/ "
            f"and tokenizer/ of Wan-AI/Wan2.2-TI2V-5B-Diffusers next to transformer/, or pass text_cache= a .pt "
            f"file computed once by a run that had them.")
    else:
        g = torch.Generator().manual_seed(seed)
        emb = torch.randn(*shape, generator=g) * 0.1
    if cache:
        try:
            _save_atomic(emb, cache)
        except OSError as e:  # a read-only or full disk costs a recomputation next time, not this run
            logger.warning(f"wmfast: could not write the empty-prompt cache {cache} ({e}); UMT5 will run again")
    return emb


def default_text_cache(pretrained: str, text_len: int) -> str:
    """Where the empty-prompt embedding of `pretrained` is cached: beside the weights, so UMT5-XXL runs once
    per weights directory (not per rank, engine build or sample call); if that directory is not writable, under
    $XDG_CACHE_HOME/wmfast (default ~/.cache/wmfast), named after the directory's absolute path."""
    name = TEXT_CACHE_NAME.format(text_len=text_len)
    beside = os.path.join(pretrained, name)
    if os.path.exists(beside) or os.access(pretrained, os.W_OK):
        return beside
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wmfast")
    digest = hashlib.sha1(os.path.abspath(pretrained).encode()).hexdigest()[:16]
    return os.path.join(root, f"{digest}_{name}")


def _save_atomic(tensor: torch.Tensor, path: str) -> None:
    """Write then rename: ranks that start together never read a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(tensor, tmp)
    os.replace(tmp, path)


def _umt5_empty_prompt(path: str, text_len: int) -> torch.Tensor:
    """UMT5 on "" exactly as diffusers' WanPipeline: real tokens kept, padded with zeros to text_len. On a GPU
    the encoder runs in bf16 there (as the pipeline runs it; UMT5-XXL is 5.7B parameters: 23 GB in fp32 on the
    CPU); returns fp32 on the CPU."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tok = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
    enc = UMT5EncoderModel.from_pretrained(os.path.join(path, "text_encoder"), torch_dtype=dtype,
                                           local_files_only=True).to(device).eval()
    inputs = tok([""], padding="max_length", max_length=text_len, truncation=True, add_special_tokens=True,
                 return_attention_mask=True, return_tensors="pt").to(device)
    with torch.no_grad():
        hidden = enc(inputs.input_ids, inputs.attention_mask).last_hidden_state.float().cpu()
    del enc
    if cuda:
        torch.cuda.empty_cache()
    n = int(inputs.attention_mask.sum())
    out = torch.zeros_like(hidden)
    out[:, :n] = hidden[:, :n]
    return out


def has_umt5(path) -> bool:
    """Whether a pretrained directory holds the UMT5 text encoder (a text_encoder/ subfolder)."""
    return bool(path) and os.path.isdir(os.path.join(path, "text_encoder"))
