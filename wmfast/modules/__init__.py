"""nn.Modules built on wmfast.ops (kept apart from the kernels, as Liger separates ops from modules)."""
from wmfast.modules.adaln import AdaLNZero, DiTBlock, dit_block

__all__ = ["AdaLNZero", "DiTBlock", "dit_block"]
