"""The conformance adapter of ``mbn_torch``: ``mbn-ref conformance --backend torch``.

It runs the PyTorch **modules** through the suite (``docs/conformance.md``, protocol version
2), as a user runs them: the state is the module itself (its buffers), each step's decays are
set onto it the PyTorch way and the gradients come from autograd.

========================  ======================================================================
suite (canonical)         ``mbn_torch``
========================  ======================================================================
``Setup`` kind ``"mbn"``  ``MomentumBatchNorm1d/2d/3d`` (by the input's rank), in the case's dtype
``Setup`` kind ``"bn"``   ``DynamicBatchNorm1d/2d/3d`` (PyTorch's fused ``torch.batch_norm``);
                          ``make("mbn")``: ``MomentumBatchNorm*d`` with ``lam = 0`` instead
``step.lam``              ``module.lam.fill_(lam)`` (a 0-d buffer: runtime state)
``step.decay``/``tau``    ``module.momentum = Step.update_rate(decay)`` (``None``: cumulative)
``running_var``           declared ``"unbiased"`` (PyTorch's estimator)
channels-last (``NHWC``)  the NumPy ``(N, H, W, C)`` tensor permuted to an ``(N, C, H, W)``
                          view, ``channels_last`` in memory: no copy on the way in or out
gradients                 ``torch.autograd.grad`` of the module's output
synchronized steps        one ``SyncMomentumBatchNorm`` replica per shard, on threads
                          (:func:`mbn_ref.distributed.simulate`), whose ``_all_sum`` hook
                          returns the simulated collective; the backward runs on threads too
own schedule              :class:`mbn_torch.MomentumScheduler` (Eq. 11 and Eq. 12) on the
                          module, stepped once per epoch; the decays reported are its buffers
========================  ======================================================================

The ``torch.distributed`` path of the same hook is tested with gloo elsewhere
(``SyncMomentumBatchNorm._all_sum`` returns :func:`mbn_torch.distributed.process_group_sum`);
here the collective is :func:`mbn_ref.distributed.simulate`'s, so every synchronized case
runs in one process.

Known failures (:data:`KNOWN_FAILURES`) are declared with their reasons: the report lists
them as expected failures, and one that starts passing fails the run (remove it then).

>>> from mbn_conformance import checks
>>> adapter = make()
>>> adapter.capabilities.running_var, adapter.capabilities.native_momentum
('unbiased', 'update_rate')
>>> found = checks(adapter, select=["bn/NC/N2/*", "sync*/NC/*", "schedule/*"])
>>> [(c.id, c.outcome().status) for c in found]  # doctest: +NORMALIZE_WHITESPACE
[('bn/NC/N2/float64/eps1e-05', 'pass'),
 ('sync-mbn/NC/N7/float64/eps1e-05/lam0.5/shards0-2-0-5/init-random', 'pass'),
 ('schedule/trajectory', 'pass'), ('schedule/eq11_eq12', 'pass')]
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import mbn_ref
from mbn_conformance.protocol import REFUSALS, Capabilities, Kind, ScheduleSetup, Setup, Step
from mbn_ref.distributed import AllSum, simulate

from .distributed import SyncMomentumBatchNorm
from .modules import (
    DynamicBatchNorm1d,
    DynamicBatchNorm2d,
    DynamicBatchNorm3d,
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
    MomentumBatchNorm3d,
    _DecayNorm,
    _MomentumBatchNorm,
)
from .scheduler import MomentumScheduler

__all__ = ["KNOWN_FAILURES", "Call", "Layer", "TorchModulesAdapter", "make"]

# the module class for an input rank (2 to 5)
_MBN: dict[int, type[_DecayNorm]] = {
    2: MomentumBatchNorm1d,
    3: MomentumBatchNorm1d,
    4: MomentumBatchNorm2d,
    5: MomentumBatchNorm3d,
}
_DYNAMIC: dict[int, type[_DecayNorm]] = {
    2: DynamicBatchNorm1d,
    3: DynamicBatchNorm1d,
    4: DynamicBatchNorm2d,
    5: DynamicBatchNorm3d,
}

KNOWN_FAILURES: dict[str, str] = {}
"""Check-id patterns the modules fail, and why."""

_STATE_KEYS: dict[str, tuple[str, ...]] = {
    "bn": ("running_mean", "running_var", "num_batches_tracked"),
    "mbn": ("moving_mean", "moving_var", "running_mean", "running_var", "num_batches_tracked"),
}


def _channels_first(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` with its channel axis moved to 1: a view (``channels_last`` for NHWC data)."""
    ax = axis % t.dim()
    return t if ax == 1 else torch.movedim(t, ax, 1)


def _channels_back(t: torch.Tensor, axis: int) -> torch.Tensor:
    """The inverse view of :func:`_channels_first`."""
    ax = axis % t.dim()
    return t if ax == 1 else torch.movedim(t, 1, ax)


@dataclass
class Layer:
    """The state the suite holds: a module and the kind of layer it plays.

    Attributes
    ----------
    kind : {"bn", "mbn"}
        The suite's kind: which canonical keys the state has (``moving_*`` for MBN only).
    module : mbn_torch.modules._DecayNorm
        The module; its buffers are the state.
    scheduler : mbn_torch.MomentumScheduler or None
        The scheduler driving the module's decays, from the first
        :meth:`TorchModulesAdapter.scheduled_train_step` on.
    """

    kind: Kind
    module: _DecayNorm
    scheduler: MomentumScheduler | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """The canonical state keys of this kind, which are also the buffers' names."""
        return _STATE_KEYS[self.kind]

    def buffer(self, key: str) -> torch.Tensor:
        """The module's buffer ``key``."""
        value = getattr(self.module, key)
        assert isinstance(value, torch.Tensor), key  # the suite's layers track statistics
        return value


@dataclass
class Call:
    """One training call of a module, what its backward needs.

    Attributes
    ----------
    module : mbn_torch.modules._DecayNorm
        The module called (its ``weight`` and ``bias`` are differentiated).
    x, y : torch.Tensor
        The input (an autograd leaf) and the output, in the suite's layout.
    """

    module: _DecayNorm
    x: torch.Tensor
    y: torch.Tensor

    def grads(self, dy: torch.Tensor) -> tuple[torch.Tensor, Any, Any]:
        """``(dx, dweight, dbias)`` by ``torch.autograd.grad`` (``None`` without affine).

        An input the output does not depend on gets zeros (an empty batch's ``weight``).
        """
        weight, bias = self.module.weight, self.module.bias
        inputs = [self.x] if weight is None or bias is None else [self.x, weight, bias]
        got = torch.autograd.grad(self.y, inputs, dy, allow_unused=True, materialize_grads=True)
        return (got[0], None, None) if len(got) == 1 else (got[0], got[1], got[2])


class TorchModulesAdapter:
    """``mbn_torch``'s modules under the conformance suite (see the module docstring).

    Parameters
    ----------
    bn_through_mbn : bool, optional
        Run BN (kind ``"bn"``) through ``MomentumBatchNorm*d`` with ``lam = 0`` instead of
        ``DynamicBatchNorm*d``.
    """

    def __init__(self, *, bn_through_mbn: bool = False) -> None:
        self.bn_classes = _MBN if bn_through_mbn else _DYNAMIC
        via = "MomentumBatchNorm*d lam=0" if bn_through_mbn else "DynamicBatchNorm*d"
        self.name = f"mbn_torch modules (BN: {via})"
        self.capabilities = Capabilities(
            running_var="unbiased",
            native_momentum="update_rate",
            refuses=frozenset(REFUSALS),
            version=mbn_ref.__version__,
            known_failures=KNOWN_FAILURES,
        )

    # -- arrays -------------------------------------------------------------------------
    def from_numpy(self, a: np.ndarray) -> torch.Tensor:
        """``a`` as a CPU tensor (a copy: the modules never alias the suite's arrays)."""
        return torch.from_numpy(np.array(a))

    def to_numpy(self, a: Any) -> np.ndarray:
        """A tensor as a NumPy array (detached)."""
        return np.asarray(a.detach().cpu().numpy())

    # -- state: the module's buffers ------------------------------------------------------
    def init_state(self, setup: Setup) -> Layer:
        """A module for ``setup``'s kind and input rank, in the case's dtype."""
        classes = _MBN if setup.kind == "mbn" else self.bn_classes
        rank = len(setup.shape)
        if rank not in classes:
            raise ValueError(f"no mbn_torch module takes {rank}-D input {setup.shape}")
        dtype = getattr(torch, setup.dtype)
        module = classes[rank](setup.num_features, affine=setup.affine, dtype=dtype)
        return Layer(setup.kind, module)

    def load_state(self, state: Layer, values: Mapping[str, np.ndarray]) -> Layer:
        """``state`` with the canonical ``values`` copied into its module's buffers."""
        with torch.no_grad():
            for key in state.keys:
                if key in values:
                    buffer = state.buffer(key)
                    buffer.copy_(torch.from_numpy(np.asarray(values[key])).to(buffer.dtype))
        return state

    def state_to_numpy(self, state: Layer) -> dict[str, np.ndarray]:
        """Copies of the module's buffers under the canonical keys of its kind."""
        return {k: np.array(self.to_numpy(state.buffer(k))) for k in state.keys}

    # -- steps --------------------------------------------------------------------------
    @staticmethod
    def _configure(
        step: Step, module: _DecayNorm, gamma: Any, beta: Any, *, decays: bool = True
    ) -> None:
        """Set ``step``'s eps, decays (unless not ``decays``), affine parameters and mode."""
        if decays:
            momentum = Step.update_rate(step.inference_decay)  # ValueError for a bad decay
            module.momentum = momentum
            if isinstance(module, _MomentumBatchNorm):
                with torch.no_grad():
                    module.lam.fill_(step.lam if step.kind == "mbn" else 0.0)
        module.eps = step.eps
        if module.weight is not None and module.bias is not None:
            with torch.no_grad():
                module.weight.copy_(gamma)
                module.bias.copy_(beta)
        module.train(step.training)

    @staticmethod
    def _call(module: _DecayNorm, x: torch.Tensor, axis: int) -> Call:
        """``module`` on ``x`` (an autograd leaf now) in the channels-first view, and back."""
        leaf = x.detach().requires_grad_(True)
        y: torch.Tensor = module(_channels_first(leaf, axis))
        return Call(module, leaf, _channels_back(y, axis))

    def train_step(
        self, step: Step, state: Layer, x: torch.Tensor, gamma: Any, beta: Any
    ) -> tuple[torch.Tensor, Layer, Call]:
        """One training call of the module, which updates its buffers in place."""
        self._configure(step, state.module, gamma, beta)
        call = self._call(state.module, x, step.axis)
        return call.y, state, call

    def eval_step(
        self, step: Step, state: Layer, x: torch.Tensor, gamma: Any, beta: Any
    ) -> torch.Tensor:
        """One evaluation call of the module."""
        self._configure(step, state.module, gamma, beta)
        with torch.no_grad():
            y: torch.Tensor = state.module(_channels_first(x, step.axis))
        return _channels_back(y, step.axis)

    def backward(self, ctx: Call, dy: torch.Tensor) -> tuple[torch.Tensor, Any, Any]:
        """``(dx, dgamma, dbeta)`` by autograd."""
        return ctx.grads(dy)

    def scheduled_train_step(
        self,
        schedule: ScheduleSetup,
        epoch: int,
        step: Step,
        state: Layer,
        x: torch.Tensor,
        gamma: Any,
        beta: Any,
    ) -> tuple[torch.Tensor, Layer, Call, tuple[float, float]]:
        """An MBN training step with the decays of :class:`mbn_torch.MomentumScheduler`.

        The layer's scheduler (the paper's Eq. 11 and Eq. 12 for ``schedule``) is built at
        the first call and stepped once per completed epoch, as in training; the decays
        reported are the module's buffers ``lam`` and ``inference_decay`` that the call
        used.
        """
        module = state.module
        if not isinstance(module, _MomentumBatchNorm):
            raise TypeError(f"a scheduled MBN step needs an MBN module, got {type(module)}")
        if state.scheduler is None or state.scheduler.last_step > epoch:
            state.scheduler = MomentumScheduler(
                module,
                batch_size=schedule.batch_size,
                total_epochs=schedule.total_epochs,
                ideal_batch_size=schedule.ideal_batch_size,
                tau0=schedule.tau0,
            )
        while state.scheduler.last_step < epoch:
            state.scheduler.step()
        self._configure(step, module, gamma, beta, decays=False)
        used = (float(module.lam), float(module.inference_decay))
        call = self._call(module, x, step.axis)
        return call.y, state, call, used

    # -- synchronized statistics ----------------------------------------------------------
    def sync_train_step(
        self,
        step: Step,
        state: Layer,
        shards: Sequence[torch.Tensor],
        gamma: Any,
        beta: Any,
    ) -> tuple[list[torch.Tensor], Layer, list[Call]]:
        """A synchronized training step: one ``SyncMomentumBatchNorm`` per shard, on threads.

        The replicas start from ``state``'s buffers (BN: ``lam = 0``); each one's
        ``_all_sum`` hook returns its rank's collective of
        :func:`mbn_ref.distributed.simulate` instead of ``torch.distributed``'s, so the
        module's own training path computes the global statistics. Every rank must end
        with the same state (checked), which is copied into ``state``.
        """
        module = state.module
        source = SyncMomentumBatchNorm(
            module.num_features,
            affine=module.weight is not None,
            dtype=state.buffer("running_mean").dtype,
        )
        self._configure(step, source, gamma, beta)
        with torch.no_grad():
            for key in state.keys:
                getattr(source, key).copy_(state.buffer(key))
        replicas = [copy.deepcopy(source) for _ in shards]

        def run_rank(r: int, all_sum: AllSum) -> Call:
            replicas[r]._all_sum = _returning(all_sum)  # type: ignore[method-assign]
            return self._call(replicas[r], shards[r], step.axis)

        calls = simulate(len(shards), run_rank)
        states = [self.state_to_numpy(Layer(state.kind, r)) for r in replicas]
        for r, other in enumerate(states[1:], start=1):
            differ = [k for k in other if not np.array_equal(other[k], states[0][k])]
            if differ:
                raise RuntimeError(f"rank {r} ended with another state than rank 0: {differ}")
        with torch.no_grad():
            for key in state.keys:
                state.buffer(key).copy_(getattr(replicas[0], key))
        return [c.y for c in calls], state, calls

    def sync_backward(
        self, ctx: Sequence[Call], dys: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], Any, Any]:
        """Every rank's autograd backward, on threads (the collective sums two C-vectors).

        ``dgamma``/``dbeta`` are the ranks' sums added, as data-parallel training reduces
        them.
        """
        if len(dys) != len(ctx):
            raise ValueError(f"got {len(dys)} gradients for {len(ctx)} shards")
        grads = simulate(len(ctx), lambda r, _: ctx[r].grads(dys[r]))
        dxs = [g[0] for g in grads]
        if grads[0][1] is None:
            return dxs, None, None
        return dxs, _total([g[1] for g in grads]), _total([g[2] for g in grads])


def _returning(all_sum: AllSum) -> Callable[[], AllSum]:
    """A module's ``_all_sum`` hook that returns ``all_sum``."""

    def hook() -> AllSum:
        return all_sum

    return hook


def _total(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def make(arg: str | None = None) -> TorchModulesAdapter:
    """The factory of ``--backend torch`` (entry point group ``mbn_conformance.backends``).

    Parameters
    ----------
    arg : {None, "mbn"}, optional
        ``"mbn"``: BN through ``MomentumBatchNorm*d`` with ``lam = 0`` instead of
        ``DynamicBatchNorm*d`` (``--impl 'mbn_torch.conformance:make(mbn)'``, or
        ``mbn_conformance.loading.backend_adapter("torch:mbn")``).

    Returns
    -------
    TorchModulesAdapter
        The adapter.

    Raises
    ------
    ValueError
        An unknown ``arg``.

    Examples
    --------
    >>> make("mbn").name
    'mbn_torch modules (BN: MomentumBatchNorm*d lam=0)'
    """
    if arg not in (None, "", "mbn"):
        raise ValueError(f"mbn_torch.conformance.make takes nothing or 'mbn', got {arg!r}")
    return TorchModulesAdapter(bn_through_mbn=arg == "mbn")
