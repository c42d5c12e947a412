"""Build logic for the optional CUDA extension (filled by the csrc issue).

Returns setup() keyword arguments, or {} when there is nothing to build or no CUDA toolchain / CUDA torch.
"""
import glob
import os


def cuda_extension_kwargs(root):
    sources = glob.glob(os.path.join(root, "csrc", "**", "*.cu"), recursive=True)
    if not sources:
        print("wmfast: no CUDA sources under csrc/: skipping the CUDA extension")
        return {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        print("wmfast: no CUDA build of torch or no CUDA toolkit: skipping the CUDA extension")
        return {}
    return {}
