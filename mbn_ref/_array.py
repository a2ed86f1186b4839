"""Array API plumbing shared by the core: namespaces, dtypes, channel axes, broadcasting.

Nothing here is math; it is the glue that lets the same functions run on NumPy, CuPy,
PyTorch tensors, JAX and ``array-api-strict``, or on any namespace handed in as ``xp``
(docs/spec.md §7: statistics accumulate in at least float32, results come back in the input
dtype, arrays are created on the input's device).
"""

from __future__ import annotations

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
:func:`mbn_ref.distributed.simulate`'s threads). One that carries the attribute
``keeps_count_on_device = True`` (e.g. inside a compiler's trace) has the global count kept
an array, never read on the host (see :func:`keeps_count_on_device`)."""


def keeps_count_on_device(all_sum: AllSum) -> bool:
    """Whether the global count summed by ``all_sum`` stays an array (docs/spec.md §5).

    Normally the core reads the global count on the host once per step (one sync, like
    PyTorch's ``SyncBatchNorm``), which lets it refuse a global batch of one value per
    channel and return early for an empty one. A collective used inside a compiler's trace
    asks for the count to stay an array: it is then a count known only at run time
    (docs/spec.md §9: an empty global batch changes nothing through selects, one value per
    channel is not refused).
    """
    return bool(getattr(all_sum, "keeps_count_on_device", False))


def namespace(*arrays: Any) -> Namespace:
    """The Array API namespace of ``arrays`` (``None`` and Python scalars are ignored)."""
    present = [a for a in arrays if a is not None and not isinstance(a, (int, float, bool))]
    return array_api_compat.array_namespace(*present)


def resolve_namespace(xp: Any | None) -> Namespace:
    """Turn a user's ``xp`` into an Array API namespace; ``None`` means NumPy.

    Array libraries that array-api-compat knows (``numpy``, ``torch``, ``cupy``,
    ``jax.numpy``, their compat namespaces) are wrapped as array-api-compat does; any other
    namespace (e.g. an adapter's namespace over TensorFlow ops) is used as it is. A compat
    namespace is returned at once: no array is made, so a compiler tracing an adapter's
    ``xp=array_api_compat.torch`` call traces nothing here.
    """
    if xp is None:
        xp = np
    if getattr(xp, "__name__", "").startswith("array_api_compat."):
        return xp
    try:
        return array_api_compat.array_namespace(xp.asarray(0.0))
    except TypeError:
        return xp


def device_of(x: Array) -> Any:
    """The device ``x`` lives on, for ``device=`` on every array creation."""
    return array_api_compat.device(x)


def check_float_input(xp: Namespace, x: Array, name: str = "x") -> None:
    """``TypeError`` unless ``x`` has a real floating dtype (docs/spec.md §9)."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {x.dtype}; convert it explicitly, e.g. x.astype(float32)"
        )


def compute_dtype(xp: Namespace, dtype: Any) -> Any:
    """Accumulation dtype for inputs of ``dtype``: at least float32 (docs/spec.md §7)."""
    if xp.finfo(dtype).bits < 32:
        return xp.float32
    return dtype


def default_float_dtype(xp: Namespace, device: Any = None) -> Any:
    """The namespace's default real floating dtype (float64 for NumPy, float32 for torch)."""
    info = xp.__array_namespace_info__()
    return info.default_dtypes(device=device)["real floating"]


def normalize_axis(ndim: int, axis: int, shape: tuple[int, ...]) -> int:
    """Channel axis as a non-negative index; ``ValueError`` for a bad rank or axis.

    See docs/spec.md §9.
    """
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


def is_array(v: Any) -> bool:
    """Whether ``v`` is an array.

    As opposed to a host number (Python, NumPy scalar) or a framework's symbolic integer
    (which tracers such as torch.compile's report as ``int``).
    """
    if isinstance(v, (numbers.Number, np.generic)):
        return False
    return hasattr(v, "shape") and hasattr(v, "dtype")


def reduced_count(xp: Namespace, x: Array, axis: int, dtype: Any) -> int | Array:
    """Values per channel, ``m`` (N times the spatial size).

    A Python integer (or a framework's symbolic integer) when the static shape has every
    dimension. A dimension of ``None`` (a batch size known only at run time, as under
    ``tf.function``) gives a 0-d array of ``dtype``, counted on one channel's slice.
    """
    count = 1
    known = True
    for i, size in enumerate(x.shape):
        if i == axis:
            continue
        if size is None:
            known = False
        else:
            count *= size
    if known or count == 0:
        return count
    index = tuple(slice(0, 1) if i == axis else slice(None) for i in range(x.ndim))
    return xp.sum(xp.ones_like(x[index], dtype=dtype))


def as_channel(xp: Namespace, v: Array, ndim: int, axis: int) -> Array:
    """Reshape a per-channel vector of length C so that it broadcasts along ``axis``."""
    shape = [1] * ndim
    shape[axis] = -1
    return xp.reshape(v, tuple(shape))
