"""The argument rules of the whole package, in one place (docs/spec.md §9).

Every public function that takes a number validates it with these helpers, so one rule gives
one outcome everywhere:

* a **host real** is a Python or NumPy real number (``0.9``, ``np.float32(0.9)``, ``1``,
  ``np.int64(1)``); ``bool``/``np.bool_``, strings, ``None``, complex numbers and arrays are
  not: they raise ``TypeError``;
* a value of the right type but outside its range (NaN and infinities included, unless a rule
  says otherwise) raises ``ValueError``;
* a **decay** is a host real in ``[0, 1]`` (weight on history); an **update rate** is the
  same interval read the other way (weight on the new batch, ``1 - decay``);
* the compute functions also take a 0-d array as a decay (runtime state: a torch tensor, a
  jax tracer). It is never read on the host (that would be a device sync, or impossible
  under tracing), so it is the caller's to keep in ``[0, 1]`` (:func:`check_decay_arg`).

>>> check_decay("decay", np.float32(0.5))
0.5
>>> check_decay("decay", True)
Traceback (most recent call last):
    ...
TypeError: decay must be a real number, got True
>>> check_decay("lam", 1.5)  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
ValueError: lam must be a decay (weight on history) in [0, 1], got 1.5; an update rate u ...
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "as_real_array",
    "check_decay",
    "check_decay_arg",
    "check_decays",
    "check_int",
    "check_nonnegative",
    "check_positive",
    "check_real",
    "check_update_rate",
    "is_real_scalar",
]

_DECAY_HINT = "an update rate u (PyTorch's momentum) corresponds to the decay 1 - u"
_UPDATE_RATE_HINT = "a decay d (weight on history) corresponds to the update rate 1 - d"


def is_real_scalar(v: object) -> bool:
    """Whether ``v`` is a real number given as a host scalar (Python or NumPy).

    ``bool`` and ``np.bool_`` are not numbers here, and arrays (even 0-d ones) are not
    scalars: they may live on a device, and reading them would be a sync.

    >>> [is_real_scalar(v) for v in (1, 0.5, np.float32(0.5), np.int8(3), float("nan"))]
    [True, True, True, True, True]
    >>> [is_real_scalar(v) for v in (True, np.bool_(True), "1", None, 1j, np.array(0.5))]
    [False, False, False, False, False, False]
    """
    if type(v) in (float, int):  # the common case, without the ABC machinery
        return True
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _type_error(name: str, value: object, what: str = "a real number") -> TypeError:
    return TypeError(f"{name} must be {what}, got {value!r}")


def check_real(name: str, value: object, *, finite: bool = True) -> float:
    """``value`` as a ``float`` if it is a host real (finite unless ``finite=False``).

    Raises
    ------
    TypeError
        ``value`` is not a host real number (``bool``, a string, ``None``, an array...).
    ValueError
        ``finite`` and ``value`` is NaN or infinite.

    >>> check_real("rate", np.float64(0.5))
    0.5
    >>> check_real("metric", float("nan"), finite=False)
    nan
    >>> check_real("rate", float("inf"))
    Traceback (most recent call last):
        ...
    ValueError: rate must be finite, got inf
    """
    if not is_real_scalar(value):
        raise _type_error(name, value)
    out = float(value)  # type: ignore[arg-type]  # a numbers.Real
    # a comparison, not math.isfinite: under torch.compile(dynamic=True) a Python float
    # argument (eps) is a symbolic float, which comparisons support and math.* does not
    if finite and not -math.inf < out < math.inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def check_positive(name: str, value: object) -> float:
    """A finite host real ``> 0``.

    >>> check_positive("eps", 1e-5)
    1e-05
    >>> check_positive("batch_size", 0)
    Traceback (most recent call last):
        ...
    ValueError: batch_size must be > 0, got 0
    """
    out = check_real(name, value)
    if not out > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out


def check_nonnegative(name: str, value: object) -> float:
    """A finite host real ``>= 0``.

    >>> check_nonnegative("step_up", 0)
    0.0
    """
    out = check_real(name, value)
    if not out >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return out


def _check_unit(name: str, value: object, what: str, hint: str) -> float:
    out = check_real(name, value, finite=False)
    if not 0.0 <= out <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be {what} in [0, 1], got {value!r}; {hint}")
    return out


def check_decay(name: str, value: object) -> float:
    """A decay (weight on history): a host real in ``[0, 1]``, as a ``float``.

    Raises
    ------
    TypeError
        ``value`` is not a host real number.
    ValueError
        ``value`` is outside ``[0, 1]`` or NaN; the message recalls that an update rate
        ``u`` corresponds to the decay ``1 - u``.

    >>> check_decay("tau", 1)
    1.0
    """
    return _check_unit(name, value, "a decay (weight on history)", _DECAY_HINT)


def check_update_rate(name: str, value: object) -> float:
    """An update rate (weight on the new batch, PyTorch's ``momentum``) as a ``float``.

    A host real in ``[0, 1]``; errors as :func:`check_decay`.

    >>> check_update_rate("momentum", np.float32(0.25))
    0.25
    """
    return _check_unit(name, value, "an update rate (weight on the new batch)", _UPDATE_RATE_HINT)


def check_decay_arg(name: str, value: object, *, allow_none: bool = False) -> None:
    """A decay argument of a compute function (``bn_forward``'s ``decay``, MBN's ``lam``).

    - a host real is checked with :func:`check_decay`;
    - a 0-d array (runtime state: a NumPy or torch 0-d array, a jax tracer) passes unchecked,
      it is never read on the host; an array of another shape is a ``ValueError``, a boolean
      or complex one a ``TypeError``;
    - ``None`` (the cumulative average, where the function has one) passes only when
      ``allow_none``, else ``ValueError``;
    - anything else (``bool``, strings...) is a ``TypeError``.

    >>> check_decay_arg("decay", np.float32(0.9))
    >>> check_decay_arg("lam", np.asarray(0.5))            # runtime state: not read
    >>> check_decay_arg("lam", None)
    Traceback (most recent call last):
        ...
    ValueError: lam must be a decay (weight on history) in [0, 1], got None
    """
    if value is None:
        if not allow_none:
            raise ValueError(f"{name} must be a decay (weight on history) in [0, 1], got None")
        return
    if isinstance(value, (bool, np.bool_)) or not hasattr(value, "shape"):
        check_decay(name, value)
        return
    if isinstance(value, np.generic):  # a NumPy scalar of another kind (complex, str...)
        check_decay(name, value)
        return
    shape = tuple(value.shape)
    if shape != ():
        raise ValueError(
            f"{name} must be a scalar decay (a host number or a 0-d array), got an array of "
            f"shape {shape}"
        )
    dtype = getattr(value, "dtype", None)
    kind = _dtype_kind(dtype)
    if kind in ("bool", "complex"):
        raise _type_error(name, value, f"a real decay, not a {kind} array")


def _dtype_kind(dtype: object) -> str:
    """``"bool"``, ``"complex"`` or ``"other"`` for a dtype of any namespace (metadata only)."""
    text = str(dtype).lower()
    if text.endswith("bool") or text.endswith("bool_"):
        return "bool"
    if "complex" in text:
        return "complex"
    return "other"


def check_int(name: str, value: object, *, minimum: int) -> int:
    """An integer (Python or NumPy, not ``bool``) ``>= minimum``, as an ``int``.

    >>> check_int("warmup_steps", np.int64(3), minimum=1)
    3
    >>> check_int("m", 2.0, minimum=1)
    Traceback (most recent call last):
        ...
    TypeError: m must be an integer, got 2.0
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise _type_error(name, value, "an integer")
    out = int(value)
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def as_real_array(name: str, value: object) -> NDArray[np.float64]:
    """A host scalar or array-like of real numbers as float64 (NaN and inf pass).

    The vectorized functions (:mod:`mbn_ref.noise`) take NumPy arrays and lists as well as
    scalars; the element rule is :func:`is_real_scalar`'s: booleans, strings, ``None`` and
    complex numbers raise ``TypeError`` (``np.asarray`` would quietly turn ``"0.9"`` into
    0.9 and ``True`` into 1).

    >>> as_real_array("m", [2, 4]).tolist()
    [2.0, 4.0]
    >>> as_real_array("m", "4")
    Traceback (most recent call last):
        ...
    TypeError: m must be a real number or an array of real numbers, got '4'
    """
    if is_real_scalar(value):
        return np.asarray(float(value), dtype=np.float64)  # type: ignore[arg-type]
    error = _type_error(name, value, "a real number or an array of real numbers")
    if value is None or isinstance(value, (str, bytes, bool, np.bool_)):
        raise error
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):  # ragged nesting, objects NumPy cannot take
        raise error from None
    if arr.dtype.kind not in "iuf":  # bool, complex, strings, objects, datetimes...
        raise error
    return arr.astype(np.float64, copy=False)


def check_decays(name: str, value: object) -> NDArray[np.float64]:
    """Decays given as a host scalar or array-like: float64, every element in ``[0, 1]``.

    A scalar follows :func:`check_decay` exactly (same errors and messages).

    >>> check_decays("lam", [0.0, np.float32(0.5), 1]).tolist()
    [0.0, 0.5, 1.0]
    """
    if is_real_scalar(value):
        return np.asarray(check_decay(name, value), dtype=np.float64)
    arr = as_real_array(name, value)
    if not np.all((arr >= 0.0) & (arr <= 1.0)):  # also rejects NaN
        raise ValueError(
            f"{name} must be a decay (weight on history) in [0, 1], got {value!r}; {_DECAY_HINT}"
        )
    return arr
