"""Array API plumbing shared by the core: namespaces, dtypes, channel axes, broadcasting.

Nothing here is math; it is the glue that lets the same functions run on NumPy, CuPy,
PyTorch tensors and ``array-api-strict`` (SPEC §7: statistics accumulate in at least float32,
results come back in the input dtype, arrays are created on the input's device).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

Array = Any
"""An array of any Array API namespace (the standard has no runtime type to name)."""

Namespace = Any
"""An Array API namespace, as returned by :func:`array_api_compat.array_namespace`."""

AllSum = Callable[[Any], Any]
"""A collective: sums an array across all shards (devices) and returns the total to each
(``torch.distributed.all_reduce``, a ``tf.distribute`` replica context, or
:func:`mbn_ref.distributed.simulate`'s threads)."""


def namespace(*arrays: Any) -> Namespace:
    """The Array API namespace of ``arrays`` (``None`` and Python scalars are ignored)."""
    present = [a for a in arrays if a is not None and not isinstance(a, (int, float, bool))]
    return array_api_compat.array_namespace(*present)


def resolve_namespace(xp: Any | None) -> Namespace:
    """Turn a user's ``xp`` (``None``, ``numpy``, ``torch``, a compat namespace, ...) into an
    Array API namespace; ``None`` means NumPy."""
    if xp is None:
        xp = np
    return array_api_compat.array_namespace(xp.asarray(0.0))


def device_of(x: Array) -> Any:
    """The device ``x`` lives on, for ``device=`` on every array creation."""
    return array_api_compat.device(x)


def check_float_input(xp: Namespace, x: Array, name: str = "x") -> None:
    """``TypeError`` unless ``x`` has a real floating dtype (SPEC §9)."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}; convert it explicitly, e.g. x.astype(float32)"
        )


def compute_dtype(xp: Namespace, dtype: Any) -> Any:
    """Accumulation dtype for inputs of ``dtype``: at least float32 (SPEC §7)."""
    if xp.finfo(dtype).bits < 32:
        return xp.float32
    return dtype


def default_float_dtype(xp: Namespace, device: Any = None) -> Any:
    """The namespace's default real floating dtype (float64 for NumPy, float32 for torch)."""
    info = xp.__array_namespace_info__()
    return info.default_dtypes(device=device)["real floating"]


def normalize_axis(ndim: int, axis: int, shape: tuple[int, ...]) -> int:
    """Channel axis as a non-negative index; ``ValueError`` for a bad rank or axis (SPEC §9)."""
    if ndim < 2:
        raise ValueError(
            f"batch normalization needs an input with at least 2 dims (batch, channels, ...), "
            f"got shape {shape}"
        )
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel axis {axis} is out of range for input of shape {shape}")
    return axis % ndim


def reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis but the channel axis: the axes statistics are reduced over."""
    return tuple(i for i in range(ndim) if i != axis)


def reduced_count(shape: tuple[int, ...], axis: int) -> int:
    """Number of elements per channel, ``m`` (N times the spatial size)."""
    return math.prod(s for i, s in enumerate(shape) if i != axis)


def as_channel(xp: Namespace, v: Array, ndim: int, axis: int) -> Array:
    """Reshape a per-channel vector of length C so that it broadcasts along ``axis``."""
    shape = [1] * ndim
    shape[axis] = -1
    return xp.reshape(v, tuple(shape))


def is_real_scalar(v: Any) -> bool:
    """A real number given as a host scalar (Python or NumPy), as opposed to an array: what
    the core can validate without a device sync."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
