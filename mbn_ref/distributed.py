"""Multi-device aggregation: merged moments, synchronized BN/MBN, per-device MBN (docs/spec.md §5).

Synchronized statistics are not separate math: :func:`mbn_ref.bn_forward` and
:func:`mbn_ref.mbn_forward` take ``all_sum``, a collective that sums an array across shards,
and every shard calls them SPMD-style with its own part of the batch. The adapters pass
``torch.distributed.all_reduce`` or a ``tf.distribute`` replica context's ``all_reduce``;
:func:`simulate` runs the same code on threads in one process, which is how the tests prove
that synchronized BN/MBN over any partition equals one device on the concatenated batch.

>>> import numpy as np
>>> import mbn_ref as mr
>>> from mbn_ref import distributed as dist
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(7, 3))
>>> shards = [x[:2], x[2:2], x[2:]]                       # unequal, one empty
>>> ys, states, ctxs = dist.sync_bn_forward(shards, mr.init_bn_state(3))
>>> y, _, _ = mr.bn_forward(x, mr.init_bn_state(3))
>>> bool(np.allclose(np.concatenate(ys), y))
True
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import array_api_compat

from ._array import AllSum, Array, Namespace, device_of, namespace, resolve_namespace
from ._normalization import backward
from .bn import BNState, bn_forward
from .context import NormContext
from .mbn import MBNState, mbn_forward

__all__ = [
    "AllSum",
    "merge_inference_statistics",
    "merge_moments",
    "simulate",
    "sync_backward",
    "sync_bn_forward",
    "sync_mbn_forward",
]

T = TypeVar("T")


def merge_moments(
    counts: Sequence[int] | Array,
    means: Sequence[Array] | Array,
    variances: Sequence[Array] | Array,
    *,
    xp: Namespace | None = None,
) -> tuple[Array, Array, Array]:
    """Merge per-shard ``(n_k, mean_k, var_k)`` (biased variances) into global moments.

    ``n = sum n_k``, ``mean = sum n_k mean_k / n``,
    ``var = sum n_k (var_k + (mean_k - mean)^2) / n`` (Chan et al.'s pairwise merge, in its
    count-weighted form; never ``E[x^2] - E[x]^2``). Shards with ``n_k = 0`` contribute nothing,
    whatever their (possibly NaN) moments; merging only empty shards gives ``(0, 0, 0)``, the
    identity of the merge.

    Parameters
    ----------
    counts : sequence of int or array
        The K shards' counts ``n_k`` (K entries, each ``>= 0``).
    means : sequence of arrays or array
        The shards' means: a ``(K, ...)`` array or a sequence of K equally shaped arrays.
    variances : sequence of arrays or array
        The shards' biased variances, shaped like ``means``.
    xp : namespace, optional
        The Array API namespace of the moments; by default found with array-api-compat
        (NumPy for plain Python numbers).

    Returns
    -------
    n : array
        The 0-d total count, in the moments' dtype.
    mean, var : array
        The global mean and biased variance, shaped like one shard's moments.

    Raises
    ------
    ValueError
        Shapes disagree (means and variances, counts and shards, shards among themselves) or
        a count is negative.

    Examples
    --------
    >>> import numpy as np
    >>> n, mean, var = merge_moments([2, 0, 3], [[1.0], [np.nan], [2.0]], [[0.25], [np.nan], [1.0]])
    >>> int(n), float(mean[0]), round(float(var[0]), 6)
    (5, 1.6, 0.94)
    """
    if xp is None:
        xp = _namespace_of(means, variances)
    m_arr = _stack(xp, means)
    v_arr = _stack(xp, variances)
    if m_arr.shape != v_arr.shape:
        raise ValueError(
            f"means and variances must have the same shape, got {tuple(m_arr.shape)} and "
            f"{tuple(v_arr.shape)}"
        )
    dtype = m_arr.dtype
    n_arr = xp.asarray(counts, dtype=dtype, device=device_of(m_arr))
    shards = m_arr.shape[0]  # None when only known at run time (a traced program)
    if n_arr.ndim != 1 or (shards is not None and n_arr.shape[0] != shards):
        raise ValueError(
            f"counts must hold one entry per shard ({m_arr.shape[0]}), got shape "
            f"{tuple(n_arr.shape)}"
        )
    if bool(xp.any(n_arr < 0)):
        raise ValueError("counts must be >= 0")
    w = xp.reshape(n_arr, (-1,) + (1,) * (m_arr.ndim - 1))
    present = w > 0
    zero = xp.zeros_like(m_arr)
    m_arr = xp.where(present, m_arr, zero)
    v_arr = xp.where(present, v_arr, zero)
    n = xp.sum(n_arr)
    denom = xp.maximum(n, xp.ones_like(n))
    mean = xp.sum(w * m_arr, axis=0) / denom
    dev = xp.where(present, m_arr - mean, zero)
    var = xp.sum(w * (v_arr + dev * dev), axis=0) / denom
    return n, mean, var


def _namespace_of(*parts: Any) -> Any:
    """The namespace of the arrays among ``parts`` (one level of sequences unpacked).

    NumPy for plain Python numbers.
    """
    flat = [q for p in parts for q in (p if isinstance(p, (list, tuple)) else [p])]
    arrays = [q for q in flat if array_api_compat.is_array_api_obj(q)]
    return namespace(*arrays) if arrays else resolve_namespace(None)


def _stack(xp: Any, a: Sequence[Array] | Array) -> Array:
    if isinstance(a, (list, tuple)):
        parts = [xp.asarray(p) for p in a]
        if parts and len({tuple(p.shape) for p in parts}) > 1:
            raise ValueError(
                "shards have different channel counts: "
                + ", ".join(str(tuple(p.shape)) for p in parts)
            )
        return xp.stack(parts)
    return xp.asarray(a)


class _ThreadAllSum:
    """A sum across ``world_size`` threads that meet at a barrier.

    Deterministic: every thread adds the contributions in rank order, so all get
    bit-identical totals.
    """

    def __init__(self, world_size: int, timeout: float) -> None:
        self.slots: list[Any] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout)

    def for_rank(self, rank: int) -> AllSum:
        def all_sum(x: Array) -> Array:
            self.slots[rank] = x
            self.barrier.wait()
            total = self.slots[0]
            for part in self.slots[1:]:
                total = total + part
            self.barrier.wait()
            return total

        return all_sum


def simulate(world_size: int, fn: Callable[[int, AllSum], T], *, timeout: float = 60.0) -> list[T]:
    """Run ``fn(rank, all_sum)`` for ``rank = 0..world_size-1`` on threads in lockstep.

    ``all_sum`` is a real collective among the threads: this is the SPMD program an adapter
    runs on real devices, in one process. An exception on any rank aborts the others and is
    re-raised (the lowest rank's first).

    Parameters
    ----------
    world_size : int
        The number of ranks (threads), ``>= 1``.
    fn : callable
        ``fn(rank, all_sum)``, the program of one rank; ``all_sum(a)`` returns the sum of the
        ``a`` of all ranks (it blocks until every rank has called it).
    timeout : float, optional
        Seconds a rank waits for the others at a collective before the run fails.

    Returns
    -------
    list
        ``fn``'s results, in rank order.

    Raises
    ------
    ValueError
        ``world_size < 1``.
    Exception
        Whatever a rank raised (the lowest rank's first), or
        ``threading.BrokenBarrierError`` on a timeout.

    Examples
    --------
    >>> simulate(3, lambda rank, all_sum: all_sum(rank + 1))
    [6, 6, 6]
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    coll = _ThreadAllSum(world_size, timeout)
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def run(rank: int) -> None:
        try:
            results[rank] = fn(rank, coll.for_rank(rank))
        except BaseException as exc:
            errors[rank] = exc
            coll.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    primary = [
        e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)
    ]
    if primary:
        raise primary[0]
    if any(e is not None for e in errors):
        raise next(e for e in errors if e is not None)
    return results


def _check_shards(shards: Sequence[Array], axis: int) -> None:
    """``ValueError`` unless all shards agree on rank and channel count (docs/spec.md §9)."""
    if not shards:
        raise ValueError("need at least one shard")
    try:
        channels = {s.shape[axis] for s in shards}
    except IndexError:
        channels = set()
    ranks = {s.ndim for s in shards}
    if len(channels) != 1 or len(ranks) != 1:
        raise ValueError(
            f"shards must share rank and channel count on axis {axis}, got shapes "
            + ", ".join(str(tuple(s.shape)) for s in shards)
        )


def sync_bn_forward(
    shards: Sequence[Array],
    state: BNState | None,
    gamma: Array | None = None,
    beta: Array | None = None,
    **kwargs: Any,
) -> tuple[list[Array], list[BNState | None], list[NormContext]]:
    """Synchronized BN over simulated shards: ``bn_forward(..., all_sum=...)`` on each.

    Every shard starts from ``state`` and gets the same update (from the global statistics);
    the returned per-shard states are equal, which the tests check.

    Parameters
    ----------
    shards : sequence of arrays
        The shards' parts of the batch: same rank and channel count, any (even zero) size
        along the other axes.
    state : BNState or None
        The running statistics every shard starts from (``None``: no tracking).
    gamma, beta : array, optional
        Per-channel affine parameters, shared by all shards.
    **kwargs
        :func:`mbn_ref.bn_forward`'s keyword arguments (``decay``, ``eps``, ``axis``...),
        but not ``all_sum``.

    Returns
    -------
    ys : list of arrays
        Each shard's output.
    states : list of BNState or None
        Each shard's new state (all equal).
    ctxs : list of NormContext
        Each shard's backward context, for :func:`sync_backward`.

    Raises
    ------
    ValueError
        The shards disagree on rank or channel count, or there are none; or
        :func:`mbn_ref.bn_forward` rejects the arguments.

    Examples
    --------
    >>> import numpy as np
    >>> import mbn_ref as mr
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> ys, states, ctxs = sync_bn_forward([x[:1], x[1:]], mr.init_bn_state(3), decay=0.9)
    >>> np.round(np.concatenate(ys)[:, 0], 4).tolist()
    [-1.3416, -0.4472, 0.4472, 1.3416]
    >>> np.round(states[1].running_mean, 6).tolist()
    [0.45, 0.55, 0.65]
    """
    return _sync_forward(bn_forward, shards, state, gamma, beta, kwargs)


def sync_mbn_forward(
    shards: Sequence[Array],
    state: MBNState,
    gamma: Array | None = None,
    beta: Array | None = None,
    **kwargs: Any,
) -> tuple[list[Array], list[MBNState], list[NormContext]]:
    """Synchronized MBN over simulated shards (global statistics feed both moving averages).

    ``mbn_forward(..., all_sum=...)`` on each shard; as :func:`sync_bn_forward`, every shard
    starts from ``state`` and gets the same update.

    Parameters
    ----------
    shards : sequence of arrays
        The shards' parts of the batch: same rank and channel count.
    state : MBNState
        The state every shard starts from.
    gamma, beta : array, optional
        Per-channel affine parameters, shared by all shards.
    **kwargs
        :func:`mbn_ref.mbn_forward`'s keyword arguments (``lam``, ``tau``, ``eps``...), but
        not ``all_sum``.

    Returns
    -------
    ys : list of arrays
        Each shard's output.
    states : list of MBNState
        Each shard's new state (all equal).
    ctxs : list of NormContext
        Each shard's backward context, for :func:`sync_backward`.

    Raises
    ------
    ValueError
        The shards disagree on rank or channel count, or there are none; or
        :func:`mbn_ref.mbn_forward` rejects the arguments.

    Examples
    --------
    >>> import numpy as np
    >>> import mbn_ref as mr
    >>> x = np.random.default_rng(0).normal(size=(6, 2))
    >>> ys, states, _ = sync_mbn_forward([x[:2], x[2:]], mr.init_state(2), lam=0.5)
    >>> y, state, _ = mr.mbn_forward(x, mr.init_state(2), lam=0.5)
    >>> bool(np.allclose(np.concatenate(ys), y))
    True
    >>> bool(np.allclose(states[0].moving_mean, state.moving_mean))
    True
    """
    return _sync_forward(mbn_forward, shards, state, gamma, beta, kwargs)


def _sync_forward(
    forward: Callable[..., Any],
    shards: Sequence[Array],
    state: Any,
    gamma: Array | None,
    beta: Array | None,
    kwargs: dict[str, Any],
) -> tuple[list[Array], list[Any], list[NormContext]]:
    """Run ``forward(shard, state, ..., all_sum=...)`` SPMD over simulated shards."""
    _check_shards(shards, kwargs.get("axis", 1))
    out = simulate(
        len(shards),
        lambda r, all_sum: forward(shards[r], state, gamma, beta, all_sum=all_sum, **kwargs),
    )
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def sync_backward(
    dys: Sequence[Array], ctxs: Sequence[NormContext]
) -> tuple[list[Array], Array | None, Array | None]:
    """Backward of :func:`sync_bn_forward` / :func:`sync_mbn_forward` over simulated shards.

    Each shard's ``dx`` uses the two C-vectors ``sum(dy)``, ``sum(dy*xhat)`` summed over all
    shards (the collective lives in each context); ``dgamma``/``dbeta`` are each shard's sums,
    added here as a data-parallel engine would reduce them.

    Parameters
    ----------
    dys : sequence of arrays
        Each shard's output gradient, shaped like its forward input.
    ctxs : sequence of NormContext
        The contexts the synchronized forward returned, one per shard.

    Returns
    -------
    dxs : list of arrays
        Each shard's input gradient.
    dgamma, dbeta : array or None
        The parameter gradients summed over the shards; ``None`` for a parameter the forward
        call did not have.

    Raises
    ------
    ValueError
        ``dys`` and ``ctxs`` differ in length, or :func:`mbn_ref.backward` rejects a
        gradient.

    Examples
    --------
    >>> import numpy as np
    >>> import mbn_ref as mr
    >>> x = np.random.default_rng(0).normal(size=(5, 3))
    >>> ys, _, ctxs = sync_bn_forward([x[:2], x[2:]], mr.init_bn_state(3), np.ones(3))
    >>> dxs, dgamma, dbeta = sync_backward([np.ones_like(y) for y in ys], ctxs)
    >>> float(abs(np.concatenate(dxs)).max()) < 1e-12, dbeta
    (True, None)
    """
    if len(dys) != len(ctxs):
        raise ValueError(f"got {len(dys)} gradients for {len(ctxs)} shards")
    out = simulate(
        len(ctxs),
        lambda r, all_sum: backward(dys[r], ctxs[r].replace(all_sum=all_sum)),
    )
    dgamma = _total([o[1] for o in out])
    dbeta = _total([o[2] for o in out])
    return [o[0] for o in out], dgamma, dbeta


def _total(parts: list[Array | None]) -> Array | None:
    if parts[0] is None:
        return None
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def merge_inference_statistics(
    states: Sequence[MBNState], counts: Sequence[int], *, xp: Namespace | None = None
) -> MBNState:
    """One consistent MBN state from per-device states (the paper's per-GPU setting).

    Each device's inference statistics estimate the mean and variance of what that device
    saw; they are merged count-weighted with :func:`merge_moments` (law of total variance), so
    the result is what one device would hold had it seen all devices' data in the proportions
    ``counts`` (e.g. per-device batch sizes). The training moving statistics are merged the
    same way and the step counter is the maximum. Assign the result to every device before
    evaluating.

    Parameters
    ----------
    states : sequence of MBNState
        The devices' states (at least one), with equally shaped statistics.
    counts : sequence of int
        The weight of each device's data (e.g. per-device batch sizes), one per state.
    xp : namespace, optional
        The Array API namespace of the states; by default found with array-api-compat.

    Returns
    -------
    MBNState
        The merged state, in the first state's dtypes.

    Raises
    ------
    ValueError
        ``states`` is empty or ``counts`` has another length; or :func:`merge_moments`
        rejects the statistics.

    Examples
    --------
    >>> import numpy as np
    >>> import mbn_ref as mr
    >>> a, b = mr.init_state(1), mr.init_state(1)
    >>> b = b._replace(running_mean=np.array([3.0]), running_var=np.array([0.0]))
    >>> merged = merge_inference_statistics([a, b], counts=[1, 2])
    >>> float(merged.running_mean[0]), round(float(merged.running_var[0]), 6)  # 7/3
    (2.0, 2.333333)
    """
    if len(states) != len(counts) or not states:
        raise ValueError(f"got {len(states)} states for {len(counts)} counts")
    if xp is None:
        xp = namespace(states[0].running_mean)
    _, moving_mean, moving_var = merge_moments(
        counts, [s.moving_mean for s in states], [s.moving_var for s in states], xp=xp
    )
    _, running_mean, running_var = merge_moments(
        counts, [s.running_mean for s in states], [s.running_var for s in states], xp=xp
    )
    first = states[0]
    steps = xp.max(xp.stack([s.num_batches_tracked for s in states]))
    return MBNState(
        xp.astype(moving_mean, first.moving_mean.dtype),
        xp.astype(moving_var, first.moving_var.dtype),
        xp.astype(running_mean, first.running_mean.dtype),
        xp.astype(running_var, first.running_var.dtype),
        steps,
    )
