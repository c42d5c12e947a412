"""What every op module of wmfast.ops shares: the dtype table, shape descriptions for error messages, the
argument checks every op applies alike (dtype, eps, boolean flags, row counts, aliasing), and the log-once
line."""
from __future__ import annotations

import logging
import math

import torch

from wmfast.kernels.tuning import dtype_name

logger = logging.getLogger("wmfast")

# The dtypes every op and kernel takes.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = "float32, float16, bfloat16"

# Rows (every dimension but the last, or B * S * H for attention) a kernel indexes: the row index of a program is
# program_id * BLOCK + arange in int32 (element offsets are int64), so 2**31 rows would wrap around.
MAX_ROWS = 2**31 - 1

__all__ = ["DTYPES", "DTYPE_NAMES", "MAX_ROWS", "check_disjoint", "check_dtype", "check_eps", "check_flag",
           "check_row_count", "check_rows", "check_vector", "describe", "dtype_name", "log_fallback", "log_once",
           "logger", "overlapping", "shape"]


def shape(t) -> str:
    """"(2, 4, 8)" for a tensor, else the type's name (for messages about a wrong argument)."""
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_dtype(name: str, t: torch.Tensor) -> None:
    """ValueError unless t's dtype is one of DTYPES (float64 too: the kernels compute in fp32, so its precision would
    be lost silently)."""
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} dtype {t.dtype} not supported ({DTYPE_NAMES})")


def check_eps(eps, name: str = "eps") -> None:
    """ValueError unless eps is a finite int or float > 0 (a norm's epsilon: 0 divides a constant row by zero,
    inf or NaN normalise every row to 0 or NaN)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"{name} must be a finite float > 0, got {eps!r}")


def check_flag(name: str, value) -> bool:
    """value when it is a bool, else ValueError: a truthy string ("no", "false") or a tensor must not pass as
    True."""
    if not isinstance(value, bool):
        raise ValueError(  # noqa: TRY004 - every bad argument of an op is a ValueError
            f"{name} must be a bool (True or False), got {value!r:.60} ({type(value).__name__})")
    return value


def check_row_count(name: str, t: torch.Tensor, rows: int | None = None, what: str = "rows") -> None:
    """ValueError when t has more than MAX_ROWS rows (default: the product of all but its last dimension), read
    from the shape before anything is allocated."""
    rows = math.prod(t.shape[:-1]) if rows is None else rows
    if rows > MAX_ROWS:
        raise ValueError(f"{name} {shape(t)} has {rows} {what}; the kernels index {what} in int32: at most "
                         f"2**31 - 1 = {MAX_ROWS}")


def check_rows(name: str, x, like=None) -> None:
    """ValueError unless x is a non-empty [..., D] tensor of a supported dtype with at most MAX_ROWS rows (with
    `like`: of its shape, dtype and device)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")  # noqa: TRY004
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty [..., D] tensor, got shape {shape(x)}")
    check_dtype(name, x)
    check_row_count(name, x)
    if like is not None and (x.shape != like.shape or x.dtype != like.dtype or x.device != like.device):
        raise ValueError(f"{name} {shape(x)} {x.dtype} on {x.device} does not match x {shape(like)} {like.dtype} "
                         f"on {like.device}")


def check_vector(name: str, p, width: int, x, what: str | None = None) -> None:
    """ValueError unless p is a [width] tensor of a supported dtype on x's device (a norm's weight or bias);
    `what` says where width comes from (default: the D of x)."""
    if not isinstance(p, torch.Tensor) or p.shape != (width,):
        raise ValueError(f"{name} must be a [{width}] tensor ({what or f'D of x {shape(x)}'}), got {shape(p)}")
    if p.dtype not in DTYPES or p.device != x.device:
        raise ValueError(f"{name}: {p.dtype} on {p.device}; expected one of {DTYPE_NAMES} on {x.device}")


def _hits(terms: list[tuple[int, int, int]], target: int, budget: list[int]) -> bool:
    """Whether sum(c * stride) == target for integers lo <= c <= hi, one c per (stride, lo, hi) term (terms sorted
    by decreasing stride). A depth-first search that bounds each coefficient by what the smaller strides can
    still reach: one or two candidates per term for the layouts of real tensors. When `budget` (nodes) runs out
    it answers True (the caller then treats the views as overlapping)."""
    if not terms:
        return target == 0
    budget[0] -= 1
    if budget[0] < 0:
        return True
    (stride, lo, hi), rest = terms[0], terms[1:]
    rest_lo = sum(s * a for s, a, _ in rest)
    rest_hi = sum(s * b for s, _, b in rest)
    first = max(lo, -((rest_hi - target) // stride))  # ceil((target - rest_hi) / stride)
    last = min(hi, (target - rest_lo) // stride)
    return any(_hits(rest, target - c * stride, budget) for c in range(first, last + 1))


def overlapping(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether some byte of memory belongs to an element of both a and b (views of one storage, or two tensors
    over the same memory). Exact for strided views: interleaved views such as kv[:, 0] and kv[:, 1] of a packed
    [B, 2, ...] cache do not overlap. Meta tensors have no memory: only `a is b` counts."""
    if a is b:
        return True
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    sa, sb = a.element_size(), b.element_size()
    start_a, start_b = a.data_ptr(), b.data_ptr()
    end_a = start_a + sa * (1 + sum((n - 1) * s for n, s in zip(a.shape, a.stride())))
    end_b = start_b + sb * (1 + sum((n - 1) * s for n, s in zip(b.shape, b.stride())))
    if end_a <= start_b or end_b <= start_a:
        return False
    # an element of a at byte A = start_a + sum(i * stride_a) and one of b at B = start_b + sum(j * stride_b)
    # share a byte iff -(sa - 1) <= A - B <= sb - 1: one equation in bounded integers
    merged: dict[int, list[int]] = {1: [-(sb - 1), sa - 1]}
    for t, size, sign in ((a, sa, 1), (b, sb, -1)):
        for n, s in zip(t.shape, t.stride()):
            if n > 1 and s != 0:
                lo, hi = sorted((0, sign * (n - 1)))
                bounds = merged.setdefault(s * size, [0, 0])
                bounds[0], bounds[1] = bounds[0] + lo, bounds[1] + hi
    terms = sorted(((s, lo, hi) for s, (lo, hi) in merged.items()), reverse=True)
    return _hits(terms, start_b - start_a, [10_000])


def check_disjoint(op: str, *named: tuple[str, torch.Tensor]) -> None:
    """ValueError naming the pair when two of the (name, tensor) arguments share memory (an op that writes one of
    them in place would then change the other). Skipped while torch.compile traces (no storage to compare)."""
    if torch.compiler.is_compiling():
        return
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1:]:
            if overlapping(a, b):
                same = "are the same tensor" if a is b else "overlap in memory"
                raise ValueError(f"{op}: {name_a} and {name_b} {same} ({name_a} {shape(a)} strides {a.stride()}, "
                                 f"{name_b} {shape(b)} strides {b.stride()}): they must be separate buffers")


def describe(t) -> str:
    """Shape, strides, dtype and device of a tensor, for messages about layouts."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} (strides {tuple(t.stride())}, {t.dtype}, {t.device})"


_LOGGED: set = set()


def log_once(message: str, *, level: int = logging.INFO, key=None) -> None:
    """Log `message` at `level` on the "wmfast" logger the first time its key (default: the message itself) is
    seen. `log_once.cache_clear()` forgets every key (tests)."""
    key = message if key is None else key
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    logger.log(level, message)


log_once.cache_clear = _LOGGED.clear


def log_fallback(op: str, device: torch.device, why: str, device_wide: list[str]) -> None:
    """Log that `op` runs its torch reference on `device` tensors because of `why`: that detail at DEBUG level,
    and one INFO line per device type, the first time any op falls back there (a training step calls about seven
    ops: a line each would interleave with the progress bars). `device_wide`: why no fused kernel runs on this
    device at all (empty when the fallback is this op's own: a limit, a gradient)."""
    if device_wide:
        summary = (f"no fused kernels for {device.type} tensors ({'; '.join(device_wide)}): ops run their torch "
                   "references")
    else:
        summary = f"some ops on {device.type} tensors run their torch references (first: {op}: {why})"
    log_once(f"wmfast: {summary}; each op and why at DEBUG level (`wmfast -v ...`)", key=("fallback", device.type))
    log_once(f"wmfast: {op} on {device} tensors: {why}; using the torch reference", level=logging.DEBUG)
