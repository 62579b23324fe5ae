"""Input checks shared by the ops. Every check raises before any kernel runs and names the argument."""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(t, name: str, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str, dtype: bool = True) -> None:
    """Same device (and dtype, unless dtype=False) as `ref`."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def check_int(value, name: str, low: int, high: int | None = None) -> int:
    if type(value) is int and low <= value and (high is None or value <= high):
        return value  # the usual case, without the ABC check below (a visible cost in a small search)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_dims(dims, full_dim: int | None, name: str = "dims") -> tuple[int, ...]:
    """Nesting dims: a non-empty 1-D sequence, array or tensor of unique ints in [1, full_dim] (>= 1 when
    full_dim is None), any order."""
    if type(dims) in (tuple, list) and dims and all(type(m) is int for m in dims):
        # The usual case, cached: training repeats it (torch.compile traces the check instead).
        check = _checked_int_dims.__wrapped__ if torch.compiler.is_compiling() else _checked_int_dims
        return check(tuple(dims), full_dim, name)
    if isinstance(dims, torch.Tensor) or _is_array(dims):
        kind = "tensor" if isinstance(dims, torch.Tensor) else "NumPy array"
        if dims.ndim != 1:
            raise TypeError(f"{name} must be a 1-D sequence of ints, got a {dims.ndim}-D {kind}")
        if _is_bool_or_float(dims.dtype):
            raise TypeError(f"{name} must hold ints, got a {kind} of dtype {dims.dtype}")
        dims = dims.tolist()
    return _check_dims_one_by_one(dims, full_dim, name)


def _check_dims_one_by_one(dims, full_dim: int | None, name: str) -> tuple[int, ...]:
    if not isinstance(dims, Sequence) or isinstance(dims, str) or len(dims) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of ints, got {dims!r}")
    out = tuple(check_int(m, f"{name}[{j}]", 1, full_dim) for j, m in enumerate(dims))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated entries: {list(out)}")
    return out


@functools.lru_cache(maxsize=256)
def _checked_int_dims(dims: tuple[int, ...], full_dim: int | None, name: str) -> tuple[int, ...]:
    if not (1 <= min(dims) and (full_dim is None or max(dims) <= full_dim) and len(set(dims)) == len(dims)):
        return _check_dims_one_by_one(dims, full_dim, name)  # raises, with the message that names the entry
    return dims


def _is_array(value) -> bool:
    """A numpy array (or anything else with the array protocol's ndim, dtype and tolist), without importing
    numpy."""
    return all(hasattr(value, attr) for attr in ("ndim", "dtype", "tolist", "__array__"))


def _is_bool_or_float(dtype) -> bool:
    if isinstance(dtype, torch.dtype):
        return dtype == torch.bool or dtype.is_floating_point or dtype.is_complex
    return getattr(dtype, "kind", "i") in "bfc"  # numpy: bool, float, complex


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_finite(value, name: str, positive: bool = False, low: float | None = None,
                 high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_dim_weights(dim_weights, n_dims: int) -> tuple[float, ...]:
    """Per-dim loss weights (default all ones): finite reals, one per dim."""
    if dim_weights is None:
        return (1.0,) * n_dims
    if isinstance(dim_weights, torch.Tensor):
        dim_weights = dim_weights.tolist()
    if not isinstance(dim_weights, Sequence) or len(dim_weights) != n_dims:
        raise ValueError(f"dim_weights must have one entry per dim ({n_dims}), got {dim_weights!r}")
    return tuple(check_finite(w, f"dim_weights[{j}]") for j, w in enumerate(dim_weights))


def _holds(condition: torch.Tensor, message: str) -> bool:
    """Whether a data-dependent check passed. Under torch.compile a Python branch on tensor values would
    break the graph, so there the check becomes an assertion that fails when the graph runs."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
        return True
    return bool(condition)


def check_all_finite(t: torch.Tensor, name: str) -> None:
    if not _holds(torch.isfinite(t).all(), f"{name} contains NaN or Inf"):
        raise ValueError(f"{name} contains NaN or Inf")


def check_labels(labels, name: str, n: int, n_classes: int, like: torch.Tensor, like_name: str,
                 ignore_index: int | None = None) -> torch.Tensor:
    """Integer class indices of shape [n], each in [0, n_classes) or equal to ignore_index."""
    check_tensor(labels, name, ndim=1, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
    if labels.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(labels.shape)}")
    check_like(labels, name, like, like_name, dtype=False)
    if not torch.compiler.is_compiling():
        # One reduction and one read-back (one device sync) settle the usual case, every label a class; only
        # a batch with ignored rows or a bad label pays for the elementwise check below.
        low, high = torch.aminmax(labels)
        low, high = (low.item(), high.item()) if labels.is_cpu else torch.stack((low, high)).tolist()
        if 0 <= low and high < n_classes:
            return labels.long()
    allowed = f"[0, {n_classes})" + (f" or ignore_index={ignore_index}" if ignore_index is not None else "")
    valid = (labels >= 0) & (labels < n_classes)
    if ignore_index is not None:
        valid |= labels == ignore_index
    if not _holds(valid.all(), f"{name} has entries outside {allowed}"):
        raise ValueError(f"{name} has entry {labels[~valid][0].item()} outside {allowed}")
    return labels.long()
