"""Conventions, named and converted explicitly (docs/spec.md §1).

"Momentum" means two opposite things in the wild:

* a **decay** ``d`` is the weight on history, ``s <- d*s + (1-d)*batch``: the paper's
  ``lam`` and ``tau``, Keras', Flax's and ONNX's ``momentum``;
* an **update rate** ``u = 1 - d`` is the weight on the new batch: PyTorch's ``momentum``
  and the ``alpha`` of "Batch Normalization in Neural Networks: A Comprehensive Guide".

The core speaks decays only; these converters are the one place where the two meet.
The running-variance **estimator** is either the biased ``1/m`` variance (the paper,
Keras, Flax, ONNX) or the unbiased ``1/(m-1)`` one (PyTorch); normalization always uses the
biased variance.

>>> decay_from_torch(0.1)
0.9
>>> torch_from_decay(0.99)
0.01
>>> FRAMEWORKS["torch"].decay(0.1)
0.9
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import array_api_compat

from . import _kernels
from ._validate import check_decay, check_int, check_positive, check_update_rate

__all__ = [
    "FRAMEWORKS",
    "Estimator",
    "FrameworkConvention",
    "biased_from_unbiased",
    "cumulative_decay",
    "decay_from_keras",
    "decay_from_torch",
    "decay_from_update_rate",
    "inverse_std",
    "keras_from_decay",
    "torch_from_decay",
    "unbiased_factor",
    "unbiased_from_biased",
    "update_rate_from_decay",
    "validate_decay",
    "validate_estimator",
]

Estimator = Literal["biased", "unbiased"]
"""How a batch's variance enters the running (inference) variance."""

ESTIMATORS: tuple[Estimator, ...] = ("biased", "unbiased")


def _complement(value: float) -> float:
    """``1 - value`` for a validated ``value`` in ``[0, 1]``, rounded to 15 significant digits.

    The rounding makes ``1 - 0.9`` read ``0.1``, not ``0.09999999999999998``.

    The one place where a decay becomes an update rate and back: the schedules
    (:func:`mbn_ref.schedules.from_update_rate`) and the command line call it too.
    """
    return float(f"{1.0 - value:.15g}")


def validate_decay(value: float, name: str = "decay") -> float:
    """``value`` as a ``float`` if it is a decay: a real number in ``[0, 1]`` (docs/spec.md §9).

    Python and NumPy numbers are accepted (``np.float32(0.9)``); ``bool``, strings and
    ``None`` raise ``TypeError``; values outside ``[0, 1]`` and NaN raise ``ValueError``.
    The same rule as every other decay argument of the package.

    Parameters
    ----------
    value : float
        The candidate decay (weight on history).
    name : str, optional
        The argument's name in error messages.

    Returns
    -------
    float
        ``value`` as a Python ``float``.

    Raises
    ------
    TypeError
        ``value`` is not a host real number (``bool``, a string, ``None``...).
    ValueError
        ``value`` is outside ``[0, 1]`` or NaN.

    Examples
    --------
    >>> import numpy as np
    >>> validate_decay(np.float32(0.5))
    0.5
    >>> validate_decay(1.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: decay must be a decay (weight on history) in [0, 1], got 1.5; an update rate ...
    """
    return check_decay(name, value)


def validate_estimator(estimator: str) -> Estimator:
    """``estimator`` if it names a running-variance estimator, else ``ValueError``.

    Parameters
    ----------
    estimator : str
        ``"biased"`` or ``"unbiased"``.

    Returns
    -------
    Estimator
        ``estimator``, unchanged.

    Raises
    ------
    ValueError
        ``estimator`` is neither.

    Examples
    --------
    >>> validate_estimator("unbiased")
    'unbiased'
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return estimator  # type: ignore[return-value]


def decay_from_update_rate(update_rate: float) -> float:
    """Decay ``1 - u`` for an update rate ``u`` (weight on the new batch).

    Rounded to 15 significant digits (``1 - 0.9`` is ``0.1``), and the inverse of
    :func:`update_rate_from_decay` to that precision.

    Parameters
    ----------
    update_rate : float
        The update rate ``u``, a host real in ``[0, 1]``.

    Returns
    -------
    float
        The decay ``1 - u``.

    Raises
    ------
    TypeError
        ``update_rate`` is not a host real number.
    ValueError
        ``update_rate`` is outside ``[0, 1]`` or NaN.

    Examples
    --------
    >>> decay_from_update_rate(0.9)
    0.1
    """
    return _complement(check_update_rate("update_rate", update_rate))


def update_rate_from_decay(decay: float) -> float:
    """Update rate ``1 - d`` for a decay ``d`` (weight on history).

    Rounded like :func:`decay_from_update_rate`.

    Parameters
    ----------
    decay : float
        The decay ``d``, a host real in ``[0, 1]``.

    Returns
    -------
    float
        The update rate ``1 - d``.

    Raises
    ------
    TypeError
        ``decay`` is not a host real number.
    ValueError
        ``decay`` is outside ``[0, 1]`` or NaN.

    Examples
    --------
    >>> update_rate_from_decay(0.9375)
    0.0625
    """
    return _complement(check_decay("decay", decay))


def decay_from_torch(momentum: float) -> float:
    """Decay for PyTorch's ``momentum`` (an update rate).

    PyTorch's ``momentum=None``, the cumulative average, has no fixed decay and is
    ``decay=None`` in the core.

    Parameters
    ----------
    momentum : float
        PyTorch's ``momentum``, a host real in ``[0, 1]``.

    Returns
    -------
    float
        The decay ``1 - momentum``, rounded like :func:`decay_from_update_rate`.

    Raises
    ------
    TypeError
        ``momentum`` is not a host real number (``None`` included).
    ValueError
        ``momentum`` is outside ``[0, 1]`` or NaN.

    Examples
    --------
    >>> decay_from_torch(0.1)
    0.9
    """
    return _complement(check_update_rate("PyTorch momentum", momentum))


def torch_from_decay(decay: float) -> float:
    """PyTorch's ``momentum`` (an update rate) for a decay.

    Parameters
    ----------
    decay : float
        The decay (weight on history), a host real in ``[0, 1]``.

    Returns
    -------
    float
        PyTorch's ``momentum``, ``1 - decay``, rounded like :func:`decay_from_update_rate`.

    Raises
    ------
    TypeError
        ``decay`` is not a host real number.
    ValueError
        ``decay`` is outside ``[0, 1]`` or NaN.

    Examples
    --------
    >>> torch_from_decay(0.9)
    0.1
    """
    return _complement(check_decay("decay", decay))


def decay_from_keras(momentum: float) -> float:
    """Keras' ``momentum`` already is a decay: returned validated, unchanged.

    Parameters
    ----------
    momentum : float
        Keras' ``momentum``, a host real in ``[0, 1]``.

    Returns
    -------
    float
        The same number, as a ``float``.

    Raises
    ------
    TypeError
        ``momentum`` is not a host real number.
    ValueError
        ``momentum`` is outside ``[0, 1]`` or NaN.

    Examples
    --------
    >>> decay_from_keras(0.99)
    0.99
    """
    return validate_decay(momentum, "Keras momentum")


def keras_from_decay(decay: float) -> float:
    """Keras' ``momentum`` for a decay: the same number.

    Parameters
    ----------
    decay : float
        The decay (weight on history), a host real in ``[0, 1]``.

    Returns
    -------
    float
        Keras' ``momentum``: ``decay`` validated, as a ``float``.

    Raises
    ------
    TypeError
        ``decay`` is not a host real number.
    ValueError
        ``decay`` is outside ``[0, 1]`` or NaN.

    Examples
    --------
    >>> keras_from_decay(0.9)
    0.9
    """
    return validate_decay(decay)


def cumulative_decay(num_batches_tracked: Any, dtype: Any, *, xp: Any = None) -> Any:
    """The decay of the cumulative average's next update: ``n/(n+1)`` after ``n`` updates.

    The (n+1)-th update with this decay keeps the running value the exact mean of every batch
    statistic seen (PyTorch's ``momentum=None``; ``decay=None`` in the core). It is computed
    on the counter's array, without a host read, so a compiled program can select it at run
    time.

    Parameters
    ----------
    num_batches_tracked : array
        The 0-d integer counter ``n`` of updates so far.
    dtype : dtype
        The floating dtype of the result.
    xp : namespace, optional
        The counter's Array API namespace; by default found with array-api-compat.

    Returns
    -------
    array
        ``n/(n+1)`` as a 0-d array of ``dtype``: 0 for the first update (it replaces the
        initial value), 1/2 for the second, ...

    Examples
    --------
    >>> import numpy as np
    >>> float(cumulative_decay(np.asarray(3), np.float64))
    0.75
    """
    if xp is None:
        xp = array_api_compat.array_namespace(num_batches_tracked)
    nf = xp.astype(num_batches_tracked, dtype)
    return nf / (nf + 1)


def inverse_std(var: Any, eps: float, *, xp: Any = None) -> Any:
    """``1 / sqrt(var + eps)``: the normalizing factor, with ``eps`` inside the square root.

    The placement of every framework here (PyTorch, Keras, Flax, ONNX) and of the paper;
    the core normalizes with it, and an adapter that computes the factor beside a fused
    kernel calls this function.

    Parameters
    ----------
    var : array
        The (biased) variance.
    eps : float
        A finite host real ``> 0``.
    xp : namespace, optional
        ``var``'s Array API namespace; by default found with array-api-compat.

    Returns
    -------
    array
        ``1 / sqrt(var + eps)``, ``var``'s shape and dtype.

    Raises
    ------
    ValueError
        ``eps`` is not a finite number ``> 0``.

    Examples
    --------
    >>> import numpy as np
    >>> inverse_std(np.array([3.0, 0.0]), 1.0).tolist()
    [0.5, 1.0]
    """
    eps = check_positive("eps", eps)
    if xp is None:
        xp = array_api_compat.array_namespace(var)
    return _kernels.inverse_std(xp, var, eps)


def unbiased_factor(m: int) -> float:
    """Bessel's correction ``m/(m-1)``: the unbiased variance over the biased one.

    The one place this factor is computed: :func:`unbiased_from_biased`,
    :func:`biased_from_unbiased` and the core's unbiased running variance use it.

    Parameters
    ----------
    m : int
        The number of values the variance is over, ``m >= 2`` (Python or NumPy integer).

    Returns
    -------
    float
        ``m / (m - 1)``.

    Raises
    ------
    TypeError
        ``m`` is not an integer.
    ValueError
        ``m < 2``.

    Examples
    --------
    >>> unbiased_factor(4)
    1.3333333333333333
    """
    try:
        count = check_int("m", m, minimum=2)
    except ValueError:
        raise ValueError(f"the unbiased variance needs at least 2 values, got m={m!r}") from None
    return float(_kernels.unbiased_factor(None, count))


def unbiased_from_biased(var: Any, m: int) -> Any:
    """Unbiased variance ``var * m/(m-1)`` from a biased one over ``m`` values (``m >= 2``).

    Parameters
    ----------
    var : float or array
        The biased (``1/m``) variance: a number or an array, multiplied as it is.
    m : int
        The number of values, ``m >= 2``; errors as :func:`unbiased_factor`.

    Returns
    -------
    float or array
        ``var * m/(m-1)``.

    Examples
    --------
    >>> unbiased_from_biased(2.0, 4)
    2.6666666666666665
    """
    return var * unbiased_factor(m)


def biased_from_unbiased(var: Any, m: int) -> Any:
    """Biased variance ``var / (m/(m-1))`` from an unbiased one over ``m`` values (``m >= 2``).

    Parameters
    ----------
    var : float or array
        The unbiased (``1/(m-1)``) variance: a number or an array, divided as it is.
    m : int
        The number of values, ``m >= 2``; errors as :func:`unbiased_factor`.

    Returns
    -------
    float or array
        ``var / (m/(m-1))``.

    Examples
    --------
    >>> biased_from_unbiased(2.6666666666666665, 4)
    2.0
    """
    return var / unbiased_factor(m)


@dataclass(frozen=True)
class FrameworkConvention:
    """How one framework spells BN's hyper-parameters, mapped to the core's decays."""

    name: str
    momentum_is: Literal["decay", "update_rate"]
    default_momentum: float | None
    running_var: Estimator
    default_eps: float
    eps_placement: str
    cumulative_average: str

    def decay(self, momentum: float) -> float:
        """The core's decay for this framework's ``momentum`` value.

        Parameters
        ----------
        momentum : float
            The framework's ``momentum``, a host real in ``[0, 1]``.

        Returns
        -------
        float
            The decay (weight on history).

        Examples
        --------
        >>> FRAMEWORKS["keras"].decay(0.99)
        0.99
        """
        if self.momentum_is == "update_rate":
            return _complement(check_update_rate(f"{self.name} momentum", momentum))
        return validate_decay(momentum, f"{self.name} momentum")

    def momentum(self, decay: float) -> float:
        """The ``momentum`` value, in this framework's convention, for the core's decay.

        Parameters
        ----------
        decay : float
            The decay (weight on history), a host real in ``[0, 1]``.

        Returns
        -------
        float
            The framework's ``momentum``.

        Examples
        --------
        >>> FRAMEWORKS["torch"].momentum(0.9)
        0.1
        """
        if self.momentum_is == "update_rate":
            return _complement(check_decay("decay", decay))
        return validate_decay(decay)


FRAMEWORKS: dict[str, FrameworkConvention] = {
    c.name: c
    for c in (
        FrameworkConvention("mbn_ref", "decay", 0.9, "biased", 1e-5, "inside sqrt", "decay=None"),
        FrameworkConvention("paper", "decay", None, "biased", 1e-5, "inside sqrt", "none"),
        FrameworkConvention(
            "torch", "update_rate", 0.1, "unbiased", 1e-5, "inside sqrt", "momentum=None"
        ),
        FrameworkConvention("keras", "decay", 0.99, "biased", 1e-3, "inside sqrt", "none"),
        FrameworkConvention("flax", "decay", 0.99, "biased", 1e-5, "inside sqrt", "none"),
        FrameworkConvention("onnx", "decay", 0.9, "biased", 1e-5, "inside sqrt", "none"),
    )
}
"""Each framework's BN conventions (the docs' conventions table is generated from this)."""
