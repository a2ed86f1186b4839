"""What BN and MBN share around the math (docs/spec.md §7, §9).

Argument checks, dtype handling, the backward context, and the ``nonfinite`` policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from . import _kernels
from ._array import (
    AllSum,
    Array,
    Namespace,
    as_channel,
    check_float_input,
    compute_dtype,
    device_of,
    is_array,
    namespace,
    normalize_axis,
    reduce_axes,
    reduced_count,
)
from ._validate import check_positive, is_real_scalar
from .context import NormContext
from .conventions import cumulative_decay
from .errors import NonFiniteError

NonfinitePolicy = Literal["propagate", "skip_update", "raise"]
NONFINITE_POLICIES: tuple[NonfinitePolicy, ...] = ("propagate", "skip_update", "raise")


@dataclass(frozen=True)
class Batch:
    """A validated input, its parameters in the compute dtype, and its geometry."""

    xp: Namespace
    x: Array  # in the compute dtype
    x_in: Array  # the caller's array, which the backward context keeps
    axis: int
    axes: tuple[int, ...]
    m: int | Array  # an array when the batch size is known only at run time
    channels: int
    gamma: Array | None
    beta: Array | None
    gamma_dtype: Any
    beta_dtype: Any
    nonfinite: NonfinitePolicy

    @property
    def dtype(self) -> Any:
        """The caller's dtype, which outputs come back in."""
        return self.x_in.dtype

    def scalar(self, value: Any) -> Array:
        """``value`` (a host number or a 0-d array) as a 0-d array of the compute dtype."""
        if is_array(value):
            return self.xp.astype(value, self.x.dtype, copy=False)
        return self.xp.asarray(value, dtype=self.x.dtype, device=device_of(self.x))

    def context(
        self,
        mean: Array,
        rstd: Array,
        stats_weight: Array,
        batch_mean: Array | None,
        m: int | Array | None = None,
        all_sum: AllSum | None = None,
    ) -> NormContext:
        return NormContext(
            x=self.x_in,
            mean=mean,
            rstd=rstd,
            gamma=self.gamma,
            stats_weight=stats_weight,
            batch_mean=batch_mean,
            count=self.m if m is None else m,
            axis=self.axis,
            gamma_dtype=self.gamma_dtype,
            beta_dtype=self.beta_dtype,
            all_sum=all_sum,
        )


def check_eps(eps: float) -> float:
    """``eps`` as a float: a finite host real ``> 0`` (docs/spec.md §9)."""
    return check_positive("eps", eps)


def check_policy(nonfinite: str) -> NonfinitePolicy:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    return nonfinite  # type: ignore[return-value]


def check_channels(name: str, v: Array, channels: int, shape: tuple[int, ...], axis: int) -> None:
    """``ValueError`` unless ``v`` is a vector of one value per channel."""
    if tuple(v.shape) != (channels,):
        raise ValueError(
            f"{name} has shape {tuple(v.shape)}, but input of shape {shape} has {channels} "
            f"channels on axis {axis}; expected shape ({channels},)"
        )


def check_state_fields(state: Sequence[Array], names: Sequence[str]) -> None:
    """``ValueError`` naming the missing/unexpected keys for a wrong state (docs/spec.md §9).

    Raised when ``state`` is not the expected NamedTuple (e.g. a BN state handed to MBN).
    """
    fields = getattr(state, "_fields", None)
    if fields is None:
        if len(state) != len(names):
            raise ValueError(f"state has {len(state)} fields, expected {tuple(names)}")
        return
    if tuple(fields) != tuple(names):
        missing = [n for n in names if n not in fields]
        unexpected = [f for f in fields if f not in names]
        raise ValueError(
            f"state has fields {tuple(fields)}, expected {tuple(names)} (missing {missing}, "
            f"unexpected {unexpected})"
        )


def prepare(
    x: Array,
    gamma: Array | None,
    beta: Array | None,
    *,
    axis: int,
    eps: float,
    nonfinite: str,
    state: Sequence[Array] = (),
    state_names: Sequence[str] = (),
    xp: Namespace | None = None,
) -> Batch:
    """Validate a forward call's arguments and bring them into the compute dtype.

    ``xp=None`` finds the namespace of the arrays with array-api-compat; an explicit ``xp``
    is used as it is (a namespace array-api-compat does not know, e.g. over TensorFlow ops).
    """
    if xp is None:
        xp = namespace(x, gamma, beta, *state)
    check_float_input(xp, x)
    shape = tuple(x.shape)
    ax = normalize_axis(x.ndim, axis, shape)
    check_eps(eps)
    policy = check_policy(nonfinite)
    channels = shape[ax]
    check_state_fields(state, state_names)
    for name, v in [("gamma", gamma), ("beta", beta)]:
        if v is not None:
            check_channels(name, v, channels, shape, ax)
            check_float_input(xp, v, name)
    for name, v in zip(state_names, state, strict=True):
        if name == "num_batches_tracked":
            continue  # check_counter
        check_channels(name, v, channels, shape, ax)
        if not xp.isdtype(v.dtype, "real floating"):  # docs/spec.md §9: ValueError naming the key
            raise ValueError(
                f"state field {name} has dtype {v.dtype}; expected a real floating dtype"
            )
    cdt = compute_dtype(xp, x.dtype)
    return Batch(
        xp=xp,
        x=xp.astype(x, cdt, copy=False),
        x_in=x,
        axis=ax,
        axes=reduce_axes(x.ndim, ax),
        m=reduced_count(xp, x, ax, cdt),
        channels=channels,
        gamma=None if gamma is None else xp.astype(gamma, cdt, copy=False),
        beta=None if beta is None else xp.astype(beta, cdt, copy=False),
        gamma_dtype=None if gamma is None else gamma.dtype,
        beta_dtype=None if beta is None else beta.dtype,
        nonfinite=policy,
    )


def check_counter(xp: Namespace, n: Array) -> None:
    if tuple(n.shape) != () or not xp.isdtype(n.dtype, "integral"):
        raise ValueError(
            f"num_batches_tracked must be a 0-d integer array, got shape {tuple(n.shape)} "
            f"and dtype {n.dtype}"
        )


def finite_flag(b: Batch, var: Array) -> Array | None:
    """Apply the ``nonfinite`` policy to a batch's variance.

    NaN/Inf anywhere in a channel makes its variance non-finite. Returns the 0-d "all
    finite" flag for ``skip_update``.
    """
    if b.nonfinite == "propagate":
        return None
    xp = b.xp
    finite = xp.isfinite(var)
    if b.nonfinite == "raise":
        if not bool(xp.all(finite)):
            bad = int(xp.sum(xp.astype(~finite, xp.int64)))
            raise NonFiniteError(
                f"the batch holds NaN or Inf in {bad} of {b.channels} channels "
                f"(nonfinite='raise'); no state was updated"
            )
        return None
    return xp.all(finite)


def keep_if(xp: Namespace, ok: Array | None, new: Array, old: Array) -> Array:
    """``new`` where the batch was finite (``skip_update``), cast to ``old``'s dtype."""
    new = xp.astype(new, old.dtype, copy=False)
    return new if ok is None else xp.where(ok, new, old)


def update_flag(b: Batch, var: Array, m: int | Array) -> Array | None:
    """The 0-d "this batch updates the state" flag, or ``None`` when it always does.

    It combines the ``nonfinite`` policy's flag (``skip_update``) with ``m > 0`` when the
    count is an array (known only at run time): an empty batch then leaves the state
    unchanged through selects rather than an early return (docs/spec.md §9).
    """
    ok = finite_flag(b, var)
    if is_array(m):
        has_values = m > 0
        ok = has_values if ok is None else b.xp.logical_and(ok, has_values)
    return ok


def update_running(
    xp: Namespace,
    running_mean: Array,
    running_var: Array,
    n: Array,
    mean: Array,
    var: Array,
    decay: Any,
    ok: Array | None,
) -> tuple[Array, Array, Array]:
    """The running (inference) statistics and counter after one batch.

    BN's running statistics and MBN's inference ones alike. ``decay=None`` is the
    cumulative average; ``var`` is already under the chosen estimator; ``ok`` is
    :func:`update_flag`'s.
    """
    d = cumulative_decay(n, mean.dtype, xp=xp) if decay is None else decay
    rest = 1 - d
    return (
        keep_if(xp, ok, _kernels.ema(running_mean, mean, d, rest), running_mean),
        keep_if(xp, ok, _kernels.ema(running_var, var, d, rest), running_var),
        n + (1 if ok is None else xp.astype(ok, n.dtype)),
    )


def running_variance(xp: Namespace, var: Array, count: int | Array, estimator: str) -> Array:
    """The batch variance as it enters running statistics: biased, or ``* m/(m-1)``.

    With a count known only at run time the ``m >= 2`` check cannot raise; ``m = 1`` then
    enters as the biased variance (docs/spec.md §9).
    """
    if estimator == "unbiased":
        if not is_array(count) and count < 2:
            raise ValueError(
                "the unbiased running-variance estimator needs at least 2 values per channel, "
                f"got {count}; use estimator='biased' or a larger batch"
            )
        return var * _kernels.unbiased_factor(xp, count)
    return var


def require_two_values(b: Batch, m: int, why: str) -> None:
    """``ValueError`` for a training batch of one value per channel (docs/spec.md §3).

    ``m`` is the global count under synchronized statistics.
    """
    if m == 1:
        where = "in total over all shards" if m != b.m else "on axis " + str(b.axis)
        raise ValueError(
            f"expected more than 1 value per channel when training, got input of shape "
            f"{tuple(b.x.shape)} (1 value per channel {where}): {why}"
        )


def eval_forward(b: Batch, mean: Array, var: Array, eps: float) -> tuple[Array, NormContext]:
    """Normalize with stored statistics (constants for the backward pass)."""
    if b.nonfinite == "raise" and not bool(b.xp.all(b.xp.isfinite(b.x))):
        raise NonFiniteError("the input holds NaN or Inf (nonfinite='raise')")
    xp = b.xp
    mean = xp.astype(mean, b.x.dtype)
    rstd = _kernels.inverse_std(xp, xp.astype(var, b.x.dtype), eps)
    centered = b.x - as_channel(xp, mean, b.x.ndim, b.axis)
    y = _kernels.affine_normalize(xp, centered, b.axis, None, rstd, b.gamma, b.beta)
    return xp.astype(y, b.dtype, copy=False), b.context(mean, rstd, b.scalar(0.0), None)


def _is_empty(m: int | Array) -> bool:
    return not is_array(m) and m == 0


def train_statistics(
    b: Batch, all_sum: AllSum | None, *, lam: Any, why: str
) -> tuple[int | Array, Array, Array, Array] | None:
    """The batch's ``(m, mean, var, x - mean)``, global under ``all_sum``.

    ``None`` when the batch (every shard's, under ``all_sum``) is known to be empty.

    One value per channel is rejected when the batch alone normalizes: BN (``lam=None``) and
    MBN with a host ``lam`` of 0. A ``lam`` held as an array (runtime state) is never read on
    the host, and a count known only at run time cannot be checked: neither raises.
    """

    def check(m: int | Array) -> None:
        if is_array(m) or m != 1:
            return
        if lam is None or (is_real_scalar(lam) and float(lam) == 0.0):
            require_two_values(b, m, why)

    if all_sum is None:
        if _is_empty(b.m):
            return None
        check(b.m)
    m, mean, var, centered = _kernels.batch_moments(b.xp, b.x, b.axis, b.axes, b.m, all_sum)
    if _is_empty(m):
        return None
    check(m)
    return m, mean, var, centered


def empty_forward(b: Batch) -> tuple[Array, NormContext]:
    """Output and context for a batch with no values per channel.

    The state is unchanged (docs/spec.md §9).
    """
    xp = b.xp
    zeros = xp.zeros((b.channels,), dtype=b.x.dtype, device=device_of(b.x))
    return xp.astype(b.x, b.dtype), b.context(zeros, zeros + 1, b.scalar(0.0), None)


def backward(
    dy: Array, ctx: NormContext, *, xp: Namespace | None = None
) -> tuple[Array, Array | None, Array | None]:
    """Gradients ``(dx, dgamma, dbeta)`` of a BN or MBN forward pass, from its context.

    One backward serves both (docs/spec.md §2, §3; derivation in
    ``docs/derivations/backward.md``): the context says how strongly the statistics depend
    on the batch. With ``g = gamma*dy``, ``xhat = (x - mean)*rstd`` and ``w`` the context's
    ``stats_weight`` (``1 - lam`` in MBN training, 1 in BN training, 0 in evaluation)::

        dx_i = rstd * (g_i - w/m * (sum(g) + (x_i - mu_B)*rstd*sum(g*xhat)))

    The printed Eq. 13 has ``(xhat_i - mu_M)`` where ``(x_i - mu_M)`` belongs (erratum 1).

    Parameters
    ----------
    dy : array
        The gradient of the loss with respect to the forward output ``y``; same shape as
        the forward input, any real floating dtype.
    ctx : NormContext
        The context the forward call returned (or :meth:`NormContext.join` rebuilt).
    xp : namespace, optional
        The Array API namespace of ``dy`` and the context's arrays; by default found with
        array-api-compat.

    Returns
    -------
    dx : array
        In the forward input's dtype; float16/bfloat16 are computed in float32.
    dgamma, dbeta : array or None
        ``sum(dy * xhat)`` and ``sum(dy)`` per channel, in the parameters' dtypes; ``None``
        for a parameter the forward call did not have. Under synchronized statistics these
        are this shard's sums (the data-parallel engine reduces them).

    Examples
    --------
    >>> import numpy as np
    >>> import mbn_ref as mr
    >>> x = np.random.default_rng(0).normal(size=(8, 3))
    >>> y, state, ctx = mr.mbn_forward(x, mr.init_state(3), np.ones(3), np.zeros(3), lam=0.5)
    >>> dx, dgamma, dbeta = mr.backward(np.ones_like(y), ctx)
    >>> dx.shape, dgamma.shape, dbeta.tolist()
    ((8, 3), (3,), [8.0, 8.0, 8.0])
    """
    if xp is None:
        xp = namespace(dy, ctx.x)
    check_float_input(xp, dy, "dy")
    if tuple(dy.shape) != tuple(ctx.x.shape):
        raise ValueError(
            f"dy has shape {tuple(dy.shape)}, expected the forward input's {tuple(ctx.x.shape)}"
        )
    cdt = ctx.mean.dtype  # the compute dtype: the input's, at least float32
    dx, dgamma, dbeta = _kernels.normalize_backward(
        xp,
        xp.astype(dy, cdt, copy=False),
        xp.astype(ctx.x, cdt, copy=False),
        ctx.axis,
        reduce_axes(ctx.x.ndim, ctx.axis),
        ctx.mean,
        ctx.rstd,
        ctx.gamma,
        ctx.stats_weight,
        ctx.batch_mean,
        ctx.count,
        ctx.all_sum,
    )
    return (
        xp.astype(dx, ctx.x.dtype, copy=False),
        None if ctx.gamma_dtype is None else xp.astype(dgamma, ctx.gamma_dtype, copy=False),
        None if ctx.beta_dtype is None else xp.astype(dbeta, ctx.beta_dtype, copy=False),
    )


class KernelTerms(NamedTuple):
    """How BN's fused training-backward kernel gives MBN's gradient; see :func:`kernel_terms`.

    Call the kernel with ``(ctx.mean, rstd, weight)``; from its ``dx``, ``S1 = sum(dy*xhat)``
    and ``S0 = sum(dy)``: ``dx + sum_dy_scale*S0 + sum_dy_xhat_scale*S1``, ``dgamma =
    S1/rstd_scale``, ``dbeta = S0`` (per-channel vectors and a 0-d ``rstd_scale``, in the
    compute dtype). ``rstd`` is ``ctx.rstd*rstd_scale`` and ``weight`` is
    ``gamma/rstd_scale``.
    """

    rstd: Array
    weight: Array
    sum_dy_scale: Array
    sum_dy_xhat_scale: Array
    rstd_scale: Array


def kernel_terms(ctx: NormContext, *, xp: Namespace | None = None) -> KernelTerms:
    """MBN's gradient through a framework's fused BN training-backward kernel.

    Such a kernel ``K`` takes the statistics that normalized a batch and computes BN's
    gradient for them (PyTorch's ``native_batch_norm_backward`` with ``save_mean`` and
    ``save_invstd``)::

        K(dy; mean, rstd, weight) = weight*rstd*(dy - sum(dy)/m - xhat*sum(dy*xhat)/m)

    with ``xhat = (x - mean)*rstd``, and returns ``sum(dy*xhat)`` and ``sum(dy)`` beside it.
    MBN's gradient (``ctx`` of a training step, from :func:`mbn_ref.mbn_from_moments` or
    :func:`mbn_ref.mbn_forward`) is that kernel called with a scaled ``rstd`` and ``weight``,
    plus one per-channel constant built from the kernel's two sums
    (``docs/derivations/backward.md``)::

        dx, s1, s0 = K(dy; ctx.mean, t.rstd, t.weight), sum(dy*xhat), sum(dy)
        dx = dx + t.sum_dy_scale*s0 + t.sum_dy_xhat_scale*s1
        dgamma, dbeta = s1/t.rstd_scale, s0

    one pass over the data besides the kernel's.

    Parameters
    ----------
    ctx : NormContext
        A training step's context, not synchronized (the kernel's sums are this shard's).
    xp : namespace, optional
        The Array API namespace; by default found with array-api-compat.

    Returns
    -------
    KernelTerms
        With ``o = sqrt(1 - lam)``, ``r = ctx.rstd``, ``s = gamma*r`` (``gamma`` 1 when
        absent) and ``m`` values per channel: ``rstd = o*r``, ``weight = gamma/o``,
        ``sum_dy_scale = lam*s/m``, ``sum_dy_xhat_scale = o*s*r*(mu_B - mean)/m`` and
        ``rstd_scale = o``. ``o`` is ``sqrt(1 - lam + eps**2)`` for the dtype's ``eps``: the
        same number wherever ``1 - lam > eps``, and no division by zero at ``lam = 1``.

    Raises
    ------
    ValueError
        A synchronized context, or one of constant statistics (evaluation).

    Examples
    --------
    A NumPy stand-in for the kernel gives :func:`backward`'s gradients:

    >>> import numpy as np
    >>> import mbn_ref as mr
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.normal(2.0, 3.0, size=(6, 2)), rng.normal(size=(6, 2))
    >>> y, state, ctx = mr.mbn_forward(x, mr.init_state(2), np.full(2, 2.0), None, lam=0.3)
    >>> def kernel(dy, mean, rstd, weight):
    ...     xhat = (x - mean) * rstd
    ...     dx = weight * rstd * (dy - dy.mean(0) - xhat * (dy * xhat).mean(0))
    ...     return dx, (dy * xhat).sum(0), dy.sum(0)
    >>> t = mr.kernel_terms(ctx)
    >>> k, s1, s0 = kernel(dy, ctx.mean, t.rstd, t.weight)
    >>> dx = k + t.sum_dy_scale * s0 + t.sum_dy_xhat_scale * s1
    >>> expected_dx, expected_dgamma, _ = mr.backward(dy, ctx)
    >>> bool(np.allclose(dx, expected_dx, rtol=1e-12, atol=1e-12))
    True
    >>> bool(np.allclose(s1 / t.rstd_scale, expected_dgamma, rtol=1e-12, atol=1e-12))
    True
    """
    if ctx.all_sum is not None:
        raise ValueError(
            "kernel_terms needs this shard's statistics; a synchronized context sums over "
            "all shards: use mbn_ref.backward"
        )
    if ctx.batch_mean is None:
        raise ValueError("kernel_terms needs a training step's context (it has no batch_mean)")
    if xp is None:
        xp = namespace(ctx.rstd)
    return KernelTerms(
        *_kernels.kernel_terms(
            xp, ctx.mean, ctx.rstd, ctx.gamma, ctx.stats_weight, ctx.batch_mean, ctx.count
        )
    )
