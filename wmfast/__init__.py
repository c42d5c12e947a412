"""wmfast: fast kernels, training and inference for video world models."""

__version__ = "0.1.0"
