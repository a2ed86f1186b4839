r"""The small Array API namespace over TensorFlow ops that the core runs on.

TensorFlow is not among array-api-compat's libraries, so the layers hand the core
(:func:`mbn_ref.mbn_forward`, :func:`mbn_ref.bn_forward`, :func:`mbn_ref.backward`) this
module through ``xp=``, as einops' ``_backends.py`` wraps each framework. It holds exactly
what the core calls (``grep -n "xp\.[a-z_]*" mbn_ref/*.py``; ``tests/_shapeless.py`` is the
same namespace over NumPy) plus the few functions :mod:`mbn_ref.distributed` adds, each a
thin call of one TensorFlow op. Tensors are immutable, so the core's in-place updates
(``y *= scale``) make new tensors, which is what the standard allows.

Shapes may hold ``None`` (a batch size unknown while a ``tf.function`` traces): the core
then takes the count from the array (docs/spec.md §9.2); nothing here reads a tensor's
value on the host. ``device=`` arguments are accepted and ignored: TensorFlow places ops
itself (inside a ``tf.function`` a tensor's ``device`` is ``""``).

>>> import tensorflow as tf
>>> import mbn_ref as mr
>>> from mbn_tf import _namespace as xp
>>> x = tf.constant([[1.0], [3.0]])
>>> state = mr.BNState(tf.zeros(1), tf.ones(1), tf.constant(0, tf.int64))
>>> y, state, ctx = mr.bn_forward(x, state, decay=0.9, axis=1, xp=xp)
>>> [round(v, 4) for v in y[:, 0].numpy().tolist()], state.running_mean.numpy().tolist()
([-1.0, 1.0], [0.20000000298023224])
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import tensorflow as tf

__all__ = [
    "all",
    "any",
    "asarray",
    "astype",
    "bfloat16",
    "bool",
    "concat",
    "finfo",
    "float16",
    "float32",
    "float64",
    "int32",
    "int64",
    "isdtype",
    "isfinite",
    "logical_and",
    "max",
    "maximum",
    "ones",
    "ones_like",
    "reshape",
    "sqrt",
    "stack",
    "sum",
    "where",
    "zeros",
    "zeros_like",
]

__array_api_version__ = "2023.12"

float16 = tf.float16
bfloat16 = tf.bfloat16
float32 = tf.float32
float64 = tf.float64
int32 = tf.int32
int64 = tf.int64
bool = tf.bool

_KINDS = {
    "bool": lambda d: d == tf.bool,
    "signed integer": lambda d: d.is_integer and not d.is_unsigned,
    "unsigned integer": lambda d: d.is_integer and d.is_unsigned,
    "integral": lambda d: d.is_integer,
    "real floating": lambda d: d.is_floating,
    "complex floating": lambda d: d.is_complex,
    "numeric": lambda d: d.is_integer or d.is_floating or d.is_complex,
}


def isdtype(dtype: Any, kind: Any) -> builtins.bool:
    """Whether ``dtype`` is of ``kind``: a kind name, a dtype, or a tuple of them.

    >>> isdtype(tf.bfloat16, "real floating"), isdtype(tf.int64, ("bool", "integral"))
    (True, True)
    """
    d = tf.as_dtype(dtype)
    if isinstance(kind, tuple):
        return builtins.any(isdtype(d, k) for k in kind)
    if isinstance(kind, str):
        if kind not in _KINDS:
            raise ValueError(f"unknown dtype kind {kind!r}; expected one of {sorted(_KINDS)}")
        return builtins.bool(_KINDS[kind](d))  # type: ignore[no-untyped-call]
    return builtins.bool(d == tf.as_dtype(kind))


class finfo_object(NamedTuple):
    """Machine limits of a floating dtype, as the Array API's ``finfo`` returns them."""

    bits: int
    eps: float
    max: float
    min: float
    smallest_normal: float
    dtype: Any


def finfo(dtype: Any) -> finfo_object:
    """Machine limits of a floating dtype (bfloat16 included, through ``ml_dtypes``).

    >>> finfo(tf.bfloat16).bits, finfo(tf.float64).bits
    (16, 64)
    """
    d = tf.as_dtype(dtype)
    info = ml_dtypes.finfo(np.dtype(d.as_numpy_dtype))  # type: ignore[no-untyped-call]
    return finfo_object(
        bits=int(info.bits),
        eps=float(info.eps),
        max=float(info.max),
        min=float(info.min),
        smallest_normal=float(info.smallest_normal),
        dtype=d,
    )


class _Info:
    """What ``__array_namespace_info__()`` returns: the namespace's default dtypes."""

    def default_dtypes(self, *, device: Any = None) -> dict[str, Any]:
        return {
            "real floating": tf.float32,
            "complex floating": tf.complex64,
            "integral": tf.int64,
            "indexing": tf.int64,
        }

    def devices(self) -> list[str]:
        return [d.name for d in tf.config.list_logical_devices()]


def __array_namespace_info__() -> _Info:
    """The namespace's inspection object (default dtypes, devices)."""
    return _Info()


def asarray(obj: Any, /, *, dtype: Any = None, device: Any = None, copy: Any = None) -> Any:
    """A tensor of ``obj`` (a number, a sequence, an array or a tensor), cast to ``dtype``."""
    if tf.is_tensor(obj) or isinstance(obj, tf.Variable):
        return obj if dtype is None else tf.cast(obj, dtype)
    return tf.convert_to_tensor(obj, dtype=dtype)


def astype(x: Any, dtype: Any, /, *, copy: builtins.bool = True, device: Any = None) -> Any:
    """``x`` cast to ``dtype`` (tensors are immutable: a "copy" may be ``x`` itself)."""
    return tf.cast(x, dtype)


def reshape(x: Any, /, shape: Sequence[int], *, copy: Any = None) -> Any:
    """``x`` with a new shape (one entry may be -1)."""
    return tf.reshape(x, shape)


def sum(x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: builtins.bool = False) -> Any:
    """The sum over ``axis`` (an int, a tuple, or ``None`` for every axis)."""
    if dtype is not None:
        x = tf.cast(x, dtype)
    return tf.reduce_sum(x, axis=_axes(axis), keepdims=keepdims)


def max(x: Any, /, *, axis: Any = None, keepdims: builtins.bool = False) -> Any:
    """The maximum over ``axis``."""
    return tf.reduce_max(x, axis=_axes(axis), keepdims=keepdims)


def all(x: Any, /, *, axis: Any = None, keepdims: builtins.bool = False) -> Any:
    """Whether every element over ``axis`` is true."""
    return tf.reduce_all(tf.cast(x, tf.bool), axis=_axes(axis), keepdims=keepdims)


def any(x: Any, /, *, axis: Any = None, keepdims: builtins.bool = False) -> Any:
    """Whether some element over ``axis`` is true."""
    return tf.reduce_any(tf.cast(x, tf.bool), axis=_axes(axis), keepdims=keepdims)


def _axes(axis: Any) -> Any:
    return list(axis) if isinstance(axis, tuple) else axis


def _tensor_pair(x1: Any, x2: Any) -> tuple[Any, Any]:
    """Two operands, a Python number taking the other's dtype (the Array API's rule)."""
    if not tf.is_tensor(x1) and not isinstance(x1, tf.Variable):
        x1 = tf.convert_to_tensor(x1, dtype=tf.convert_to_tensor(x2).dtype)
    if not tf.is_tensor(x2) and not isinstance(x2, tf.Variable):
        x2 = tf.convert_to_tensor(x2, dtype=tf.convert_to_tensor(x1).dtype)
    return x1, x2


def where(condition: Any, x1: Any, x2: Any, /) -> Any:
    """Elementwise ``x1`` where ``condition`` holds, else ``x2`` (broadcasting)."""
    x1, x2 = _tensor_pair(x1, x2)
    return tf.where(condition, x1, x2)


def maximum(x1: Any, x2: Any, /) -> Any:
    """The elementwise maximum (broadcasting)."""
    x1, x2 = _tensor_pair(x1, x2)
    return tf.maximum(x1, x2)


def logical_and(x1: Any, x2: Any, /) -> Any:
    """The elementwise logical and."""
    return tf.logical_and(x1, x2)


def isfinite(x: Any, /) -> Any:
    """Whether each element is finite (neither NaN nor infinite)."""
    return tf.math.is_finite(x)


def sqrt(x: Any, /) -> Any:
    """The elementwise square root."""
    return tf.sqrt(x)


def concat(arrays: Sequence[Any], /, *, axis: int | None = 0) -> Any:
    """The arrays joined along ``axis`` (``None``: flattened first)."""
    if axis is None:
        return tf.concat([tf.reshape(a, [-1]) for a in arrays], 0)
    return tf.concat(list(arrays), axis)


def stack(arrays: Sequence[Any], /, *, axis: int = 0) -> Any:
    """The arrays stacked along a new ``axis``."""
    return tf.stack(list(arrays), axis)


def zeros(shape: Any, *, dtype: Any = None, device: Any = None) -> Any:
    """A tensor of zeros (default dtype float32)."""
    return tf.zeros(shape, dtype=tf.float32 if dtype is None else dtype)


def ones(shape: Any, *, dtype: Any = None, device: Any = None) -> Any:
    """A tensor of ones (default dtype float32)."""
    return tf.ones(shape, dtype=tf.float32 if dtype is None else dtype)


def zeros_like(x: Any, /, *, dtype: Any = None, device: Any = None) -> Any:
    """Zeros of ``x``'s shape (its static or run-time shape) and dtype, or ``dtype``."""
    return tf.zeros_like(x, dtype=dtype)


def ones_like(x: Any, /, *, dtype: Any = None, device: Any = None) -> Any:
    """Ones of ``x``'s shape (its static or run-time shape) and dtype, or ``dtype``."""
    return tf.ones_like(x, dtype=dtype)
