"""What BN and MBN share around the math: argument checks, dtype handling, the backward
context, and the ``nonfinite`` policy (SPEC §7, §9)."""

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
    is_real_scalar,
    namespace,
    normalize_axis,
    reduce_axes,
    reduced_count,
)
from .errors import NonFiniteError

NonfinitePolicy = Literal["propagate", "skip_update", "raise"]
NONFINITE_POLICIES: tuple[NonfinitePolicy, ...] = ("propagate", "skip_update", "raise")


class NormContext(NamedTuple):
    """What the backward pass needs from a forward pass (opaque to users).

    ``mean``/``rstd`` are the per-channel statistics that normalized ``x``; ``stats_weight``
    is how strongly they depend on the batch (``1 - lam``; 0 in evaluation) and
    ``batch_mean`` the batch's own mean (``None`` when the statistics are constants).
    """

    x: Array  # in the compute dtype
    dtype: Any  # the caller's dtype of x, which dx comes back in
    axis: int
    mean: Array
    rstd: Array
    gamma: Array | None
    gamma_dtype: Any
    beta_dtype: Any
    stats_weight: Any
    batch_mean: Array | None
    m: int
    all_sum: AllSum | None = None


@dataclass(frozen=True)
class Batch:
    """A validated input, its parameters in the compute dtype, and its geometry."""

    xp: Namespace
    x: Array  # in the compute dtype
    dtype: Any  # the caller's dtype, which outputs come back in
    axis: int
    axes: tuple[int, ...]
    m: int
    channels: int
    gamma: Array | None
    beta: Array | None
    gamma_dtype: Any
    beta_dtype: Any
    nonfinite: NonfinitePolicy

    def context(
        self,
        mean: Array,
        rstd: Array,
        stats_weight: Any,
        batch_mean: Array | None,
        m: int | None = None,
        all_sum: AllSum | None = None,
    ) -> NormContext:
        return NormContext(
            self.x,
            self.dtype,
            self.axis,
            mean,
            rstd,
            self.gamma,
            self.gamma_dtype,
            self.beta_dtype,
            stats_weight,
            batch_mean,
            self.m if m is None else m,
            all_sum,
        )


def check_eps(eps: float) -> float:
    if not is_real_scalar(eps) or not eps > 0:
        raise ValueError(f"eps must be a real number > 0, got {eps!r}")
    return float(eps)


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
    """``ValueError`` naming the missing/unexpected keys when ``state`` is not the expected
    NamedTuple (e.g. a BN state handed to MBN), SPEC §9."""
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
) -> Batch:
    """Validate a forward call's arguments and bring them into the compute dtype."""
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
        if not xp.isdtype(v.dtype, "real floating"):  # SPEC §9: ValueError naming the key
            raise ValueError(
                f"state field {name} has dtype {v.dtype}; expected a real floating dtype"
            )
    cdt = compute_dtype(xp, x.dtype)
    return Batch(
        xp=xp,
        x=xp.astype(x, cdt, copy=False),
        dtype=x.dtype,
        axis=ax,
        axes=reduce_axes(x.ndim, ax),
        m=reduced_count(shape, ax),
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


def check_decay_arg(value: Any, name: str, *, allow_none: bool = False) -> None:
    """Python numbers are checked here; arrays (runtime state) are the caller's to keep valid."""
    if value is None:
        if not allow_none:
            raise ValueError(f"{name} must be a decay in [0, 1], got None")
        return
    if is_real_scalar(value) and not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a decay in [0, 1], got {value}")


def finite_flag(b: Batch, var: Array) -> Array | None:
    """Apply the ``nonfinite`` policy to a batch's variance (NaN/Inf anywhere in a channel
    makes its variance non-finite). Returns the 0-d "all finite" flag for ``skip_update``."""
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


def cumulative_decay(xp: Namespace, n: Array, dtype: Any) -> Array:
    """Decay ``n/(n+1)`` of the (n+1)-th update: the running value is the exact mean."""
    nf = xp.astype(n, dtype)
    return nf / (nf + 1)


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
    """The running (inference) statistics and counter after one batch: BN's running
    statistics and MBN's inference ones alike. ``decay=None`` is the cumulative average;
    ``var`` is already under the chosen estimator; ``ok`` is the ``skip_update`` flag."""
    d = cumulative_decay(xp, n, mean.dtype) if decay is None else decay
    return (
        keep_if(xp, ok, _kernels.ema(running_mean, mean, d), running_mean),
        keep_if(xp, ok, _kernels.ema(running_var, var, d), running_var),
        n + (1 if ok is None else xp.astype(ok, n.dtype)),
    )


def running_variance(var: Array, count: int, estimator: str) -> Array:
    """The batch variance as it enters running statistics: biased, or ``* m/(m-1)``."""
    if estimator == "unbiased":
        if count < 2:
            raise ValueError(
                "the unbiased running-variance estimator needs at least 2 values per channel, "
                f"got {count}; use estimator='biased' or a larger batch"
            )
        return var * (count / (count - 1))
    return var


def require_two_values(b: Batch, m: int, why: str) -> None:
    """``ValueError`` for a training batch of one value per channel (SPEC §3); ``m`` is the
    global count under synchronized statistics."""
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
    return xp.astype(y, b.dtype, copy=False), b.context(mean, rstd, 0, None)


def train_statistics(
    b: Batch, all_sum: AllSum | None, *, lam: Any, why: str
) -> tuple[int, Array, Array, Array] | None:
    """The batch's ``(m, mean, var, x - mean)``, global under ``all_sum``; ``None`` when the
    batch (every shard's, under ``all_sum``) is empty.

    One value per channel is rejected unless ``lam > 0`` (MBN normalizing with history;
    ``lam=None`` for BN). ``lam`` is read on the host only in that rare case.
    """

    def check(m: int) -> None:
        if m == 1 and (lam is None or float(lam) == 0.0):
            require_two_values(b, m, why)

    if all_sum is None:
        if b.m == 0:
            return None
        check(b.m)
    m, mean, var, centered = _kernels.batch_moments(b.xp, b.x, b.axis, b.axes, b.m, all_sum)
    if m == 0:
        return None
    check(m)
    return m, mean, var, centered


def empty_forward(b: Batch) -> tuple[Array, NormContext]:
    """Output and context for a batch with no values per channel (SPEC §9: state unchanged)."""
    xp = b.xp
    zeros = xp.zeros((b.channels,), dtype=b.x.dtype, device=device_of(b.x))
    return xp.astype(b.x, b.dtype), b.context(zeros, zeros + 1, 0, None)


def backward(dy: Array, ctx: NormContext) -> tuple[Array, Array | None, Array | None]:
    """``(dx, dgamma, dbeta)`` for a forward pass's context; ``None`` for absent parameters."""
    xp = namespace(dy, ctx.x)
    check_float_input(xp, dy, "dy")
    if tuple(dy.shape) != tuple(ctx.x.shape):
        raise ValueError(
            f"dy has shape {tuple(dy.shape)}, expected the forward input's {tuple(ctx.x.shape)}"
        )
    dyc = xp.astype(dy, ctx.x.dtype, copy=False)
    axes = reduce_axes(dyc.ndim, ctx.axis)
    dx, dgamma, dbeta = _kernels.normalize_backward(
        xp,
        dyc,
        ctx.x,
        ctx.axis,
        axes,
        ctx.mean,
        ctx.rstd,
        ctx.gamma,
        ctx.stats_weight,
        ctx.batch_mean,
        ctx.m,
        ctx.all_sum,
    )
    return (
        xp.astype(dx, ctx.dtype, copy=False),
        None if ctx.gamma_dtype is None else xp.astype(dgamma, ctx.gamma_dtype, copy=False),
        None if ctx.beta_dtype is None else xp.astype(dbeta, ctx.beta_dtype, copy=False),
    )
