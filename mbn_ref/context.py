"""The backward context: what :func:`mbn_ref.backward` needs from a forward pass.

A forward call returns ``(y, state, ctx)``; ``backward(dy, ctx)`` turns the output gradient
into ``(dx, dgamma, dbeta)``. A framework that keeps its own autograd tape stores the context
its own way: :meth:`NormContext.split` gives the arrays (for ``save_for_backward``, JAX
residuals, a ``tf.custom_gradient`` closure) and a hashable static part (Python values:
axis, dtypes, the collective), and :meth:`NormContext.join` rebuilds the context from the two
in the backward pass.

>>> import numpy as np
>>> import mbn_ref as mr
>>> x = np.arange(12.0).reshape(4, 3)
>>> y, state, ctx = mr.bn_forward(x, mr.init_bn_state(3))
>>> arrays, static = ctx.split()
>>> [name for name, a in zip(mr.NormContext.ARRAY_FIELDS, arrays) if a is not None]
['x', 'mean', 'rstd', 'stats_weight', 'batch_mean']
>>> static.axis, static.count
(1, 4)
>>> dx, dgamma, dbeta = mr.backward(np.ones_like(x), mr.NormContext.join(arrays, static))
>>> float(abs(dx).max()) < 1e-12
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ._array import AllSum, Array, is_array

__all__ = ["ContextStatic", "NormContext"]


@dataclass(frozen=True)
class ContextStatic:
    """The non-array part of a :class:`NormContext`: plain Python values.

    Attributes
    ----------
    axis : int
        The non-negative channel axis of the forward input.
    count : int or None
        Values per channel that the statistics were computed over (global under
        synchronized statistics); ``None`` when the count is an array (a batch size known
        only at run time), which then travels with the arrays.
    gamma_dtype, beta_dtype : dtype or None
        The dtypes ``dgamma``/``dbeta`` come back in; ``None`` for an absent parameter.
    all_sum : callable or None
        The collective of synchronized statistics (see :mod:`mbn_ref.distributed`).
    """

    axis: int
    count: int | None
    gamma_dtype: Any = None
    beta_dtype: Any = None
    all_sum: AllSum | None = None


@dataclass(frozen=True, kw_only=True)
class NormContext:
    """What the backward pass needs from a forward pass (built by keyword).

    The forward normalized ``x`` as ``y = gamma * (x - mean) * rstd + beta``. The
    statistics ``mean``/``rstd`` depend on the batch through its own mean ``batch_mean`` with
    weight ``stats_weight``: ``1 - lam`` in MBN training, 1 in BN training, 0 when the
    statistics are constants (evaluation, an empty batch), in which case ``batch_mean`` is
    ``None`` (docs/spec.md §3; derivation in ``docs/derivations/backward.md``).

    Attributes
    ----------
    x : array
        The forward input, in its own dtype (float16/bfloat16 inputs are kept as they are and
        upcast inside the backward pass).
    mean, rstd : array
        Per-channel vectors that normalized ``x``, in the compute dtype (at least float32).
    gamma : array or None
        The per-channel scale in the compute dtype.
    stats_weight : array
        A 0-d array in the compute dtype, always an array (never a Python number), so that a
        decay held as runtime state never reaches the host.
    batch_mean : array or None
        The batch's own mean; ``None`` when the statistics are constants.
    count : int or array
        Values per channel behind the statistics; a 0-d array when the batch size is known
        only at run time (e.g. ``None`` in a traced static shape).
    axis : int
        The non-negative channel axis.
    gamma_dtype, beta_dtype : dtype or None
        The dtypes of the gradients of ``gamma``/``beta``; ``None`` for absent parameters.
    all_sum : callable or None
        The collective of synchronized statistics: the backward pass sums two C-vectors with
        it.
    """

    ARRAY_FIELDS: ClassVar[tuple[str, ...]] = (
        "x",
        "mean",
        "rstd",
        "gamma",
        "stats_weight",
        "batch_mean",
        "count",
    )
    """The order of :meth:`split`'s arrays (``count`` is ``None`` there when it is static)."""

    x: Array
    mean: Array
    rstd: Array
    gamma: Array | None
    stats_weight: Array
    batch_mean: Array | None
    count: int | Array
    axis: int
    gamma_dtype: Any = None
    beta_dtype: Any = None
    all_sum: AllSum | None = None

    def split(self) -> tuple[tuple[Array | None, ...], ContextStatic]:
        """The arrays (in :attr:`ARRAY_FIELDS` order, ``None`` for absent ones) and the rest.

        >>> import numpy as np
        >>> import mbn_ref as mr
        >>> _, _, ctx = mr.mbn_forward(np.ones((2, 3)), mr.init_state(3), lam=0.5)
        >>> arrays, static = ctx.split()
        >>> len(arrays), static.count
        (7, 2)
        """
        dynamic_count = is_array(self.count)
        arrays = tuple(
            (self.count if dynamic_count else None) if name == "count" else getattr(self, name)
            for name in self.ARRAY_FIELDS
        )
        static = ContextStatic(
            axis=self.axis,
            count=None if dynamic_count else self.count,
            gamma_dtype=self.gamma_dtype,
            beta_dtype=self.beta_dtype,
            all_sum=self.all_sum,
        )
        return arrays, static

    @classmethod
    def join(cls, arrays: Sequence[Array | None], static: ContextStatic) -> NormContext:
        """The context that :meth:`split` gave ``arrays`` and ``static`` for.

        ``arrays`` may be any sequence in :attr:`ARRAY_FIELDS` order, e.g. a
        ``torch.autograd.Function``'s ``ctx.saved_tensors``.
        """
        if len(arrays) != len(cls.ARRAY_FIELDS):
            raise ValueError(
                f"expected {len(cls.ARRAY_FIELDS)} arrays {cls.ARRAY_FIELDS}, got {len(arrays)}"
            )
        values = dict(zip(cls.ARRAY_FIELDS, arrays, strict=True))
        if static.count is not None:
            values["count"] = static.count
        elif values["count"] is None:
            raise ValueError("the count is neither static nor among the arrays")
        return cls(
            **values,
            axis=static.axis,
            gamma_dtype=static.gamma_dtype,
            beta_dtype=static.beta_dtype,
            all_sum=static.all_sum,
        )

    def replace(self, **changes: Any) -> NormContext:
        """A copy with some fields changed (e.g. ``all_sum`` for another rank's collective)."""
        return replace(self, **changes)
