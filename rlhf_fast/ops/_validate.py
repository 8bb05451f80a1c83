"""Argument checks shared by the public ops: each raises ValueError/TypeError naming the
argument and what was expected. Data-dependent checks (label range) are eager on CPU,
device-side asserts on GPU (no host sync), and skipped while torch.compile traces."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Iterable, Optional, Sequence

import torch

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
FLOAT32_MAX = 3.4028234663852886e38

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def tensor(name: str, x, *, floating: bool = False, integer: bool = False, ndim: Optional[int] = None,
           min_ndim: Optional[int] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if integer and x.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64 preferred), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}")


def mask(name: str, m, shape: Sequence[int]) -> None:
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool or 0/1), got {type(m).__name__}")
    if m.dtype.is_complex:
        raise TypeError(f"{name} must be bool or 0/1, got {m.dtype}")
    # torch.Size is a tuple: compared as it is (these checks run on every op call, where a
    # few microseconds of Python are a good part of a small op's time)
    if m.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(m.shape)}")


def same_shape(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    ref = tensors[0].shape
    for i in range(1, len(tensors)):
        if tensors[i].shape != ref:
            raise ValueError(f"{names[i]} must have the shape of {names[0]} {tuple(ref)}, "
                             f"got {tuple(tensors[i].shape)}")


def same_device(names: Sequence[str], tensors: Iterable[Optional[torch.Tensor]]) -> None:
    dev = first = None
    for n, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            continue
        if dev is None:
            dev, first = t.device, n
        elif t.device != dev:
            raise ValueError(f"{n} is on {t.device} but {first} is on {dev}; put all inputs on one device")


def labels_in_range(name: str, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if _compiling() or labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.device.type == "cpu":
        if bool(bad.any()):
            v = labels[bad][0].item()
            raise ValueError(f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {v}")
    else:
        torch._assert_async(~bad.any(), f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}")


def temperature(t, *, allow_zero: bool = False) -> float:
    """Checks ``t`` and returns it as a float (an int beyond float64 is refused here rather
    than overflowing inside a backend). Any real number but a bool is accepted: numpy's
    scalars (np.int64, np.float32) come from configs and arrays."""
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(t).__name__}")
    # inf is refused with NaN: -inf logits over an infinite temperature are NaN, and the T → inf
    # limit (uniform over the finite logits) is not what any caller means. So is a T beyond
    # float32's largest value, which the kernels compute with as inf (NaN log-probs).
    if t < 0 or (t == 0 and not allow_zero) or t != t or t > FLOAT32_MAX:
        want = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"temperature must be a finite number {want} (at most {FLOAT32_MAX:.4g}, float32's "
                         f"largest), got {t}")
    return as_float("temperature", t)


def as_float(name: str, value) -> float:
    """``float(value)`` for a number already checked, naming ``name`` when an int is too
    large for a float64 (10**400), which backends would otherwise fail on with OverflowError."""
    if type(value) is float:
        return value
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be representable as a float64, got an int of "
                         f"{value.bit_length()} bits") from None


def int_like(value):
    """``value`` as a Python int when it is an integer of another type (numpy's, read from a
    config); anything else (bool, float, str, a tensor) unchanged, for the caller's own check."""
    if type(value) is int or isinstance(value, (bool, torch.Tensor)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def real_like(value):
    """``value`` as a Python int / float when it is a number of another type (numpy's np.float32,
    np.int64: a config array's entry, a schedule), as :func:`temperature` takes them; anything
    else (None, bool, int, float, a tensor, a str) unchanged, for the caller's own check."""
    if value is None or type(value) in (int, float) or isinstance(value, (bool, torch.Tensor)):
        return value
    value = int_like(value)
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return float(value)  # (numpy's bool is no numbers.Real: it stays a bool-like refusal)
    return value


def group_size(value, n: int) -> int:
    """``value`` as the group size of ``n`` scores: a positive int (numpy's too, not bool) in the
    int64 range that divides ``n``; returned as a Python int. ValueError naming group_size."""
    value = int_like(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"group_size must be a positive int, got {value!r}")
    if value > INT64_MAX:
        raise ValueError(f"group_size must be at most 2**63 - 1, got {value}")
    if n % value != 0:
        raise ValueError(f"group_size={value} must divide the number of scores B={n}")
    return value


def integer(name: str, value, *, minimum: Optional[int] = None) -> int:
    """An int (numpy integers too, not bool) in the int64 range, at least ``minimum``;
    returned as a Python int."""
    if type(value) is not int:
        if isinstance(value, bool) or isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < INT64_MIN or value > INT64_MAX or (minimum is not None and value < minimum):
        lo = INT64_MIN if minimum is None else minimum
        raise ValueError(f"{name} must be an int in [{lo}, 2**63 - 1], got {value}")
    return value


def flag(name: str, value) -> bool:
    """A bool (or numpy bool); strings, None and tensors are refused rather than read as truthy."""
    if type(value) is bool:
        return value
    if type(value).__name__ == "bool_" and type(value).__module__ == "numpy":
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def coefficient(name: str, value) -> None:
    """A finite real number, or a 1-element floating tensor (e.g. an adaptive coefficient
    kept on the device; its value is not read)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a finite number or a 1-element floating tensor, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")
        return
    finite(name, value)


def finite(name: str, value, bound: Optional[str] = None) -> float:
    """``value`` as a float: a real number (not a bool), finite (an int too large for a
    float64 is not), and, with ``bound`` "> 0" or ">= 0", in that range; else ValueError
    naming ``name``. Shared by the ops, the algorithms and the RL config checks."""
    v = None
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            v = float(value)
        except OverflowError:  # an int of more than ~1024 bits
            v = None
    if v is None or not math.isfinite(v) or (bound == "> 0" and not v > 0) or (bound == ">= 0" and not v >= 0):
        raise ValueError(f"{name} must be a finite number{' ' + bound if bound else ''}, got {value!r}")
    return v


def dual_clip(value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1.0:
        raise ValueError(f"dual_clip must be a number > 1 or None, got {value!r}")
    as_float("dual_clip", value)


def choice(name: str, value, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")


def nonneg(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if type(value) is int and value > 2 ** 1023:
        as_float(name, value)


def linear_head(hidden, weight, bias, *, names: Sequence[str] = ("hidden", "weight", "bias"),
                hidden_ndim: int = 2) -> None:
    """An LM head's inputs: ``hidden`` ``[..., H]`` floating (``hidden_ndim`` dims), ``weight``
    ``[V, H]`` and ``bias`` ``[V]`` (or None) of hidden's dtype (the logits' dtype is hidden's on
    every backend). ``names``: the three arguments' names in the messages."""
    h, w, b = names
    tensor(h, hidden, floating=True, ndim=hidden_ndim)
    tensor(w, weight, floating=True, ndim=2)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w} must have the dtype of {h} ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{w} must have shape [V, H] with H = {h}.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        tensor(b, bias, floating=True, ndim=1)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b} must have the dtype of {h} ({hidden.dtype}), got {bias.dtype}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{b} must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")


def chunk_size(value, rows: int) -> Optional[int]:
    """A positive int or None; a chunk of more rows than the ``rows`` there are is the whole
    batch (so a huge value never reaches a kernel's int64 argument)."""
    if value is None:
        return None
    value = int_like(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {value!r}")
    return min(value, max(1, rows))
