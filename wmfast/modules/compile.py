"""Regional compilation: the repeated blocks of a model compiled one by one (torchtitan's recipe), for training
(wmfast.train.engine) and inference (WmWanTransformer.compile_blocks)."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def compile_blocks(blocks: Sequence[torch.nn.Module], fullgraph: bool = True, backend="inductor", **kwargs) -> None:
    """Each repeated block compiled on its own with torch.compile, in place (`nn.Module.compile`), so parameter
    names and checkpoint keys stay as they were (wrapping a block in torch.compile(block) would prefix them with
    `_orig_mod.`). Blocks of one class share one compiled graph (torch.compile treats their parameters as inputs),
    so N layers cost one compilation, not N. In training, call it after activation checkpointing: a block's
    compiled graph then contains the checkpoint (torchtitan's order; dynamo traces non-reentrant checkpoint as a
    higher-order op), and before deepspeed.initialize. `backend`: the torch.compile backend (tests use
    "aot_eager" or a counting backend, which trace the same graphs without Inductor's codegen); `kwargs`: more
    torch.compile options (mode, dynamic)."""
    if not blocks:
        raise ValueError("compile requested but there are no blocks to compile")
    for block in blocks:
        block.compile(fullgraph=fullgraph, backend=backend, **kwargs)
