"""The ``torch.autograd.Function`` around the core's forward and backward.

The forward pass is :func:`mbn_ref.mbn_forward` (or :func:`mbn_ref.bn_forward` without
running statistics) on ``array_api_compat.torch``; the backward context is saved with
``save_for_backward`` through :meth:`mbn_ref.NormContext.split`, and the backward pass is
:func:`mbn_ref.backward`. Decays are 0-d tensors (runtime state): they are never read on the
host, so a new value reuses a compiled graph. The functions here are pure: they return the
new state, and the modules write it into their buffers.

>>> import torch
>>> import mbn_ref as mr
>>> import array_api_compat.torch as xp
>>> state = mr.init_state(3, xp=xp, dtype=torch.float64)
>>> x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
>>> y, new = momentum_batch_norm(x, None, None, state, torch.tensor(0.5), torch.tensor(0.9))
>>> y.sum().backward()
>>> x.grad.shape, int(new.num_batches_tracked)
(torch.Size([4, 3]), 1)
"""

from __future__ import annotations

import functools
from typing import Any

import array_api_compat.torch as txp
import torch

import mbn_ref as mr
from mbn_ref import conventions
from mbn_ref.distributed import AllSum

__all__ = [
    "batch_statistics_norm",
    "kernel_momentum_batch_norm",
    "kernel_momentum_batch_norm_",
    "momentum_batch_norm",
    "saved",
]

_N_STATE = len(mr.MBNState._fields)


def saved(*vectors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``vectors`` through one ``torch.stack``: values a compiled backward saves, never recomputes.

    Under ``torch.compile``, AOTAutograd's min-cut partitioner may recompute a value the
    backward needs from a state buffer that the forward mutated, reading the updated
    buffer: silently wrong gradients (PyTorch pull request 197039, "Don't recompute reads of
    mutated inputs or mutable buffers", open). ``aten.cat``, which ``stack`` becomes, is not
    on the partitioner's recompute allowlist
    (``torch._functorch.partitioners.get_default_op_list``), so the stacked values are
    saved, and the backward reads them as they are rather than recomputing per-channel
    factors inside its loop over the data. ``tests/test_torch_modules.py`` (the compiled
    training trajectory) fails without it.

    Parameters
    ----------
    *vectors : torch.Tensor
        Tensors of one shape and dtype.

    Returns
    -------
    tuple of torch.Tensor
        Their values (views of the stack).

    Examples
    --------
    >>> import torch
    >>> [v.tolist() for v in saved(torch.ones(2), torch.zeros(2))]
    [[1.0, 1.0], [0.0, 0.0]]
    """
    return torch.stack(vectors).unbind(0)


class _MBNFunction(torch.autograd.Function):
    """MBN (BN when ``lam = 0``) with its state: ``(y, *new_state, arrays, static)``."""

    @staticmethod
    def forward(
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        *rest: Any,
    ) -> Any:
        state = mr.MBNState(*rest[:_N_STATE])
        lam, tau, training, eps, estimator, nonfinite, all_sum = rest[_N_STATE:]
        y, new_state, ctx = mr.mbn_forward(
            x,
            state,
            weight,
            bias,
            lam=lam,
            tau=tau,
            eps=eps,
            training=training,
            estimator=estimator,
            nonfinite=nonfinite,
            all_sum=all_sum,
            xp=txp,
        )
        arrays, static = ctx.split()
        return (y, *new_state, arrays, static)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(*output[-2])
        ctx.static = output[-1]
        ctx.mark_non_differentiable(*output[1 : 1 + _N_STATE])
        ctx.set_materialize_grads(False)  # no zero gradients for the state outputs

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None, *unused: Any) -> Any:
        if dy is None:  # y took no part in the loss (gradients are not materialized)
            return (None,) * (3 + _N_STATE + 7)
        core_ctx = mr.NormContext.join(ctx.saved_tensors, ctx.static)
        dx, dweight, dbias = mr.backward(dy, core_ctx, xp=txp)
        return (dx, dweight, dbias) + (None,) * (_N_STATE + 7)


class _KernelNormFunction(torch.autograd.Function):
    """``gamma*(x - mean)*rstd + beta`` on PyTorch's BN kernels, with MBN's gradient.

    Forward: ``torch.batch_norm`` in evaluation mode with the normalizing (moving)
    statistics ``(mean, var)``. Backward: ``native_batch_norm_backward`` in training mode
    as :func:`mbn_ref.kernel_terms` says (``terms``), and its one per-channel correction.
    """

    @staticmethod
    def forward(  # ctx first: apply() then binds no signature
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        terms: mr.KernelTerms,  # one argument: fewer for apply() to inspect
        eps: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, mean, *terms)
        ctx.eps = eps
        ctx.dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        ctx.set_materialize_grads(False)
        return torch.batch_norm(
            x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled
        )

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None) -> Any:
        if dy is None:
            return (None,) * 7
        x, mean, rstd, weight, sum_dy_scale, sum_dy_xhat_scale, rstd_scale = ctx.saved_tensors
        gamma_dtype, beta_dtype = ctx.dtypes
        # every output: the correction needs both sums, with or without affine parameters
        dx, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, rstd, True, ctx.eps, [True, True, True]
        )
        correction = sum_dy_scale * sum_dy + sum_dy_xhat_scale * sum_dy_xhat
        dx.add_(correction.view((1, -1) + (1,) * (x.dim() - 2)))
        return (
            dx,
            None if gamma_dtype is None else (sum_dy_xhat / rstd_scale).to(gamma_dtype),
            None if beta_dtype is None else sum_dy.to(beta_dtype),
            None,
            None,
            None,
            None,
        )


class _BatchStatisticsFunction(torch.autograd.Function):
    """BN with the batch's statistics and no state: ``(y, arrays, static)``."""

    @staticmethod
    def forward(
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        nonfinite: str,
        all_sum: AllSum | None,
    ) -> Any:
        y, _, ctx = mr.bn_forward(
            x,
            None,
            weight,
            bias,
            eps=eps,
            training=True,
            nonfinite=nonfinite,
            all_sum=all_sum,
            xp=txp,
        )
        arrays, static = ctx.split()
        return (y, arrays, static)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(*output[-2])
        ctx.static = output[-1]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None, *unused: Any) -> Any:
        if dy is None:
            return None, None, None, None, None, None
        core_ctx = mr.NormContext.join(ctx.saved_tensors, ctx.static)
        dx, dweight, dbias = mr.backward(dy, core_ctx, xp=txp)
        return dx, dweight, dbias, None, None, None


def momentum_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    state: mr.MBNState,
    lam: torch.Tensor,
    tau: torch.Tensor,
    *,
    training: bool = True,
    eps: float = 1e-5,
    estimator: str = "unbiased",
    nonfinite: str = "propagate",
    all_sum: AllSum | None = None,
) -> tuple[torch.Tensor, mr.MBNState]:
    """MBN on tensors, differentiable in ``x``, ``weight`` and ``bias``.

    Parameters
    ----------
    x : torch.Tensor
        Input ``(N, C, ...)``, channels on axis 1 (any memory format).
    weight, bias : torch.Tensor or None
        Per-channel affine parameters.
    state : mbn_ref.MBNState
        The state before this step; not modified.
    lam, tau : torch.Tensor
        0-d decays (weights on history) of the training and the inference statistics.
    training : bool, optional
        Normalize with the moving statistics and update the state; else use the inference
        statistics.
    eps : float, optional
        Added to the variance inside the square root.
    estimator : {"unbiased", "biased"}, optional
        The batch variance in ``running_var`` (PyTorch's: unbiased).
    nonfinite : {"propagate", "skip_update", "raise"}, optional
        The core's policy for a batch holding NaN or Inf (docs/spec.md §9).
    all_sum : callable, optional
        A collective summing a tensor over the process group: synchronized statistics
        (:mod:`mbn_ref.distributed`); the backward sums its two C-vectors with it too.

    Returns
    -------
    y : torch.Tensor
        The output, in ``x``'s dtype.
    state : mbn_ref.MBNState
        The new state (detached); the given tensors' values in evaluation.

    Examples
    --------
    >>> import torch
    >>> import mbn_ref as mr
    >>> import array_api_compat.torch as xp
    >>> state = mr.init_state(2, xp=xp)
    >>> x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    >>> y, new = momentum_batch_norm(x, None, None, state, torch.tensor(0.0), torch.tensor(0.9))
    >>> [round(v, 4) for v in y[:, 0].tolist()], [round(v, 6) for v in new.running_mean.tolist()]
    ([-1.0, 1.0], [0.2, 0.0])
    """
    out = _MBNFunction.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, *state, lam, tau, training, eps, estimator, nonfinite, all_sum
    )
    return out[0], mr.MBNState(*out[1 : 1 + _N_STATE])  # non-differentiable outputs


def batch_statistics_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float = 1e-5,
    nonfinite: str = "propagate",
    all_sum: AllSum | None = None,
) -> torch.Tensor:
    """BN with the batch's own statistics, no state (``track_running_stats=False``).

    Parameters
    ----------
    x : torch.Tensor
        Input ``(N, C, ...)``.
    weight, bias : torch.Tensor or None
        Per-channel affine parameters.
    eps : float, optional
        Added to the variance inside the square root.
    nonfinite : {"propagate", "skip_update", "raise"}, optional
        The core's policy for a batch holding NaN or Inf (``"raise"`` raises; with no state
        the other two are alike).
    all_sum : callable, optional
        A collective summing over the process group: the global batch's statistics (a
        global batch of one value per channel is refused).

    Returns
    -------
    torch.Tensor
        The output, in ``x``'s dtype.

    Examples
    --------
    >>> import torch
    >>> y = batch_statistics_norm(torch.tensor([[1.0], [3.0]]), None, None)
    >>> [round(v, 4) for v in y[:, 0].tolist()]
    [-1.0, 1.0]
    """
    y: torch.Tensor = _BatchStatisticsFunction.apply(x, weight, bias, eps, nonfinite, all_sum)[0]  # type: ignore[no-untyped-call]
    return y


update_rate = functools.lru_cache(maxsize=256)(conventions.update_rate_from_decay)
"""PyTorch's ``momentum`` from a host decay, remembered: an eager step's decay rarely changes."""

unbiased_factor = functools.lru_cache(maxsize=64)(conventions.unbiased_factor)
"""Bessel's ``m/(m-1)``, remembered: an eager step's batch size rarely changes."""


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of statistics: float64 for float64 input, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kernel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    ctx: mr.NormContext,
    var: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Normalize with a training step's context (``var``: its moving variance)."""
    with torch.no_grad():
        terms = mr.kernel_terms(ctx, xp=txp)
        mean = ctx.mean
        if torch.compiler.is_compiling():  # see saved; rstd_scale comes from lam alone
            mean, rstd, weight_k, scale0, scale1 = saved(mean, *terms[:-1])
            terms = mr.KernelTerms(rstd, weight_k, scale0, scale1, terms.rstd_scale)
    y: torch.Tensor = _KernelNormFunction.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, mean, var, terms, eps
    )
    return y


def kernel_momentum_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    state: mr.MBNState,
    lam: float | torch.Tensor,
    tau: float | torch.Tensor | None,
    *,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, mr.MBNState]:
    """MBN training on PyTorch's fused BN kernels, differentiable in ``x``, ``weight``, ``bias``.

    The numbers of :func:`momentum_batch_norm` in training with the unbiased estimator and
    the ``propagate`` policy, in fewer passes over the data: the batch's moments and the
    backward pass come from PyTorch's BN kernels, the state update and how the backward
    kernel gives MBN's gradient from the core (:func:`mbn_ref.mbn_from_moments`,
    :func:`mbn_ref.kernel_terms`). For one device (no collective) and at least two
    values per channel.

    Parameters
    ----------
    x : torch.Tensor
        Input ``(N, C, ...)``, channels on axis 1 (any memory format).
    weight, bias : torch.Tensor or None
        Per-channel affine parameters.
    state : mbn_ref.MBNState
        The state before this step; not modified.
    lam, tau : float or torch.Tensor
        Decays (weights on history) of the training and the inference statistics; ``tau``
        ``None`` for the cumulative average.
    eps : float, optional
        Added to the variance inside the square root.

    Returns
    -------
    y : torch.Tensor
        The output, in ``x``'s dtype.
    state : mbn_ref.MBNState
        The new state (detached).

    Examples
    --------
    >>> import torch
    >>> import mbn_ref as mr
    >>> import array_api_compat.torch as xp
    >>> x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    >>> state = mr.init_state(3, xp=xp, dtype=torch.float64)
    >>> y, new = kernel_momentum_batch_norm(x, None, None, state, 0.5, 0.9)
    >>> y2, new2 = momentum_batch_norm(x, None, None, state, torch.tensor(0.5), torch.tensor(0.9))
    >>> bool(torch.allclose(y, y2)), bool(torch.allclose(new.running_var, new2.running_var))
    (True, True)
    """
    cdt = _compute_dtype(x)
    with torch.no_grad():
        if torch.compiler.is_compiling():  # one Welford reduction, fused with the cast
            dims = [0, *range(2, x.dim())]
            batch_var, batch_mean = torch.var_mean(x.to(cdt), dims, correction=0)
        else:  # PyTorch's one-pass kernel (var_mean is slower in eager mode)
            batch_mean, batch_var = torch.batch_norm_update_stats(x, None, None, 1.0)
        new_state, ctx = mr.mbn_from_moments(
            x,
            state,
            weight,
            bias,
            batch_mean.to(cdt),
            batch_var.to(cdt),  # biased
            lam=lam,
            tau=tau,
            eps=eps,
            estimator="unbiased",
            xp=txp,
        )
    y = _kernel_norm(x, weight, bias, ctx, new_state.moving_var, eps)
    return y, new_state


def kernel_momentum_batch_norm_(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    state: mr.MBNState,
    lam: float,
    tau: float | None,
    *,
    eps: float = 1e-5,
) -> torch.Tensor:
    """:func:`kernel_momentum_batch_norm` in eager mode, updating ``state``'s tensors in place.

    The fewest operations per step for host decays (an eager module's, read and validated
    once per change): ``torch.batch_norm_update_stats`` computes the batch's mean and biased
    variance in one pass and moves the inference statistics inside the kernel (update rate
    ``1 - tau``, unbiased variance: ``nn.BatchNorm2d``'s kernel's very update), and one
    ``torch._foreach_lerp_`` moves the moving statistics in place (Eq. 8 with ``lam``). The
    normalizing statistics, the gradient's terms and the backward pass are
    :func:`kernel_momentum_batch_norm`'s.

    Parameters
    ----------
    x, weight, bias
        As in :func:`kernel_momentum_batch_norm`.
    state : mbn_ref.MBNState
        The module's buffers, updated in place; the statistics in the compute dtype.
    lam, tau : float
        Host decays in ``[0, 1]`` (validated by the caller); ``tau`` ``None`` for the
        cumulative average.
    eps : float, optional
        Added to the variance inside the square root.

    Returns
    -------
    torch.Tensor
        The output, in ``x``'s dtype.

    Examples
    --------
    >>> import torch
    >>> import mbn_ref as mr
    >>> import array_api_compat.torch as xp
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> state = mr.init_state(3, xp=xp, dtype=torch.float64)
    >>> _, new = kernel_momentum_batch_norm(x, None, None, state, 0.5, 0.9)
    >>> _ = kernel_momentum_batch_norm_(x, None, None, state, 0.5, 0.9)
    >>> all(bool(torch.allclose(a, b, rtol=1e-15, atol=0)) for a, b in zip(state, new))
    True
    """
    cdt = _compute_dtype(x)
    n = state.num_batches_tracked
    with torch.no_grad():
        if tau is None:
            tau = float(conventions.cumulative_decay(n, torch.float64, xp=txp))
        batch_mean, batch_var = torch.batch_norm_update_stats(
            x, state.running_mean, state.running_var, update_rate(tau)
        )
        batch_mean, batch_var = batch_mean.to(cdt), batch_var.to(cdt)  # biased
        lam_rate = update_rate(lam)
        torch._foreach_lerp_(
            [state.moving_mean, state.moving_var], [batch_mean, batch_var], lam_rate
        )
        n.add_(1)
        ctx = mr.NormContext(
            x=x,
            mean=state.moving_mean.clone(),  # a later step's update must not change it
            rstd=conventions.inverse_std(state.moving_var, eps, xp=txp),
            gamma=None if weight is None else weight.to(cdt),  # no_grad: no graph
            stats_weight=torch.tensor(lam_rate, dtype=cdt, device=x.device),
            batch_mean=batch_mean,
            count=x.numel() // x.shape[1],
            axis=1,
        )
    return _kernel_norm(x, weight, bias, ctx, state.moving_var, eps)
