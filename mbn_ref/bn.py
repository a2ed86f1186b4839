"""Batch normalization with running statistics in every convention (docs/spec.md §2).

>>> import numpy as np
>>> import mbn_ref as mr
>>> x = np.arange(12.0).reshape(4, 3)
>>> state = mr.init_bn_state(3)
>>> y, state, ctx = mr.bn_forward(x, state, decay=0.9)
>>> np.round(y[:, 0], 4).tolist()
[-1.3416, -0.4472, 0.4472, 1.3416]
>>> np.round(state.running_mean, 6).tolist()
[0.45, 0.55, 0.65]
>>> dx, dgamma, dbeta = mr.bn_backward(np.ones_like(x), ctx)
>>> float(abs(dx).max()) < 1e-12
True
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import _kernels
from ._array import (
    AllSum,
    Array,
    Namespace,
    default_float_dtype,
    namespace,
    resolve_namespace,
)
from ._normalization import (
    backward,
    check_counter,
    empty_forward,
    eval_forward,
    prepare,
    running_variance,
    train_statistics,
    update_flag,
    update_running,
)
from ._validate import check_decay_arg
from .context import NormContext
from .conventions import Estimator, validate_estimator

__all__ = [
    "BNState",
    "bn_backward",
    "bn_forward",
    "init_bn_state",
    "update_running_statistics",
]


class BNState(NamedTuple):
    """BN running statistics, named as in PyTorch's ``BatchNorm*d`` buffers.

    ``running_var`` holds whichever estimator the forward call was given (biased by default).
    ``num_batches_tracked`` is a 0-d integer array counting training updates.
    """

    running_mean: Array
    running_var: Array
    num_batches_tracked: Array


_STATE_FIELDS = BNState._fields


def init_bn_state(
    num_features: int, *, xp: Any = None, dtype: Any = None, device: Any = None
) -> BNState:
    """Fresh running statistics: mean 0, variance 1, no batches tracked.

    Parameters
    ----------
    num_features : int
        The number of channels C, a positive integer.
    xp : namespace or module, optional
        Any Array API namespace or array library (default NumPy).
    dtype : dtype, optional
        A real floating dtype of ``xp``; defaults to the namespace's default real floating
        dtype.
    device : device, optional
        Where the arrays are created (the namespace's default when ``None``).

    Returns
    -------
    BNState
        ``running_mean`` zeros and ``running_var`` ones of shape ``(num_features,)``, and a
        0-d ``int64`` ``num_batches_tracked`` of 0.

    Raises
    ------
    ValueError
        ``num_features`` is not a positive integer.
    TypeError
        ``dtype`` is not a real floating dtype.

    Examples
    --------
    >>> init_bn_state(2).running_var.tolist()
    [1.0, 1.0]
    """
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
    ns = resolve_namespace(xp)
    dtype = default_float_dtype(ns, device) if dtype is None else dtype
    if not ns.isdtype(dtype, "real floating"):
        raise TypeError(f"state dtype must be real floating, got {dtype}")
    return BNState(
        ns.zeros((num_features,), dtype=dtype, device=device),
        ns.ones((num_features,), dtype=dtype, device=device),
        ns.zeros((), dtype=ns.int64, device=device),
    )


def bn_forward(
    x: Array,
    state: BNState | None,
    gamma: Array | None = None,
    beta: Array | None = None,
    *,
    decay: Any = 0.9,
    eps: float = 1e-5,
    axis: int = 1,
    training: bool = True,
    estimator: Estimator = "biased",
    nonfinite: str = "propagate",
    all_sum: AllSum | None = None,
    xp: Namespace | None = None,
) -> tuple[Array, BNState | None, NormContext]:
    """Batch normalization: ``y = gamma * (x - mu) / sqrt(var + eps) + beta``.

    Parameters
    ----------
    x
        Input with at least 2 dims; statistics are per channel along ``axis`` (1 for
        ``(N, C, ...)``, -1 for channels-last), reduced over every other axis.
    state
        Running statistics (:func:`init_bn_state`), or ``None`` for no tracking: batch
        statistics then normalize in evaluation too (PyTorch ``track_running_stats=False``).
    gamma, beta
        Optional per-channel affine parameters.
    decay
        Weight on history in ``running <- decay*running + (1-decay)*batch`` (PyTorch's
        ``momentum`` is ``1 - decay``: see :mod:`mbn_ref.conventions`). A Python number in
        ``[0, 1]``, a 0-d array (runtime state, not validated here), or ``None`` for the
        cumulative average (PyTorch ``momentum=None``).
    eps
        Added to the variance inside the square root.
    training
        Normalize with the batch's statistics and update ``state``; else use ``state``.
    estimator
        ``"biased"`` (1/m) or ``"unbiased"`` (1/(m-1), PyTorch) batch variance in
        ``running_var``. Normalization always uses the biased variance.
    nonfinite
        ``"propagate"`` (IEEE), ``"skip_update"`` (state untouched by a batch holding NaN/Inf,
        without a host sync) or ``"raise"`` (:class:`mbn_ref.errors.NonFiniteError`). A
        non-finite value in any channel skips the whole update (every channel and the
        counter), like a skipped optimizer step; ``"raise"`` also checks evaluation inputs.
    all_sum
        Synchronized BN (docs/spec.md §5): a collective that sums an array over all shards. Every
        shard calls this function with its own part of the batch (empty parts included) and
        normalizes with the global statistics; each shard's state receives the same update.
        See :mod:`mbn_ref.distributed`.
    xp
        The Array API namespace of the arrays; by default found with array-api-compat. An
        explicit namespace is used as it is (e.g. an adapter's namespace over TensorFlow ops,
        which array-api-compat does not know).

    Returns
    -------
    y
        The output, in ``x``'s dtype, namespace and device.
    state
        The new state (the same object when nothing changed: evaluation, an empty batch).
    ctx
        The :class:`mbn_ref.NormContext` for :func:`mbn_ref.backward`.
    """
    b = prepare(
        x,
        gamma,
        beta,
        axis=axis,
        eps=eps,
        nonfinite=nonfinite,
        state=() if state is None else state,
        state_names=() if state is None else _STATE_FIELDS,
        xp=xp,
    )
    check_decay_arg("decay", decay, allow_none=True)
    validate_estimator(estimator)
    xp = b.xp
    if state is not None:
        check_counter(xp, state.num_batches_tracked)
    if not training and state is not None:
        y, ctx = eval_forward(b, state.running_mean, state.running_var, eps)
        return y, state, ctx
    stats = train_statistics(b, all_sum, lam=None, why="batch statistics alone normalize in BN")
    if stats is None:
        y, ctx = empty_forward(b)
        return y, state, ctx
    m, mean, var, centered = stats
    ok = update_flag(b, var, m)
    rstd = _kernels.inverse_std(xp, var, eps)
    y = _kernels.affine_normalize(xp, centered, b.axis, None, rstd, b.gamma, b.beta)
    ctx = b.context(mean, rstd, b.scalar(1.0), mean, m, all_sum)
    if training and state is not None:
        var_r = running_variance(xp, var, m, estimator)
        state = BNState(
            *update_running(
                xp,
                state.running_mean,
                state.running_var,
                state.num_batches_tracked,
                mean,
                var_r,
                decay,
                ok,
            )
        )
    return xp.astype(y, b.dtype, copy=False), state, ctx


bn_backward = backward
"""Alias of :func:`mbn_ref.backward` (one backward serves BN and MBN)."""


def update_running_statistics(
    state: BNState,
    batch_mean: Array,
    batch_var: Array,
    count: int,
    *,
    decay: Any = 0.9,
    estimator: Estimator = "biased",
    xp: Namespace | None = None,
) -> BNState:
    """The running statistics after one training batch whose moments are already known.

    For adapters that compute the batch moments with a framework's fused kernel and keep
    only the state update here: the same update as :func:`bn_forward`'s (docs/spec.md §2)::

        running_mean <- d*running_mean + (1-d)*batch_mean
        running_var  <- d*running_var  + (1-d)*batch_var'

    with ``batch_var'`` the biased ``batch_var`` under ``estimator`` (``* m/(m-1)`` when
    unbiased) and ``d = n/(n+1)`` at the ``(n+1)``-th update for ``decay=None``.

    Parameters
    ----------
    state : BNState
        The running statistics before the batch.
    batch_mean, batch_var : array
        The batch's per-channel mean and **biased** variance.
    count : int
        Values per channel in the batch (``>= 1``; ``>= 2`` under ``estimator="unbiased"``).
    decay : float, 0-d array or None, optional
        Weight on history (a 0-d array is runtime state, never read on the host); ``None``
        is the cumulative average.
    estimator : {"biased", "unbiased"}, optional
        The batch variance that enters ``running_var``.
    xp : namespace, optional
        The Array API namespace; by default found with array-api-compat.

    Returns
    -------
    BNState
        The new running statistics, ``num_batches_tracked`` incremented.

    Raises
    ------
    ValueError
        A bad decay, estimator, counter or count.

    Examples
    --------
    >>> import numpy as np
    >>> s = update_running_statistics(
    ...     init_bn_state(1), np.array([2.0]), np.array([1.0]), 2, decay=0.5,
    ...     estimator="unbiased")
    >>> float(s.running_mean[0]), float(s.running_var[0]), int(s.num_batches_tracked)
    (1.0, 1.5, 1)
    """
    check_decay_arg("decay", decay, allow_none=True)
    validate_estimator(estimator)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    xp = resolve_namespace(xp) if xp is not None else namespace(batch_mean)
    check_counter(xp, state.num_batches_tracked)
    return BNState(
        *update_running(
            xp,
            state.running_mean,
            state.running_var,
            state.num_batches_tracked,
            batch_mean,
            running_variance(xp, batch_var, count, estimator),
            decay,
            None,
        )
    )
