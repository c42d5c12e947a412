"""Counting bytes without reading process memory: the live-bytes tracker (peak memory on the CPU, attention score
bytes) and the bytes autograd saves for backward.

Both count exactly the tensors torch creates, instead of reading process RSS (which the allocator, other threads
and page caching blur). `wmfast.bench.timing.peak_memory` uses the tracker for its CPU estimate.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch


class DispatchObserver(contextlib.AbstractContextManager):
    """Context manager calling `self._seen(func, out, input_keys)` after every aten op dispatched inside it (forward
    and backward): func, its outputs, and the storage keys (data_ptr) of its tensor inputs taken before it ran.
    Subclasses count what they need (LiveBytesTracker, model_cost.OpCounter)."""

    _mode = None

    def _seen(self, func, out, input_keys: set[int]) -> None:
        raise NotImplementedError

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        observer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                keys = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                        if isinstance(a, torch.Tensor) and a.device.type != "meta"}
                out = func(*args, **kwargs)
                observer._seen(func, out, keys)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


class LiveBytesTracker(DispatchObserver):
    """Context manager counting the live bytes of the storages that aten ops create inside it.

    A TorchDispatchMode sees every op's outputs (forward and backward); a storage not among the op's inputs is
    new and counted until it is freed (a weakref finalizer on the storage, whose Python object lives exactly as
    long as the storage does, including when autograd saved it for backward). Storages that existed before the
    context are never counted, nor in-place results on them or views of them. In bytes: `peak`, `current`,
    `allocated` (the sum of every new storage) and `softmax_bytes` (the outputs of aten softmax: one element
    per attention score, what the attention-memory table counts)."""

    def __init__(self):
        self.current = 0
        self.peak = 0
        self.allocated = 0
        self.softmax_bytes = 0
        self._live: dict[int, int] = {}  # data_ptr -> nbytes

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _seen(self, func, out, input_keys: set[int]) -> None:
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            if func is torch.ops.aten._softmax.default:
                self.softmax_bytes += t.numel() * t.element_size()
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._live or key in input_keys:
                continue  # empty, already counted, or a view of / in-place result on an input
            self._live[key] = nbytes
            self.current += nbytes
            self.allocated += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)


def saved_bytes(fn: Callable, inputs: tuple) -> int:
    """Bytes autograd saves for backward during fn(), excluding the inputs' storages (counted once each)."""
    input_keys = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in input_keys:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
