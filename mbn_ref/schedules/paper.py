"""The paper's schedules: Eq. 11 (training decay ``lam``) and Eq. 12 (inference decay ``tau``).

Yong, Huang, Meng, Hua, Zhang, *Momentum Batch Normalization for Deep Learning with Small
Batch Size* (ECCV 2020). Both ``lam`` and ``tau`` are **decays** (weight on history:
``s <- d*s + (1-d)*batch``); PyTorch's ``momentum`` for the same update is ``1 - d``.

Indexing: :func:`mbn_lambda` takes the paper's **1-indexed** epoch ``t = 1..T``;
:func:`mbn_lambda_schedule` wraps it as a :class:`~mbn_ref.schedules.Schedule` of the
**0-indexed** count of completed epochs (``count = t - 1``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, overload

import numpy as np
from numpy.typing import NDArray

from .._validate import as_real_array, check_positive, check_real
from ._types import Schedule, check_count
from .basic import constant

__all__ = [
    "PAPER_DEFAULTS_SEC_4_2",
    "PAPER_DEFAULTS_SEC_5_2",
    "PaperDefaults",
    "default_lam_schedule",
    "default_tau_schedule",
    "mbn_lambda",
    "mbn_lambda_schedule",
    "mbn_tau",
]


class PaperDefaults(NamedTuple):
    """A pair of the paper's hyper-parameters: ideal batch size ``m0`` and inference ``tau0``."""

    ideal_batch_size: int
    tau0: float


#: The paper's final choice (§5.2, used in all its experiments): ``m0 = 32``, ``tau0 = 0.85``.
#: These are the defaults of :func:`mbn_lambda` and :func:`mbn_tau`.
PAPER_DEFAULTS_SEC_5_2 = PaperDefaults(ideal_batch_size=32, tau0=0.85)

#: The values §4.2 mentions (``m0 = 64``, ``tau0 = 0.9``), contradicted by §5.2 (docs/spec.md §8,
#: erratum 5). Kept for reproducing that text, not as a default.
PAPER_DEFAULTS_SEC_4_2 = PaperDefaults(ideal_batch_size=64, tau0=0.9)


def _ratio(batch_size: float, ideal_batch_size: float) -> float:
    """``r = min(m/m0, 1)`` after validating ``m > 0`` and ``m0 > 0``."""
    m = check_positive("batch_size", batch_size)
    m0 = check_positive("ideal_batch_size", ideal_batch_size)
    return min(m / m0, 1.0)


def _total(total_epochs: float) -> float:
    total = check_real("total_epochs", total_epochs)
    if total < 1:
        raise ValueError(f"total_epochs (T) must be >= 1, got {total_epochs!r}")
    return total


def _epoch_error(epoch: object) -> ValueError:
    return ValueError(
        f"epoch must be >= 1: Eq. 11 uses the paper's 1-indexed epoch t = 1..T, got {epoch!r}. "
        "For a 0-indexed count of completed epochs use mbn_lambda(count + 1, ...) or "
        "mbn_lambda_schedule(...)"
    )


@overload
def mbn_lambda(
    epoch: float,
    *,
    total_epochs: float,
    batch_size: float,
    ideal_batch_size: float = ...,
) -> float: ...


@overload
def mbn_lambda(
    epoch: NDArray[Any],
    *,
    total_epochs: float,
    batch_size: float,
    ideal_batch_size: float = ...,
) -> NDArray[np.float64]: ...


def mbn_lambda(
    epoch: float | NDArray[Any],
    *,
    total_epochs: float,
    batch_size: float,
    ideal_batch_size: float = PAPER_DEFAULTS_SEC_5_2.ideal_batch_size,
) -> float | NDArray[np.float64]:
    """Training decay ``lam`` of Eq. 11 at the paper's 1-indexed epoch ``t``.

    The paper prints ``lam(t) = rho**(T/(T-1) * max(T-t, 0)) - rho**T`` with
    ``rho = min(m/m0, 1)**(1/T)``. With ``r = min(m/m0, 1)`` this equals
    ``r**((T - min(t, T))/(T - 1)) - r``, which is what is evaluated: its absolute error stays
    within about one unit in the last place of 1 for any ``T`` (the printed form loses about
    ``log10(T)`` digits through ``rho``, about 3e-12 at ``T = 1e6``).

    Properties: ``lam(1) = 0``; ``lam(T) = 1 - r``; non-decreasing in ``t``; ``t > T`` gives
    ``lam(T)``; values in ``[0, 1)``; ``m >= m0`` gives 0 everywhere (MBN is BN).

    ``T = 1`` is ``0/0`` in the paper (docs/spec.md §8, erratum 6). It is **defined as 0 for every
    t**: with a single epoch there is no late, stable phase in which to smooth the statistics,
    so MBN is BN. For short runs use the schedule per step instead (``t`` = 1-indexed step,
    ``total_epochs`` = total number of steps).

    Parameters
    ----------
    epoch : float or ndarray
        The paper's 1-indexed epoch ``t`` (``t = 1`` is the first epoch). Real values are
        allowed (per-step use); a NumPy array is evaluated elementwise.
    total_epochs : float
        ``T >= 1``, the number of epochs (or steps, for per-step use).
    batch_size : float
        The actual batch size ``m > 0`` (the number of values each channel's statistics are
        computed from, per device when statistics are per device).
    ideal_batch_size : float, optional
        ``m0 > 0``; the paper uses 32 (§5.2).

    Returns
    -------
    float or ndarray
        ``lam`` as a Python ``float`` (an ``ndarray`` of float64 for array input).

    Raises
    ------
    ValueError
        ``epoch < 1`` (a hint about 0- vs 1-indexing), ``T < 1``, ``m <= 0``, ``m0 <= 0`` or
        a non-finite value.
    TypeError
        An argument is not a real number (``bool``, a string, ``None``...).

    Examples
    --------
    >>> mbn_lambda(1, total_epochs=200, batch_size=2)
    0.0
    >>> mbn_lambda(200, total_epochs=200, batch_size=2)   # 1 - 2/32
    0.9375
    >>> round(mbn_lambda(100, total_epochs=200, batch_size=2), 6)
    0.185764
    >>> mbn_lambda(1, total_epochs=1, batch_size=2)       # T = 1: defined as 0 (BN)
    0.0
    >>> mbn_lambda(np.array([1, 200, 300]), total_epochs=200, batch_size=2)
    array([0.    , 0.9375, 0.9375])
    """
    total = _total(total_epochs)
    r = _ratio(batch_size, ideal_batch_size)
    if isinstance(epoch, np.ndarray):
        t_arr = as_real_array("epoch", epoch)
        if not np.all(t_arr >= 1):  # also rejects NaN
            bad = t_arr[~(t_arr >= 1)].flat[0]
            raise _epoch_error(float(bad))
        if r >= 1.0 or total == 1.0:
            return np.zeros(t_arr.shape, dtype=np.float64)
        t_arr = np.minimum(t_arr, total)
        lam_arr: NDArray[np.float64] = np.maximum(
            np.power(r, (total - t_arr) / (total - 1.0)) - r, 0.0
        )
        return lam_arr
    t = check_real("epoch", epoch)
    if t < 1:
        raise _epoch_error(epoch)
    return _lam(t, total, r)


def _lam(t: float, total: float, r: float) -> float:
    """Eq. 11 on validated arguments (``t >= 1``, ``total >= 1``, ``0 < r <= 1``)."""
    if r >= 1.0 or total == 1.0:
        return 0.0
    t = min(t, total)
    # r**1 - r is exactly 0 and r**0 - r exactly 1 - r; max() guards the sign against pow's
    # last-place rounding in between.
    return max(float(r ** ((total - t) / (total - 1.0))) - r, 0.0)


def mbn_lambda_schedule(
    total_epochs: float,
    batch_size: float,
    ideal_batch_size: float = PAPER_DEFAULTS_SEC_5_2.ideal_batch_size,
) -> Schedule:
    """Eq. 11 as a :class:`~mbn_ref.schedules.Schedule` of the **0-indexed** count.

    ``count`` is the number of completed epochs (or steps): ``count = 0`` is the paper's
    ``t = 1``, so ``schedule(count) == mbn_lambda(count + 1, ...)``. Arguments are validated
    here, once.

    Parameters
    ----------
    total_epochs, batch_size, ideal_batch_size : float
        As in :func:`mbn_lambda`: ``T >= 1``, ``m > 0`` and ``m0 > 0`` (default 32, §5.2).

    Returns
    -------
    Schedule
        ``count -> lam``; a negative or non-finite count raises ``ValueError``.

    Raises
    ------
    ValueError
        ``T < 1``, ``m <= 0``, ``m0 <= 0`` or a non-finite value.
    TypeError
        An argument is not a real number.

    Examples
    --------
    >>> lam = mbn_lambda_schedule(total_epochs=200, batch_size=2)
    >>> lam(0), lam(199)
    (0.0, 0.9375)
    >>> lam(0) == mbn_lambda(1, total_epochs=200, batch_size=2)
    True
    """
    total = _total(total_epochs)
    r = _ratio(batch_size, ideal_batch_size)

    def schedule(count: float, /) -> float:
        return _lam(check_count(count) + 1.0, total, r)

    return schedule


def mbn_tau(
    *,
    batch_size: float,
    ideal_batch_size: float = PAPER_DEFAULTS_SEC_5_2.ideal_batch_size,
    tau0: float = PAPER_DEFAULTS_SEC_5_2.tau0,
) -> float:
    """Inference decay ``tau = tau0**(m/m0)`` of Eq. 12.

    ``tau0`` is the decay wanted at the ideal batch size ``m0``; Eq. 12 keeps the weight
    ``tau**(N/m)`` that one epoch of ``N`` samples leaves on the start equal for every ``m``.
    The paper's final choice is ``m0 = 32``, ``tau0 = 0.85`` (§5.2, the defaults); §4.2
    mentions ``m0 = 64``, ``tau0 = 0.9`` (:data:`PAPER_DEFAULTS_SEC_4_2`; docs/spec.md §8,
    erratum 5).

    Parameters
    ----------
    batch_size : float
        The actual batch size ``m > 0``.
    ideal_batch_size : float, optional
        ``m0 > 0``; the paper uses 32 (§5.2).
    tau0 : float, optional
        The inference decay at ``m0``, in ``(0, 1)``; the paper uses 0.85 (§5.2).

    Returns
    -------
    float
        ``tau``, a decay in ``(0, 1)``.

    Raises
    ------
    ValueError
        ``tau0`` outside ``(0, 1)``, ``m <= 0`` or ``m0 <= 0``.
    TypeError
        An argument is not a real number.

    Examples
    --------
    >>> round(mbn_tau(batch_size=2), 4)   # the paper: "about 0.99"
    0.9899
    >>> mbn_tau(batch_size=32)
    0.85
    """
    m = check_positive("batch_size", batch_size)
    m0 = check_positive("ideal_batch_size", ideal_batch_size)
    t0 = check_real("tau0", tau0)
    if not 0.0 < t0 < 1.0:
        raise ValueError(f"tau0 must be a decay in the open interval (0, 1), got {tau0!r}")
    return float(t0 ** (m / m0))


def default_lam_schedule(
    batch_size: float | None,
    total_epochs: float | None,
    ideal_batch_size: float = PAPER_DEFAULTS_SEC_5_2.ideal_batch_size,
    *,
    option: str = "lam",
    alternatives: str = "a decay, a schedule or 'keep'",
) -> Schedule:
    """Eq. 11 as the default (``None``) of a scheduler's option: :func:`mbn_lambda_schedule`.

    For schedulers whose ``batch_size``/``total_epochs`` are optional: without them the
    error names the option and what else it takes (``alternatives``).

    Examples
    --------
    >>> default_lam_schedule(2, 200)(199)
    0.9375
    >>> default_lam_schedule(2, None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: lam=None uses the paper's Eq. 11, which needs batch_size and total_epochs; ...
    """
    if batch_size is None or total_epochs is None:
        raise ValueError(
            f"{option}=None uses the paper's Eq. 11, which needs batch_size and total_epochs; "
            f"pass them, or pass {option}= ({alternatives})"
        )
    return mbn_lambda_schedule(
        total_epochs=total_epochs, batch_size=batch_size, ideal_batch_size=ideal_batch_size
    )


def default_tau_schedule(
    batch_size: float | None,
    ideal_batch_size: float = PAPER_DEFAULTS_SEC_5_2.ideal_batch_size,
    tau0: float = PAPER_DEFAULTS_SEC_5_2.tau0,
    *,
    option: str = "tau",
    alternatives: str = "a decay, a schedule or 'keep'",
) -> Schedule:
    """Eq. 12 as the default (``None``) of a scheduler's option: the constant :func:`mbn_tau`.

    Examples
    --------
    >>> round(default_tau_schedule(2)(0), 4)
    0.9899
    >>> default_tau_schedule(None, option="momentum")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: momentum=None uses the paper's Eq. 12, ... or pass momentum= (a decay, ...)
    """
    if batch_size is None:
        raise ValueError(
            f"{option}=None uses the paper's Eq. 12, which needs batch_size; pass it, or pass "
            f"{option}= ({alternatives})"
        )
    return constant(mbn_tau(batch_size=batch_size, ideal_batch_size=ideal_batch_size, tau0=tau0))
