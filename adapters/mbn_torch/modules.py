"""``MomentumBatchNorm1d/2d/3d``: drop-in replacements of ``nn.BatchNorm1d/2d/3d``.

PyTorch's conventions: ``momentum`` is the update rate of the inference statistics
(``None``: the cumulative average), ``running_var`` holds the unbiased batch variance. ``lam``
is the paper's training decay (weight on history); ``lam = 0`` is BN. The decays are 0-d
buffers (runtime state): filling them never recompiles a compiled model.

>>> import torch
>>> bn = MomentumBatchNorm2d(3, lam=0.5)
>>> y = bn(torch.randn(4, 3, 5, 5))
>>> y.shape, int(bn.num_batches_tracked), float(bn.lam), bn.momentum
(torch.Size([4, 3, 5, 5]), 1, 0.5, 0.1)
>>> sorted(bn.state_dict())  # doctest: +NORMALIZE_WHITESPACE
['bias', 'cumulative_average', 'inference_decay', 'lam', 'moving_mean', 'moving_var',
 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
"""

from __future__ import annotations

from typing import Any, ClassVar

import array_api_compat.torch as txp
import torch
from torch import nn

import mbn_ref as mr
from mbn_ref import conventions
from mbn_ref.conventions import cumulative_decay

from ._function import batch_statistics_norm, momentum_batch_norm, snapshot

__all__ = ["MomentumBatchNorm1d", "MomentumBatchNorm2d", "MomentumBatchNorm3d"]

# the MBN buffers a BatchNorm*d checkpoint does not have (filled in by _load_from_state_dict)
_MBN_ONLY = ("moving_mean", "moving_var", "lam", "inference_decay", "cumulative_average")


class _MomentumBatchNorm(nn.Module):
    """The shared implementation; see :class:`MomentumBatchNorm2d`."""

    _ndims: ClassVar[tuple[int, ...]] = ()
    _ndims_text: ClassVar[str] = ""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    moving_mean: torch.Tensor | None
    moving_var: torch.Tensor | None
    lam: torch.Tensor
    inference_decay: torch.Tensor
    cumulative_average: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        lam: float = 0.0,
    ) -> None:
        super().__init__()
        dtype = torch.get_default_dtype() if dtype is None else dtype
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        state = mr.init_state(num_features, xp=txp, dtype=dtype, device=device)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(state, name) if track_running_stats else None
            self.register_buffer(name, value)
        for name in ("moving_mean", "moving_var"):
            self.register_buffer(name, getattr(state, name) if track_running_stats else None)
        decay = conventions.validate_decay(lam, "lam")
        # decays in float64 whatever the module's dtype: hyper-parameters, exact as given
        self.register_buffer("lam", torch.tensor(decay, device=device, dtype=torch.float64))
        self.register_buffer("inference_decay", torch.zeros((), device=device, dtype=torch.float64))
        self.register_buffer("cumulative_average", torch.zeros((), device=device, dtype=torch.bool))
        self.momentum = momentum

    @property
    def momentum(self) -> float | None:
        """PyTorch's ``momentum``: the update rate of the inference statistics, or ``None``.

        Reading it reads the buffers ``inference_decay``/``cumulative_average`` on the host;
        setting it fills them (``None`` sets the flag ``cumulative_average``).
        """
        if bool(self.cumulative_average):
            return None
        return conventions.torch_from_decay(float(self.inference_decay))

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        decay = None if value is None else conventions.decay_from_torch(value)  # may raise
        with torch.no_grad():
            self.cumulative_average.fill_(decay is None)
            if decay is not None:
                self.inference_decay.fill_(decay)

    def reset_running_stats(self) -> None:
        """Fresh statistics: means 0, variances 1, no batches tracked."""
        if not self.track_running_stats:
            return
        fresh = mr.init_state(self.num_features, xp=txp)
        with torch.no_grad():
            for buffer, value in zip(self._state(), fresh, strict=True):
                buffer.copy_(value)

    def reset_parameters(self) -> None:
        """Fresh statistics, ``weight`` ones and ``bias`` zeros (as ``nn.BatchNorm*d``)."""
        self.reset_running_stats()
        if self.weight is not None and self.bias is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        """``num_features``, ``eps``, ``momentum``, ``lam`` and the flags, as PyTorch's."""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"lam={float(self.lam)}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _state(self) -> mr.MBNState:
        return mr.MBNState(
            self.moving_mean,
            self.moving_var,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in self._ndims:
            raise ValueError(f"expected {self._ndims_text} input (got {x.dim()}D input)")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels (num_features) on dim 1, "
                f"got input of shape {tuple(x.shape)} with {x.shape[1]} channels"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize ``input``; in training, update the statistics in place.

        Parameters
        ----------
        input : torch.Tensor
            ``(N, C, ...)`` with ``C = num_features``.

        Returns
        -------
        torch.Tensor
            The output, in ``input``'s dtype.
        """
        self._check_input(input)
        if not self.track_running_stats:
            return batch_statistics_norm(input, self.weight, self.bias, eps=self.eps)
        state = self._state()
        if self.training:
            n = state.num_batches_tracked
            tau = torch.where(
                self.cumulative_average,
                cumulative_decay(n, self.inference_decay.dtype, xp=txp),
                self.inference_decay,
            )
        else:
            tau = self.inference_decay
        state_in = state
        if self.training and torch.compiler.is_compiling():
            # the statistics the backward needs must not be recomputed from the buffers
            # updated below (see snapshot)
            state_in = state._replace(
                moving_mean=snapshot(state.moving_mean), moving_var=snapshot(state.moving_var)
            )
        y, new_state = momentum_batch_norm(
            input,
            self.weight,
            self.bias,
            state_in,
            self.lam,
            tau,
            training=self.training,
            eps=self.eps,
            estimator="unbiased",
        )
        if self.training:
            with torch.no_grad():
                for buffer, value in zip(state, new_state, strict=True):
                    buffer.copy_(value)
        return y

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A BatchNorm*d checkpoint: the training statistics start from the loaded inference
        # statistics, the decays keep this module's values.
        if all(prefix + k not in state_dict for k in _MBN_ONLY):
            fallback = {
                "moving_mean": prefix + "running_mean",
                "moving_var": prefix + "running_var",
            }
            for name in _MBN_ONLY:
                source = fallback.get(name)
                if getattr(self, name) is None:
                    continue
                if source is None:
                    state_dict[prefix + name] = getattr(self, name).detach().clone()
                elif source in state_dict:
                    state_dict[prefix + name] = state_dict[source]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class MomentumBatchNorm1d(_MomentumBatchNorm):
    """Momentum batch normalization over ``(N, C)`` or ``(N, C, L)`` input.

    The same parameters, buffers and behaviour as :class:`MomentumBatchNorm2d`.

    Examples
    --------
    >>> import torch
    >>> MomentumBatchNorm1d(3)(torch.randn(8, 3)).shape
    torch.Size([8, 3])
    """

    _ndims = (2, 3)
    _ndims_text = "2D or 3D"


class MomentumBatchNorm2d(_MomentumBatchNorm):
    """Momentum batch normalization (Yong et al., ECCV 2020) over ``(N, C, H, W)`` input.

    Parameters
    ----------
    num_features : int
        The number of channels C.
    eps : float, optional
        Added to the variance inside the square root.
    momentum : float or None, optional
        PyTorch's ``momentum``: the update rate (weight on the new batch) of the inference
        statistics ``running_mean``/``running_var``; ``None`` for the cumulative average.
        Held as the 0-d buffers ``inference_decay`` (the decay ``1 - momentum``) and
        ``cumulative_average`` (a flag).
    affine : bool, optional
        Learnable per-channel ``weight`` and ``bias``.
    track_running_stats : bool, optional
        Keep statistics; ``False`` normalizes with the batch's statistics in training and
        evaluation alike (plain BN, ``lam`` unused).
    device, dtype : optional
        Where and in which dtype parameters and buffers are created.
    lam : float, optional
        The paper's training decay (weight on history) in ``[0, 1]``, held as the 0-d buffer
        ``lam``; 0 is BN.

    Notes
    -----
    Buffers: ``running_mean``, ``running_var`` (unbiased) and ``num_batches_tracked`` as in
    ``nn.BatchNorm2d``; ``moving_mean``/``moving_var`` the training statistics (Eq. 8,
    biased variance); ``lam``, ``inference_decay`` (float64 whatever the module's dtype,
    so a decay is exact as given) and ``cumulative_average`` (bool). Training writes the new
    state into the buffers in place (``copy_``): compiled graphs keep their references. A
    ``BatchNorm2d`` state dict loads (strict): the training statistics start from its
    running statistics (``moving_var`` from the unbiased ``running_var``), the decays keep
    the module's own values. See docs/torch.md.

    Examples
    --------
    >>> import torch
    >>> m = MomentumBatchNorm2d(3, momentum=None, lam=0.9)
    >>> _ = m(torch.randn(2, 3, 4, 4))
    >>> m.momentum is None, bool(m.cumulative_average)
    (True, True)
    >>> _ = m.lam.fill_(0.5)          # a schedule's new value: used at the next call
    >>> m.eval()(torch.randn(1, 3, 4, 4)).shape
    torch.Size([1, 3, 4, 4])
    """

    _ndims = (4,)
    _ndims_text = "4D"


class MomentumBatchNorm3d(_MomentumBatchNorm):
    """Momentum batch normalization over ``(N, C, D, H, W)`` input.

    The same parameters, buffers and behaviour as :class:`MomentumBatchNorm2d`.

    Examples
    --------
    >>> import torch
    >>> MomentumBatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
    torch.Size([2, 2, 3, 3, 3])
    """

    _ndims = (5,)
    _ndims_text = "5D"
