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

from typing import Any

import array_api_compat.torch as txp
import torch

import mbn_ref as mr
from mbn_ref.distributed import AllSum

__all__ = ["batch_statistics_norm", "kernel_momentum_batch_norm", "momentum_batch_norm", "snapshot"]

_N_STATE = len(mr.MBNState._fields)


@torch.library.custom_op("mbn_torch::snapshot", mutates_args=())
def snapshot(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that a compiled backward saves rather than recomputes.

    Under ``torch.compile``, AOTAutograd's min-cut partitioner may recompute a saved
    statistic in the backward from a state buffer that the forward mutated, reading the
    updated buffer: silently wrong gradients (PyTorch pull request 197039, "Don't recompute
    reads of mutated inputs or mutable buffers", open). A custom op is not on the
    partitioner's recompute allowlist, so its output is saved (a C-vector).

    Parameters
    ----------
    t : torch.Tensor
        The state tensor to copy.

    Returns
    -------
    torch.Tensor
        A copy of ``t``.

    Examples
    --------
    >>> import torch
    >>> snapshot(torch.ones(2)).tolist()
    [1.0, 1.0]
    """
    return t.clone()


@snapshot.register_fake
def _(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


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


class _KernelMBNFunction(torch.autograd.Function):
    """MBN training on PyTorch's fused BN kernels: ``(y, *new_state)``.

    Forward: ``torch.batch_norm_update_stats`` (compiled: ``torch.var_mean``, which inductor
    turns into one fused reduction) computes the batch's mean and biased variance in one
    pass, :func:`mbn_ref.mbn_from_moments` the new state and the normalizing (moving)
    statistics, and ``torch.batch_norm`` in evaluation mode normalizes with them. Backward:
    ``native_batch_norm_backward`` in training mode with those statistics, plus the two
    per-channel terms of :func:`mbn_ref.kernel_terms`. For one device's batch (no
    collective) of at least two values per channel.
    """

    @staticmethod
    def forward(  # ctx first: apply() then binds no signature
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        *rest: Any,
    ) -> Any:
        state = mr.MBNState(*rest[:_N_STATE])
        lam, tau, eps = rest[_N_STATE:]
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32  # compute dtype
        if torch.compiler.is_compiling():  # one Welford reduction, fused with the cast
            dims = [0, *range(2, x.dim())]
            batch_var, batch_mean = torch.var_mean(x.to(cdt), dims, correction=0)
        else:  # PyTorch's one-pass kernel (var_mean is slower in eager mode)
            batch_mean, batch_var = torch.batch_norm_update_stats(x, None, None, 1.0)
        new_state, core_ctx = mr.mbn_from_moments(
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
        y = torch.batch_norm(
            x, weight, bias, new_state.moving_mean, new_state.moving_var,
            False, 0.0, eps, torch.backends.cudnn.enabled,
        )  # fmt: skip
        terms = mr.kernel_terms(core_ctx, xp=txp)
        ctx.save_for_backward(x, core_ctx.mean, core_ctx.rstd, *terms)
        ctx.eps = eps
        ctx.dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        ctx.mark_non_differentiable(*new_state)
        ctx.set_materialize_grads(False)
        return (y, *new_state)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None, *unused: Any) -> Any:
        tail = (None,) * (_N_STATE + 3)
        if dy is None:
            return (None, None, None, *tail)
        x, mean, rstd, weight, dy_scale, shift = ctx.saved_tensors
        gamma_dtype, beta_dtype = ctx.dtypes
        # every output, even sum(dy) without a bias: PyTorch's CPU kernel is several times
        # slower when any is left out
        dx, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, rstd, True, ctx.eps, [True, True, True]
        )
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dx.addcmul_(dy, dy_scale.view(shape))
        dx.sub_((shift * sum_dy_xhat).view(shape))
        return (
            dx,
            None if gamma_dtype is None else sum_dy_xhat.to(gamma_dtype),
            None if beta_dtype is None else sum_dy.to(beta_dtype),
            *tail,
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
    backward pass come from PyTorch's BN kernels, the state update and the gradient's two
    MBN terms from the core (:func:`mbn_ref.mbn_from_moments`,
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
    out = _KernelMBNFunction.apply(x, weight, bias, *state, lam, tau, eps)  # type: ignore[no-untyped-call]
    return out[0], mr.MBNState(*out[1 : 1 + _N_STATE])
