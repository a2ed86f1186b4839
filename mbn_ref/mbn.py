"""Momentum batch normalization, the paper's Algorithm 1 (docs/spec.md §3).

Training normalizes with moving statistics that the current batch has just updated with
decay ``lam`` (Eq. 8); inference uses a second pair of statistics kept with decay ``tau``.
``lam = 0`` is exactly BN.

>>> import numpy as np
>>> import mbn_ref as mr
>>> rng = np.random.default_rng(0)
>>> state = mr.init_state(3)
>>> for _ in range(3):
...     x = rng.normal(size=(2, 3))
...     y, state, ctx = mr.mbn_forward(x, state, lam=0.5, tau=0.99)
>>> int(state.num_batches_tracked)
3
>>> dx, dgamma, dbeta = mr.mbn_backward(np.ones_like(x), ctx)
>>> dx.shape
(2, 3)
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import _kernels
from ._array import AllSum, Array, Namespace, is_array
from ._normalization import (
    Batch,
    backward,
    check_counter,
    empty_forward,
    eval_forward,
    keep_if,
    prepare,
    running_variance,
    train_statistics,
    update_flag,
    update_running,
)
from ._validate import check_decay_arg
from .bn import init_bn_state
from .context import NormContext
from .conventions import Estimator, validate_estimator

__all__ = ["MBNState", "init_state", "mbn_backward", "mbn_forward", "mbn_from_moments"]


class MBNState(NamedTuple):
    """MBN state per channel.

    ``moving_mean``/``moving_var`` are the training moving statistics (Eq. 8, decay
    ``lam``, biased variance); ``running_mean``/``running_var`` the inference statistics
    (decay ``tau``, the chosen estimator), named like BN's so that a BN checkpoint maps onto
    them; ``num_batches_tracked`` a 0-d integer count of training steps.
    """

    moving_mean: Array
    moving_var: Array
    running_mean: Array
    running_var: Array
    num_batches_tracked: Array


def init_state(
    num_features: int, *, xp: Any = None, dtype: Any = None, device: Any = None
) -> MBNState:
    """Fresh MBN state: means 0, variances 1 (like BN's running statistics), step 0.

    Parameters
    ----------
    num_features : int
        The number of channels C, a positive integer.
    xp, dtype, device
        As in :func:`mbn_ref.init_bn_state`.

    Returns
    -------
    MBNState
        Moving and running means of zeros and variances of ones, shape ``(num_features,)``
        (four distinct arrays), and a 0-d ``int64`` ``num_batches_tracked`` of 0.

    Raises
    ------
    ValueError
        ``num_features`` is not a positive integer.
    TypeError
        ``dtype`` is not a real floating dtype.

    Examples
    --------
    >>> init_state(2).moving_var.tolist()
    [1.0, 1.0]
    """
    bn = init_bn_state(num_features, xp=xp, dtype=dtype, device=device)
    return MBNState(
        bn.running_mean,
        bn.running_var,
        bn.running_mean + 0,
        bn.running_var + 0,
        bn.num_batches_tracked,
    )


def mbn_forward(
    x: Array,
    state: MBNState,
    gamma: Array | None = None,
    beta: Array | None = None,
    *,
    lam: Any = 0.0,
    tau: Any = 0.9,
    eps: float = 1e-5,
    axis: int = 1,
    training: bool = True,
    estimator: Estimator = "biased",
    nonfinite: str = "propagate",
    all_sum: AllSum | None = None,
    xp: Namespace | None = None,
) -> tuple[Array, MBNState, NormContext]:
    """Momentum batch normalization, the paper's Algorithm 1 (docs/spec.md §3).

    Training step::

        mu  <- lam*mu  + (1-lam)*mu_B          var <- lam*var + (1-lam)*var_B
        y    = gamma * (x - mu) / sqrt(var + eps) + beta
        mu_inf <- tau*mu_inf + (1-tau)*mu_B    var_inf <- tau*var_inf + (1-tau)*var_B'

    where ``var_B'`` is the batch variance under ``estimator``. Evaluation normalizes with
    ``(mu_inf, var_inf)``.

    Parameters
    ----------
    lam, tau
        Decays (weights on history) of the training and the inference statistics: Python
        numbers in ``[0, 1]`` or 0-d arrays (runtime state, e.g. from a schedule). ``tau=None``
        keeps the exact cumulative average. The defaults make MBN exactly BN with PyTorch's
        default momentum.
    x, gamma, beta, eps, axis, training, estimator, nonfinite, all_sum, xp
        As in :func:`mbn_ref.bn_forward` (``all_sum`` gives synchronized MBN: global batch
        statistics feed both moving averages). A training batch with one value per channel is
        accepted when ``lam > 0`` (history normalizes it) and rejected when ``lam`` is the
        host number 0; a ``lam`` held as an array is never read on the host, so it is not
        checked there.

    Returns
    -------
    y
        The output, in ``x``'s dtype, namespace and device.
    state
        The new :class:`MBNState` (the same object in evaluation and for an empty batch).
    ctx
        The :class:`mbn_ref.NormContext` for :func:`mbn_ref.backward`: the gradients reach
        the batch's own statistics with weight ``1 - lam``.

    Examples
    --------
    The first step from a fresh state with ``lam = 0.5`` normalizes with the average of the
    initial statistics (mean 0, variance 1) and the batch's:

    >>> import numpy as np
    >>> import mbn_ref as mr
    >>> x = np.array([[1.0], [3.0]])              # batch mean 2, biased variance 1
    >>> y, state, ctx = mr.mbn_forward(x, mr.init_state(1), lam=0.5, tau=0.9)
    >>> float(state.moving_mean[0]), float(state.moving_var[0])   # mean 1, variance 1
    (1.0, 1.0)
    >>> np.round(y.ravel(), 4).tolist()           # (x - 1) / sqrt(1 + eps)
    [0.0, 2.0]
    >>> round(float(state.running_mean[0]), 12)   # inference mean: 0.9*0 + 0.1*2
    0.2
    >>> dx, dgamma, dbeta = mr.backward(np.ones_like(y), ctx)
    >>> np.round(dx.ravel(), 4).tolist()          # BN (lam = 0) would give [0.0, 0.0]
    [1.0, 0.0]
    """
    b = _prepare(x, state, gamma, beta, axis, eps, nonfinite, lam, tau, estimator, xp)
    xp = b.xp
    if not training:
        y, ctx = eval_forward(b, state.running_mean, state.running_var, eps)
        return y, state, ctx
    stats = train_statistics(b, all_sum, lam=lam, why="lam = 0 makes the batch alone normalize")
    if stats is None:
        y, ctx = empty_forward(b)
        return y, state, ctx
    m, batch_mean, batch_var, centered = stats
    ok = update_flag(b, batch_var, m)
    new_state, mean, rstd = _train_step(
        xp, state, batch_mean, batch_var, m, lam, tau, estimator, ok, b.x.dtype, eps
    )
    y = _kernels.affine_normalize(xp, centered, b.axis, batch_mean - mean, rstd, b.gamma, b.beta)
    ctx = b.context(mean, rstd, b.scalar(_batch_weight(lam)), batch_mean, m, all_sum)
    return xp.astype(y, b.dtype, copy=False), new_state, ctx


def _prepare(
    x: Array,
    state: MBNState,
    gamma: Array | None,
    beta: Array | None,
    axis: int,
    eps: float,
    nonfinite: str,
    lam: Any,
    tau: Any,
    estimator: str,
    xp: Namespace | None,
) -> Batch:
    """Validate an MBN call's arguments (``ValueError``/``TypeError`` before anything runs)."""
    b = prepare(
        x,
        gamma,
        beta,
        axis=axis,
        eps=eps,
        nonfinite=nonfinite,
        state=state,
        state_names=MBNState._fields,
        xp=xp,
    )
    check_decay_arg("lam", lam)
    check_decay_arg("tau", tau, allow_none=True)
    validate_estimator(estimator)
    check_counter(b.xp, state.num_batches_tracked)
    return b


def _batch_weight(lam: Any) -> Any:
    """``1 - lam``: the weight of the batch's statistics, and of their gradients."""
    return 1 - lam if is_array(lam) else 1.0 - float(lam)


def _train_step(
    xp: Namespace,
    state: MBNState,
    batch_mean: Array,
    batch_var: Array,
    m: int | Array,
    lam: Any,
    tau: Any,
    estimator: str,
    ok: Array | None,
    dtype: Any,
    eps: float,
) -> tuple[MBNState, Array, Array]:
    """The new state and the normalizing ``(mean, rstd)`` in ``dtype`` (Eq. 8, spec §3)."""
    lam_rest = 1 - lam
    moving_mean = _kernels.ema(state.moving_mean, batch_mean, lam, lam_rest)
    moving_var = _kernels.ema(state.moving_var, batch_var, lam, lam_rest)
    mean = xp.astype(moving_mean, dtype, copy=False)
    rstd = _kernels.inverse_std(xp, xp.astype(moving_var, dtype, copy=False), eps)
    running = update_running(
        xp,
        state.running_mean,
        state.running_var,
        state.num_batches_tracked,
        batch_mean,
        running_variance(xp, batch_var, m, estimator),
        tau,
        ok,
    )
    new_state = MBNState(
        keep_if(xp, ok, moving_mean, state.moving_mean),
        keep_if(xp, ok, moving_var, state.moving_var),
        *running,
    )
    return new_state, mean, rstd


def mbn_from_moments(
    x: Array,
    state: MBNState,
    gamma: Array | None,
    beta: Array | None,
    batch_mean: Array,
    batch_var: Array,
    *,
    lam: Any = 0.0,
    tau: Any = 0.9,
    eps: float = 1e-5,
    axis: int = 1,
    estimator: Estimator = "biased",
    xp: Namespace | None = None,
) -> tuple[MBNState, NormContext]:
    """An MBN training step from batch moments a fused kernel already computed.

    For adapters that compute the batch's moments and normalize with a framework's own
    kernels: the new state and the backward context of :func:`mbn_forward`'s training step
    (docs/spec.md §3), without touching ``x``'s values. The caller normalizes ``x`` with the
    new moving statistics (``y = gamma * (x - mean) * rstd + beta`` with ``ctx.mean`` and
    ``ctx.rstd``, from ``state.moving_mean`` and ``state.moving_var``), and computes the
    backward pass with :func:`mbn_ref.backward` or, through a fused BN backward kernel, with
    :func:`mbn_ref.kernel_terms`.

    Parameters
    ----------
    x : array
        The training batch (kept in the context for the backward pass).
    state : MBNState
        The state before the batch.
    gamma, beta : array or None
        The per-channel affine parameters (their dtypes are the gradients' dtypes).
    batch_mean, batch_var : array
        The batch's per-channel mean and **biased** variance, in the compute dtype (the
        input's, at least float32).
    lam, tau, eps, axis, estimator, xp
        As in :func:`mbn_forward`.

    Returns
    -------
    state : MBNState
        The new state.
    ctx : NormContext
        The backward context; ``ctx.mean``/``ctx.rstd`` normalize the batch.

    Raises
    ------
    ValueError
        A bad decay, estimator, counter or ``eps``; a batch of one value per channel with
        the unbiased estimator.

    Examples
    --------
    The same state and context as :func:`mbn_forward`:

    >>> import numpy as np
    >>> import mbn_ref as mr
    >>> x = np.array([[1.0], [3.0]])
    >>> state, ctx = mbn_from_moments(
    ...     x, mr.init_state(1), None, None, x.mean(0), x.var(0), lam=0.5, tau=0.9)
    >>> _, expected, _ = mr.mbn_forward(x, mr.init_state(1), lam=0.5, tau=0.9)
    >>> [float(a[0]) for a in state[:4]] == [float(a[0]) for a in expected[:4]]
    True
    >>> float(ctx.mean[0]), round(float(ctx.rstd[0]), 4), float(ctx.stats_weight)
    (1.0, 1.0, 0.5)
    """
    b = _prepare(x, state, gamma, beta, axis, eps, "propagate", lam, tau, estimator, xp)
    xp = b.xp
    dtype = b.x.dtype
    new_state, mean, rstd = _train_step(
        xp, state, batch_mean, batch_var, b.m, lam, tau, estimator, None, dtype, eps
    )
    batch_mean = xp.astype(batch_mean, dtype, copy=False)
    ctx = b.context(mean, rstd, b.scalar(_batch_weight(lam)), batch_mean)
    return new_state, ctx


mbn_backward = backward
"""Alias of :func:`mbn_ref.backward` (one backward serves BN and MBN)."""
