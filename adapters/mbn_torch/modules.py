"""Drop-in replacements of ``nn.BatchNorm1d/2d/3d`` whose decays are runtime state.

- ``MomentumBatchNorm1d/2d/3d``: momentum batch normalization (MBN); ``lam = 0`` is BN.
- ``DynamicBatchNorm1d/2d/3d``: plain BN whose ``momentum`` is runtime state, so a schedule
  or a controller moves it without recompiling a compiled model.

PyTorch's conventions: ``momentum`` is the update rate of the inference statistics
(``None``: the cumulative average), ``running_var`` holds the unbiased batch variance. ``lam``
is the paper's training decay (weight on history). The decays are 0-d buffers: filling them
never recompiles a compiled model.

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

import math
from collections.abc import Container
from typing import Any, ClassVar

import array_api_compat.torch as txp
import torch
from torch import nn

import mbn_ref as mr
from mbn_ref import conventions
from mbn_ref.conventions import cumulative_decay
from mbn_ref.distributed import AllSum

from ._function import (
    batch_statistics_norm,
    kernel_momentum_batch_norm,
    kernel_momentum_batch_norm_,
    momentum_batch_norm,
    saved,
    unbiased_factor,
    update_rate,
)

__all__ = [
    "DynamicBatchNorm1d",
    "DynamicBatchNorm2d",
    "DynamicBatchNorm3d",
    "MomentumBatchNorm1d",
    "MomentumBatchNorm2d",
    "MomentumBatchNorm3d",
]

_HALF = (torch.float16, torch.bfloat16)

_BATCHNORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class _HostDecay:
    """A 0-d decay buffer's value on the host, read again only after the buffer changed.

    Eager modules read their decays to validate them and to pick the fused kernel; a tensor's
    version counter moves with every in-place write (``fill_``, ``copy_``, loading), so a
    value that a schedule sets once per epoch costs one read (one device synchronization)
    per epoch, not one per call.
    """

    __slots__ = ("_tensor", "_value", "_version")

    def __init__(self) -> None:
        self._tensor: torch.Tensor | None = None
        self._version = -1
        self._value = math.nan

    def flag(self, buffer: torch.Tensor) -> bool:
        """A 0-d bool buffer's value."""
        if buffer is not self._tensor or buffer._version != self._version:
            self._tensor, self._version, self._value = buffer, buffer._version, float(buffer)
        return bool(self._value)

    def read(self, buffer: torch.Tensor, name: str) -> float:
        version = buffer._version
        if buffer is not self._tensor or version != self._version:
            value = float(buffer)
            if not 0.0 <= value <= 1.0:  # also NaN
                raise ValueError(
                    f"{name} must be a decay (weight on history) in [0, 1], got {value!r} "
                    f"(set through the 0-d buffer '{name}')"
                )
            self._tensor, self._version, self._value = buffer, version, value
        return self._value


class _DecayNorm(nn.Module):
    """What every module here shares: parameters, inference statistics and their decay.

    ``_extra_keys`` are the state-dict keys a ``BatchNorm*d`` checkpoint lacks.
    """

    _ndims: ClassVar[Container[int]] = ()
    _ndims_text: ClassVar[str] = ""
    _extra_keys: ClassVar[tuple[str, ...]] = ("inference_decay", "cumulative_average")
    _keeps_moving_statistics: ClassVar[bool] = False

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
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
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        self.num_features = num_features
        self.eps = float(eps)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        state = mr.init_bn_state(num_features, xp=txp, dtype=dtype, device=device)
        for name in mr.BNState._fields:
            self.register_buffer(name, getattr(state, name) if track_running_stats else None)
        # decays in float64 whatever the module's dtype: hyper-parameters, exact as given
        self.register_buffer("inference_decay", torch.zeros((), device=device, dtype=torch.float64))
        self.register_buffer("cumulative_average", torch.zeros((), device=device, dtype=torch.bool))
        self._host_tau = _HostDecay()
        self._host_cumulative = _HostDecay()
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
            for name in self._state_names():
                getattr(self, name).copy_(getattr(fresh, name))

    def reset_parameters(self) -> None:
        """Fresh statistics, ``weight`` ones and ``bias`` zeros (as ``nn.BatchNorm*d``)."""
        self.reset_running_stats()
        if self.weight is not None and self.bias is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        """``num_features``, ``eps``, ``momentum`` and the flags, as PyTorch's."""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def _state_names(self) -> tuple[str, ...]:
        return mr.BNState._fields

    def _tracked_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers by name, none of them ``None`` (``track_running_stats=True``).

        For the calls made every step: they skip ``nn.Module.__getattr__`` for each buffer.
        """
        return self._buffers  # type: ignore[return-value]

    def _tau(self) -> torch.Tensor:
        """The decay of this training step's inference-statistics update (0-d tensor)."""
        n = self.num_batches_tracked
        assert n is not None
        if not torch.compiler.is_compiling():
            self._host_tau.read(self.inference_decay, "inference_decay")
            if not self._host_cumulative.flag(self.cumulative_average):
                return self.inference_decay
        return torch.where(
            self.cumulative_average,
            cumulative_decay(n, self.inference_decay.dtype, xp=txp),
            self.inference_decay,
        )

    def _eager_tau(self) -> float | None:
        """Eager training's inference decay on the host; ``None``: the cumulative average."""
        buffers = self._tracked_buffers()
        if self._host_cumulative.flag(buffers["cumulative_average"]):
            return None
        return self._host_tau.read(buffers["inference_decay"], "inference_decay")

    def _check_input(self, x: torch.Tensor, *, synchronized: bool = False) -> None:
        """PyTorch's checks and messages; nothing has changed when one raises."""
        if x.dim() not in self._ndims:
            raise ValueError(f"expected {self._ndims_text} input (got {x.dim()}D input)")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels (num_features) on dim 1, "
                f"got input of shape {tuple(x.shape)} with {x.shape[1]} channels"
            )
        if not (math.isfinite(self.eps) and self.eps > 0):  # eps is a plain attribute
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        if not x.is_floating_point():
            raise TypeError(
                f"expected a floating-point input (float16, bfloat16, float32, float64), "
                f"got {x.dtype}; convert it first, e.g. x.float()"
            )
        if self.training and not synchronized and x.numel() == self.num_features:
            # the unbiased running_var needs two values per channel (and lam = 0: BN)
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.size()}"
            )

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        """PyTorch's fused kernel with this module's statistics (the same numbers as the core's).

        Evaluation normalizes with the inference statistics. Training normalizes with the
        batch's statistics (BN; MBN with ``lam = 0``):

        - eager BN, with a fixed decay: the kernel also updates ``running_mean``/``running_var``
          with the update rate ``1 - decay`` read on the host (once per change, see
          :class:`_HostDecay`), as ``nn.BatchNorm2d`` does;
        - eager MBN, with a fixed decay: the kernel writes the batch mean and unbiased
          variance into the moving statistics (update rate 1, Eq. 8 with ``lam = 0``); one
          lerp moves the inference statistics toward them, and the moving variance is made
          biased: two operations besides the kernel;
        - compiled, or the cumulative average: the kernel writes the batch mean and unbiased
          variance into two scratch vectors (update rate 1: each then holds exactly the
          batch's value) and the core's :func:`mbn_ref.update_running_statistics` updates the
          buffers with the decay tensor, never read on the host.

        With the update rate 1 a non-finite old value gives NaN (``0*inf``), as Eq. 8's
        ``lam*old + (1 - lam)*batch`` does at ``lam = 0``.
        """
        if not self.training:
            return torch.batch_norm(
                x, self.weight, self.bias, self.running_mean, self.running_var,
                False, 0.0, self.eps, torch.backends.cudnn.enabled,
            )  # fmt: skip
        buffers = self._tracked_buffers()
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        n = buffers["num_batches_tracked"]
        tau = None if torch.compiler.is_compiling() else self._eager_tau()
        if tau is not None:
            momentum = update_rate(tau)
            # no grad mode needed below: no buffer requires grad, and a kernel's updates of
            # the statistics are not differentiable
            if not self._keeps_moving_statistics:  # BN: nn.BatchNorm2d's very call
                n.add_(1)
                return torch.batch_norm(
                    x, self.weight, self.bias, running_mean, running_var,
                    True, momentum, self.eps, torch.backends.cudnn.enabled,
                )  # fmt: skip
            moving_mean, moving_var = buffers["moving_mean"], buffers["moving_var"]
            n.add_(1)
            y = torch.batch_norm(
                x, self.weight, self.bias, moving_mean, moving_var,
                True, 1.0, self.eps, torch.backends.cudnn.enabled,
            )  # fmt: skip
            torch._foreach_lerp_([running_mean, running_var], [moving_mean, moving_var], momentum)
            # .data: autograd saved moving_var, whose value a training backward never reads;
            # a version bump would make that backward refuse to run
            moving_var.data.div_(unbiased_factor(x.numel() // self.num_features))  # biased
            return y
        tau_t = self._tau()
        stats = torch.zeros((2, self.num_features), dtype=running_mean.dtype, device=x.device)
        batch_mean, batch_var = stats[0], stats[1]
        y = torch.batch_norm(
            x, self.weight, self.bias, batch_mean, batch_var,
            True, 1.0, self.eps, torch.backends.cudnn.enabled,
        )  # fmt: skip
        m = x.numel() // self.num_features
        biased = conventions.biased_from_unbiased(batch_var, m)
        state = mr.BNState(running_mean, running_var, n)
        new = mr.update_running_statistics(
            state, batch_mean, biased, m, decay=tau_t, estimator="unbiased", xp=txp
        )
        with torch.no_grad():
            for buffer, value in zip(state, new, strict=True):
                buffer.copy_(value)
            self._after_native(batch_mean, biased)
        return y

    def _after_native(self, batch_mean: torch.Tensor, var: torch.Tensor) -> None:
        """Further state a fused training step updates (MBN: the moving statistics).

        ``batch_mean`` and ``var`` (biased) are the batch's.
        """

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
        # A BatchNorm*d checkpoint (none of the extra keys): its keys load as they are; the
        # extra state comes from _batchnorm_fallback.
        if all(prefix + k not in state_dict for k in self._extra_keys):
            for name, value in self._batchnorm_fallback(state_dict, prefix).items():
                state_dict[prefix + name] = value
        # all or nothing: a wrong shape or a non-tensor of this module loads none of its keys
        own = dict(self.named_parameters(recurse=False)) | dict(self.named_buffers(recurse=False))
        problems = []
        for name, current in own.items():
            key = prefix + name
            if key not in state_dict:
                continue
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                problems.append(f"{key}: expected a tensor, got {type(value).__name__}")
            elif value.shape != current.shape:
                problems.append(
                    f"size mismatch for {key}: copying a param with shape {value.shape} from "
                    f"checkpoint, the shape in current model is {current.shape}"
                )
        if problems:
            error_msgs.extend(problems)
            error_msgs.append(
                f"{type(self).__name__} at '{prefix or '(root)'}': nothing of it was loaded"
            )
            missing_keys.extend(prefix + n for n in own if prefix + n not in state_dict)
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _batchnorm_fallback(self, state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
        """The extra keys' values under a ``BatchNorm*d`` checkpoint: the module's decays."""
        return {
            k: getattr(self, k).detach().clone() for k in ("inference_decay", "cumulative_average")
        }


class _DynamicBatchNorm(_DecayNorm):
    """The shared implementation; see :class:`DynamicBatchNorm2d`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize ``input``; in training, update the running statistics in place.

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
            return torch.batch_norm(
                input, self.weight, self.bias, None, None,
                True, 0.0, self.eps, torch.backends.cudnn.enabled,
            )  # fmt: skip
        if self.training and input.numel() == 0:
            return input.clone()  # an empty batch changes nothing (docs/spec.md §9)
        return self._native(input)


class _MomentumBatchNorm(_DecayNorm):
    """The shared implementation; see :class:`MomentumBatchNorm2d`."""

    _extra_keys = ("moving_mean", "moving_var", "lam", "inference_decay", "cumulative_average")
    _keeps_moving_statistics = True

    moving_mean: torch.Tensor | None
    moving_var: torch.Tensor | None
    lam: torch.Tensor

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
        nonfinite: str = "propagate",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        state = mr.init_state(num_features, xp=txp, dtype=dtype, device=device)
        for name in ("moving_mean", "moving_var"):
            self.register_buffer(name, getattr(state, name) if track_running_stats else None)
        decay = conventions.validate_decay(lam, "lam")
        self.register_buffer("lam", torch.tensor(decay, device=device, dtype=torch.float64))
        self._host_lam = _HostDecay()
        if nonfinite not in ("propagate", "skip_update", "raise"):
            raise ValueError(
                f"nonfinite must be one of ('propagate', 'skip_update', 'raise'), got {nonfinite!r}"
            )
        self.nonfinite = nonfinite

    def extra_repr(self) -> str:
        """``num_features``, ``eps``, ``momentum``, ``lam`` and the flags, as PyTorch's."""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"lam={float(self.lam)}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
            + ("" if self.nonfinite == "propagate" else f", nonfinite={self.nonfinite!r}")
        )

    def _state_names(self) -> tuple[str, ...]:
        return mr.MBNState._fields

    def _state(self) -> mr.MBNState:
        buffers = self._tracked_buffers()
        return mr.MBNState(*(buffers[name] for name in mr.MBNState._fields))

    def _all_sum(self) -> AllSum | None:
        """The collective of synchronized statistics; ``None``: this device's batch alone."""
        return None

    def _after_native(self, batch_mean: torch.Tensor, var: torch.Tensor) -> None:
        # lam = 0: the moving statistics are the batch's (Eq. 8 with lam = 0), with the
        # update rate 1 of the fixed-decay path: a non-finite old value gives NaN there too
        buffers = self._tracked_buffers()
        torch._foreach_lerp_(
            [buffers["moving_mean"], buffers["moving_var"]], [batch_mean, var], 1.0
        )

    @staticmethod
    def _saved(state: mr.MBNState) -> mr.MBNState:
        """``state`` with its moving statistics through :func:`~mbn_torch._function.saved`.

        For a compiled step of the core's path: the backward context derives from them, and
        must not be recomputed from the buffers that the step updates.
        """
        mean, var = saved(state.moving_mean, state.moving_var)
        return state._replace(moving_mean=mean, moving_var=var)

    def _path(self, x: torch.Tensor, all_sum: AllSum | None) -> str:
        """Which implementation computes this call; each gives the core's numbers.

        - ``"native"`` (:meth:`_native`): PyTorch's BN kernel, whose gradient treats the
          statistics as the batch's own: evaluation, and training with ``lam = 0``;
        - ``"kernel"`` (:func:`~mbn_torch._function.kernel_momentum_batch_norm`): MBN
          training (``lam > 0``; compiled, any ``lam``: a graph cannot branch on the runtime
          value) on PyTorch's BN kernels and the core's terms;
        - ``"core"`` (:func:`~mbn_torch._function.momentum_batch_norm`): the core's forward
          and backward, for what the kernels cannot do: a collective, the
          ``skip_update``/``raise`` policies, a batch of one value per channel or none, a
          state in another dtype than the input's compute dtype, and half precision on the
          CPU (whose kernel's gradient is off by 10x the float16 resolution where the core's,
          accumulating in float32, is exact; found by the conformance suite).
        """
        if not self.training:
            return "native" if self.nonfinite != "raise" else "core"
        dtype = x.dtype
        if (
            all_sum is not None
            or self.nonfinite != "propagate"
            or x.numel() < 2 * self.num_features
            or (dtype in _HALF and x.device.type == "cpu")
        ):
            return "core"
        buffers = self._tracked_buffers()
        moving_dtype = buffers["moving_mean"].dtype
        if moving_dtype != (torch.float64 if dtype == torch.float64 else torch.float32):
            return "core"
        if torch.compiler.is_compiling():  # lam is not read: the kernel path serves any lam
            return "kernel"
        lam = self._host_lam.read(buffers["lam"], "lam")  # validated, read once per change
        return "native" if lam == 0.0 else "kernel"

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
        all_sum = self._all_sum() if self.training else None
        self._check_input(input, synchronized=all_sum is not None)
        if not self.track_running_stats:
            return batch_statistics_norm(
                input,
                self.weight,
                self.bias,
                eps=self.eps,
                nonfinite=self.nonfinite,
                all_sum=all_sum,
            )
        path = self._path(input, all_sum)
        if path == "native":
            return self._native(input)
        state = self._state()
        if path == "kernel":
            if not torch.compiler.is_compiling():  # host decays: the buffers in place
                lam = self._host_lam.read(self.lam, "lam")
                return kernel_momentum_batch_norm_(
                    input, self.weight, self.bias, state, lam, self._eager_tau(), eps=self.eps
                )
            # compiled: decays as tensors, never read; the new state copied in
            y, new_state = kernel_momentum_batch_norm(
                input, self.weight, self.bias, state, self.lam, self._tau(), eps=self.eps
            )
            with torch.no_grad():
                for buffer, value in zip(state, new_state, strict=True):
                    buffer.copy_(value)
            return y
        tau = self._tau() if self.training else self.inference_decay
        state_in = state
        if self.training and torch.compiler.is_compiling():
            state_in = self._saved(state)
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
            nonfinite=self.nonfinite,
            all_sum=all_sum,
        )
        if self.training:
            with torch.no_grad():
                for buffer, value in zip(state, new_state, strict=True):
                    buffer.copy_(value)
        return y

    def _batchnorm_fallback(self, state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
        """The module's decays; training statistics from the checkpoint's running ones."""
        values = super()._batchnorm_fallback(state_dict, prefix)
        values["lam"] = self.lam.detach().clone()
        if self.moving_mean is not None:
            for name, source in (("moving_mean", "running_mean"), ("moving_var", "running_var")):
                if prefix + source in state_dict:
                    values[name] = state_dict[prefix + source]
        return values


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
    nonfinite : {"propagate", "skip_update", "raise"}, optional
        A training batch holding NaN or Inf: propagates into the statistics (PyTorch's
        behaviour), leaves the state unchanged, or raises before anything changes
        (docs/spec.md §9).

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


class DynamicBatchNorm1d(_DynamicBatchNorm):
    """Batch normalization over ``(N, C)`` or ``(N, C, L)`` input with a runtime momentum.

    The same parameters, buffers and behaviour as :class:`DynamicBatchNorm2d`.

    Examples
    --------
    >>> import torch
    >>> DynamicBatchNorm1d(3)(torch.randn(8, 3)).shape
    torch.Size([8, 3])
    """

    _ndims = (2, 3)
    _ndims_text = "2D or 3D"


class DynamicBatchNorm2d(_DynamicBatchNorm):
    """``nn.BatchNorm2d`` whose ``momentum`` is runtime state: a schedule never recompiles.

    The same computation as ``nn.BatchNorm2d`` on PyTorch's fused kernel; the update of the
    running statistics takes its decay from the 0-d buffers ``inference_decay`` (``1 -
    momentum``) and ``cumulative_average`` (``momentum=None``), so setting ``momentum`` or
    filling the buffers between steps (:class:`mbn_torch.MomentumScheduler` does) reuses a
    compiled graph.

    Parameters
    ----------
    num_features : int
        The number of channels C.
    eps : float, optional
        Added to the variance inside the square root.
    momentum : float or None, optional
        PyTorch's ``momentum``: the update rate of ``running_mean``/``running_var``; ``None``
        for the cumulative average.
    affine : bool, optional
        Learnable per-channel ``weight`` and ``bias``.
    track_running_stats : bool, optional
        Keep running statistics; ``False`` normalizes with the batch's statistics always.
    device, dtype : optional
        Where and in which dtype parameters and buffers are created.

    Notes
    -----
    Buffers: ``running_mean``, ``running_var`` (unbiased), ``num_batches_tracked`` (as in
    ``nn.BatchNorm2d``: its checkpoints load, strict), and the float64 ``inference_decay``
    and bool ``cumulative_average``. An empty training batch changes nothing (PyTorch counts
    it). See docs/torch.md.

    Examples
    --------
    >>> import torch
    >>> bn = DynamicBatchNorm2d(3)
    >>> _ = bn(torch.randn(2, 3, 4, 4))
    >>> bn.momentum = 0.5                  # runtime state: no recompilation
    >>> _ = bn(torch.randn(2, 3, 4, 4))
    >>> int(bn.num_batches_tracked), float(bn.inference_decay)
    (2, 0.5)
    """

    _ndims = (4,)
    _ndims_text = "4D"


class DynamicBatchNorm3d(_DynamicBatchNorm):
    """Batch normalization over ``(N, C, D, H, W)`` input with a runtime momentum.

    The same parameters, buffers and behaviour as :class:`DynamicBatchNorm2d`.

    Examples
    --------
    >>> import torch
    >>> DynamicBatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
    torch.Size([2, 2, 3, 3, 3])
    """

    _ndims = (5,)
    _ndims_text = "5D"
