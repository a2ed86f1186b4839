"""A namespace that array-api-compat does not know, whose arrays hide the batch size.

``Shapeless`` wraps a NumPy array and reports ``None`` for the first dimension of every
array with at least 2 dims, as a traced ``tf.function`` does for an unknown batch size; the
namespace delegates to array-api-compat's NumPy. It stands in for the small namespace that
the Keras adapter hands the core through ``xp=``: the core must get by with ``xp`` alone
(never asking array-api-compat about these arrays) and take the count from the array.
``CALLS`` records which namespace functions the core used.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import array_api_compat.numpy as np_xp
import numpy as np

CALLS: Counter[str] = Counter()


def _raw(v: Any) -> Any:
    if isinstance(v, Shapeless):
        return v.a
    if isinstance(v, (list, tuple)):
        return type(v)(_raw(u) for u in v)
    return v


def _wrap(v: Any) -> Any:
    if isinstance(v, np.ndarray | np.generic) and not isinstance(v, np.dtype):
        return Shapeless(np.asarray(v))
    return v


class Shapeless:
    """A NumPy array whose static shape reads ``None`` for the batch dimension."""

    __slots__ = ("a",)

    def __init__(self, a: Any) -> None:
        self.a = np.asarray(a)

    @property
    def shape(self) -> tuple[int | None, ...]:
        s = self.a.shape
        return (None, *s[1:]) if len(s) >= 2 else s

    @property
    def ndim(self) -> int:
        return self.a.ndim

    @property
    def dtype(self) -> Any:
        return self.a.dtype

    @property
    def device(self) -> str:
        return "cpu"

    def __getitem__(self, key: Any) -> Shapeless:
        return Shapeless(self.a[_raw(key)])

    def __float__(self) -> float:
        return float(self.a)

    def __int__(self) -> int:
        return int(self.a)

    def __bool__(self) -> bool:
        return bool(self.a)

    def __invert__(self) -> Shapeless:
        return Shapeless(~self.a)

    def __neg__(self) -> Shapeless:
        return Shapeless(-self.a)

    def __repr__(self) -> str:
        return f"Shapeless({self.a!r})"


def _binary(op: Any, reflected: bool = False) -> Any:
    def method(self: Shapeless, other: Any) -> Shapeless:
        a, b = self.a, _raw(other)
        return Shapeless(op(b, a) if reflected else op(a, b))

    return method


for _name, _op in {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "pow": operator.pow,
}.items():
    setattr(Shapeless, f"__{_name}__", _binary(_op))
    setattr(Shapeless, f"__r{_name}__", _binary(_op, reflected=True))
    setattr(Shapeless, f"__i{_name}__", _binary(_op))  # a new array, as immutable libraries do
for _name in ("lt", "le", "gt", "ge", "eq", "ne", "and", "or"):
    setattr(Shapeless, f"__{_name}__", _binary(getattr(operator, f"__{_name}__")))


class ShapelessNamespace:
    """Array API functions over :class:`Shapeless` arrays (NumPy underneath)."""

    __name__ = "shapeless"

    def __getattr__(self, name: str) -> Any:
        target = getattr(np_xp, name)
        if not callable(target) or name in ("isdtype", "finfo", "iinfo"):
            return target
        if isinstance(target, type):  # dtypes
            return target

        def function(*args: Any, **kwargs: Any) -> Any:
            CALLS[name] += 1
            out = target(*_raw(args), **{k: _raw(v) for k, v in kwargs.items()})
            if isinstance(out, tuple):
                return tuple(_wrap(o) for o in out)
            return _wrap(out)

        return function


xp = ShapelessNamespace()
