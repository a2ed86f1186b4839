"""``MomentumScheduler``: dynamic decays for every MBN / dynamic-BN module of a model.

In the style of ``torch.optim.lr_scheduler``: built on a model, ``step()`` once per epoch or
once per iteration, ``get_last_lam()``, ``state_dict()``/``load_state_dict()``. Every value
comes from :mod:`mbn_ref.schedules` (the paper's Eq. 11/12, any schedule, the plateau and
gradient-noise controllers); the scheduler only writes it into the modules' 0-d buffers, in
place (``fill_``), so a compiled model never recompiles.

Two decays, both **decays** (weight on history):

- ``lam``, the paper's training decay: the ``lam`` buffer of every ``MomentumBatchNorm*d``;
- ``tau``, the decay of the inference statistics: the ``inference_decay`` buffer of every
  module of ours (PyTorch's ``momentum`` is ``1 - tau``; the cumulative average sets the
  ``cumulative_average`` flag instead).

>>> import torch
>>> from torch import nn
>>> import mbn_torch
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), mbn_torch.MomentumBatchNorm2d(8))
>>> sched = MomentumScheduler(model, batch_size=2, total_epochs=200)   # Eq. 11 and Eq. 12
>>> sched.get_last_lam(), round(sched.get_last_tau(), 6)                # epoch 1 (count 0)
(0.0, 0.989894)
>>> for epoch in range(199):
...     sched.step()                                                    # end of an epoch
>>> sched.get_last_lam(), float(model[1].lam)                           # epoch 200: 1 - 2/32
(0.9375, 0.9375)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
from torch import nn

from mbn_ref import conventions, schedules
from mbn_ref._validate import check_int, is_real_scalar
from mbn_ref.schedules import (
    PAPER_DEFAULTS_SEC_5_2,
    GradientNoiseController,
    PlateauController,
    Schedule,
)

from . import modules as _modules

__all__ = ["DecaySource", "MomentumScheduler"]

Controller: TypeAlias = PlateauController | GradientNoiseController

DecaySource: TypeAlias = float | Schedule | Controller | Literal["keep"] | None
"""What drives ``lam`` or ``tau``: a constant decay, a schedule (``count -> decay``), a
controller, ``None`` (the paper's Eq. 11 for ``lam``, Eq. 12 for ``tau``) or ``"keep"``
(not driven: the modules keep their own values)."""

# every module of ours (MBN, BN with a dynamic momentum) has the inference decay; MBN also lam
_DECAY_MODULE = _modules._DecayNorm
_LAM_MODULE = _modules._MomentumBatchNorm

# schedules.cumulative() builds a new closure per call; they all share this code object
_CUMULATIVE_CODE = schedules.cumulative().__code__  # type: ignore[attr-defined]

_STATE_KEYS = ("last_step", "lam", "tau", "lam_controller", "tau_controller")


@dataclass(frozen=True)
class _Slot:
    """How one decay (``lam`` or ``tau``) is driven."""

    name: str
    kind: Literal["keep", "cumulative", "schedule", "plateau", "noise"]
    schedule: Schedule | None = None
    controller: Controller | None = None

    @property
    def has_value(self) -> bool:
        """Whether the slot applies a decay value (not ``"keep"``, not the cumulative flag)."""
        return self.kind in ("schedule", "plateau", "noise")


def _slot(name: str, source: object, paper_default: Callable[[], Schedule]) -> _Slot:
    """Resolve a :data:`DecaySource`; ``paper_default()`` builds the paper's schedule."""
    if isinstance(source, str):
        if source == "keep":
            return _Slot(name, "keep")
        hint = (
            "; for the cumulative average pass tau=mbn_ref.schedules.cumulative()"
            if source == "cumulative"
            else ""
        )
        raise ValueError(f"{name}={source!r}: the only string accepted is 'keep'{hint}")
    if source is None:
        return _Slot(name, "schedule", schedule=paper_default())
    if isinstance(source, PlateauController):
        return _Slot(name, "plateau", controller=source)
    if isinstance(source, GradientNoiseController):
        return _Slot(name, "noise", controller=source)
    if is_real_scalar(source):
        decay = conventions.validate_decay(source, name)  # type: ignore[arg-type]
        return _Slot(name, "schedule", schedule=schedules.constant(decay))
    if callable(source):
        if name == "tau" and getattr(source, "__code__", None) is _CUMULATIVE_CODE:
            return _Slot(name, "cumulative")
        return _Slot(name, "schedule", schedule=source)
    raise TypeError(
        f"{name} must be a decay (a number in [0, 1]), a schedule (a callable count -> "
        f"decay, e.g. from mbn_ref.schedules), a PlateauController, a "
        f"GradientNoiseController, None (the paper's default) or 'keep', got {source!r}"
    )


class MomentumScheduler:
    """Drive ``lam`` and ``tau`` of every MBN / dynamic-BN module in a model.

    In the style of ``torch.optim.lr_scheduler``: constructing it applies the values for
    count 0 at once; each :meth:`step` advances the count by one and applies the next
    values to every module; :meth:`state_dict`/:meth:`load_state_dict` save and restore it
    beside the model's checkpoint. The values come from :mod:`mbn_ref.schedules` and are
    written into the modules' 0-d buffers in place (``fill_`` under ``torch.no_grad()``),
    so a ``torch.compile``'d model reads them at run time and never recompiles.

    **Counting.** ``last_step`` is the number of :meth:`step` calls since construction.
    Schedules receive ``count = last_step`` (step once per epoch: ``count`` = completed
    epochs), or with ``steps_per_epoch`` the fractional ``count = last_step /
    steps_per_epoch`` (step once per iteration, schedules still written in epochs: Eq. 11
    rises smoothly within each epoch and equals the per-epoch value at every epoch
    boundary). A schedule written in iterations is used without ``steps_per_epoch``,
    stepping per iteration.

    Parameters
    ----------
    model : nn.Module
        The model; every ``MomentumBatchNorm*d`` in ``model.modules()`` gets ``lam``, every
        module of ours (MBN and BN with dynamic momentum) gets ``tau``. The modules are
        collected once, here.
    batch_size : float, optional
        The batch size ``m`` of the normalization statistics (per device when statistics
        are per device). Needed by the paper's defaults.
    total_epochs : float, optional
        ``T`` of Eq. 11, in epochs. Needed by the default ``lam``.
    ideal_batch_size : float, optional
        ``m0`` of Eq. 11/12 (the paper's §5.2: 32).
    tau0 : float, optional
        ``tau0`` of Eq. 12 (the paper's §5.2: 0.85).
    lam : float, schedule, controller, None or "keep", optional
        The training decay: a constant; a schedule ``count -> decay`` (any of
        :mod:`mbn_ref.schedules`); a ``PlateauController`` (then call ``step(metric)``) or a
        ``GradientNoiseController`` (it reads the gradients at each :meth:`step`); ``None``
        for Eq. 11, ``mbn_lambda_schedule(total_epochs, batch_size, ideal_batch_size)``;
        ``"keep"`` to leave the modules' ``lam`` alone. Ignored (``None``) or an error
        (anything else) when the model has no MBN module.
    tau : float, schedule, controller, None or "keep", optional
        The inference decay, as ``lam``; ``None`` for Eq. 12, ``mbn_tau(batch_size,
        ideal_batch_size, tau0)``. ``mbn_ref.schedules.cumulative()`` selects the exact
        cumulative average of every batch (the modules' ``cumulative_average`` flag, PyTorch's
        ``momentum=None``); any other value clears that flag.
    steps_per_epoch : int, optional
        Iterations per epoch when :meth:`step` is called per iteration (see *Counting*).
    parameters : iterable of tensors, optional
        The parameters whose ``.grad`` a ``GradientNoiseController`` reads (default: every
        parameter of ``model`` that requires a gradient). Only with such a controller.

    Raises
    ------
    ValueError
        No module of ours in ``model``; a default needing ``batch_size``/``total_epochs``
        without them; a bad value (decay outside [0, 1], ``steps_per_epoch < 1``...); a
        schedule whose value at count 0 is not a decay (no module is changed).
    TypeError
        A source of the wrong type.

    Notes
    -----
    Step order per iteration: ``loss.backward()``, ``optimizer.step()``,
    ``scheduler.step()`` (a ``GradientNoiseController`` reads ``.grad`` here, so before
    ``optimizer.zero_grad()``). The gradient never goes to the host: the controller keeps
    its moments on the gradients' device (float64 where it has it) and reads a finiteness
    flag and two sums per step. With a ``GradScaler``, unscale first
    (``scaler.unscale_(optimizer)``); steps with non-finite gradients leave the controller
    unchanged.

    An invalid value from a schedule or controller raises from :meth:`step` before any
    module changes; the scheduler's own state is unchanged too.

    Examples
    --------
    Per iteration, with Eq. 11 in fractional epochs:

    >>> import torch
    >>> from torch import nn
    >>> import mbn_torch
    >>> from mbn_ref import schedules
    >>> model = nn.Sequential(nn.Linear(4, 4), mbn_torch.MomentumBatchNorm1d(4))
    >>> sched = MomentumScheduler(model, batch_size=4, total_epochs=3, steps_per_epoch=10)
    >>> for _ in range(15):
    ...     sched.step()
    >>> sched.count, round(sched.get_last_lam(), 6)
    (1.5, 0.469604)
    >>> sched.get_last_lam() == schedules.mbn_lambda(2.5, total_epochs=3, batch_size=4)
    True

    Any schedule, in iterations, and the cumulative average for the inference statistics:

    >>> sched = MomentumScheduler(
    ...     model, lam=schedules.linear(0.0, 0.9, num_steps=90), tau=schedules.cumulative()
    ... )
    >>> sched.step()
    >>> sched.get_last_lam(), model[1].momentum is None
    (0.01, True)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: float | None = None,
        total_epochs: float | None = None,
        ideal_batch_size: float = PAPER_DEFAULTS_SEC_5_2.ideal_batch_size,
        tau0: float = PAPER_DEFAULTS_SEC_5_2.tau0,
        lam: DecaySource = None,
        tau: DecaySource = None,
        steps_per_epoch: int | None = None,
        parameters: Iterable[torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        decay_modules = [m for m in model.modules() if isinstance(m, _DECAY_MODULE)]
        if not decay_modules:
            raise ValueError(
                f"the model ({type(model).__name__}) has no module with a dynamic decay "
                "(MomentumBatchNorm1d/2d/3d or BN with dynamic momentum); convert its "
                "BatchNorm layers first with mbn_torch.convert_to_mbn(model)"
            )
        lam_modules = [m for m in decay_modules if isinstance(m, _LAM_MODULE)]
        if not lam_modules and lam is not None and not (isinstance(lam, str) and lam == "keep"):
            raise ValueError(
                "lam is given, but the model has no MomentumBatchNorm module (nothing has a "
                "training decay); leave lam=None"
            )
        self.steps_per_epoch = (
            None
            if steps_per_epoch is None
            else check_int("steps_per_epoch", steps_per_epoch, minimum=1)
        )

        alternatives = "a decay, a schedule, a controller, or 'keep'"

        def eq11() -> Schedule:
            return schedules.default_lam_schedule(
                batch_size, total_epochs, ideal_batch_size, alternatives=alternatives
            )

        def eq12() -> Schedule:
            return schedules.default_tau_schedule(
                batch_size, ideal_batch_size, tau0, alternatives=alternatives
            )

        lam_slot = _slot("lam", lam, eq11) if lam_modules else _Slot("lam", "keep")
        self._slots = (lam_slot, _slot("tau", tau, eq12))
        self._lam_modules = lam_modules
        self._decay_modules = decay_modules

        self._parameters: list[torch.Tensor] = []
        self._parameter_names: list[str] = []
        if any(s.kind == "noise" for s in self._slots):
            named: list[tuple[str, torch.Tensor]]
            if parameters is None:
                named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            else:
                named = [(f"parameters[{i}]", p) for i, p in enumerate(parameters)]
            if not named:
                raise ValueError("the GradientNoiseController has no parameters to read")
            self._parameter_names = [n for n, _ in named]
            self._parameters = [p for _, p in named]
        elif parameters is not None:
            raise ValueError("parameters is only read by a GradientNoiseController")

        # what _fill wrote last, per (module, buffer name): the tensor, its version, the value
        self._written: dict[tuple[int, str], tuple[torch.Tensor, int, float | bool]] = {}
        self.last_step = 0
        self._states: dict[str, Any] = {
            s.name: s.controller.init() for s in self._slots if s.controller is not None
        }
        self._values: dict[str, float | None] = {
            s.name: self._value_at(s, self.count, self._states.get(s.name)) for s in self._slots
        }
        self._apply(self._values)

    # -- reading -----------------------------------------------------------------------------

    @property
    def count(self) -> float:
        """What the schedules receive: ``last_step``, or ``last_step / steps_per_epoch``."""
        if self.steps_per_epoch is None:
            return self.last_step
        return self.last_step / self.steps_per_epoch

    def get_last_lam(self) -> float | None:
        """The training decay applied last (``None``: ``lam`` not driven, or no MBN module)."""
        return self._values["lam"]

    def get_last_tau(self) -> float | None:
        """The inference decay applied last (``None``: the cumulative average, or ``"keep"``).

        PyTorch's ``momentum`` of the modules is ``1 - tau``.
        """
        return self._values["tau"]

    # -- stepping ----------------------------------------------------------------------------

    def step(self, metric: float | torch.Tensor | None = None) -> None:
        """Advance the count by one and apply the next ``lam`` and ``tau`` to every module.

        Parameters
        ----------
        metric : float or 0-d tensor, optional
            The monitored metric (e.g. the validation loss) for a ``PlateauController``:
            required with one, refused without. A tensor is read on the host.

        Raises
        ------
        ValueError
            A value from a schedule is not a decay; ``metric`` missing or unexpected; a
            gradient of the wrong size (nothing is changed: modules, count, controllers).
        RuntimeError
            A ``GradientNoiseController`` finds a parameter without ``.grad``.
        """
        plateau = any(s.kind == "plateau" for s in self._slots)
        if plateau and metric is None:
            raise ValueError("this scheduler has a PlateauController: call step(metric)")
        if metric is not None and not plateau:
            raise ValueError(
                "step(metric) takes a metric only for a PlateauController (the count "
                "advances by one per call; it is not an epoch number)"
            )
        if isinstance(metric, torch.Tensor):
            metric = metric.item()
        grads = self._gradients() if self._parameters else None
        states = dict(self._states)
        for slot in self._slots:
            if slot.kind == "plateau":
                assert isinstance(slot.controller, PlateauController)
                states[slot.name] = slot.controller.update(states[slot.name], metric)  # type: ignore[arg-type]
            elif slot.kind == "noise":
                assert isinstance(slot.controller, GradientNoiseController)
                states[slot.name] = slot.controller.update(states[slot.name], grads)
        count = self._count_of(self.last_step + 1)
        values = {s.name: self._value_at(s, count, states.get(s.name)) for s in self._slots}
        self._apply(values)
        self.last_step += 1
        self._states, self._values = states, values

    def _count_of(self, step: int) -> float:
        return step if self.steps_per_epoch is None else step / self.steps_per_epoch

    def _value_at(self, slot: _Slot, count: float, state: Any) -> float | None:
        """The decay ``slot`` gives at ``count`` (validated), ``None`` if it has none."""
        if slot.kind == "schedule":
            assert slot.schedule is not None
            value = slot.schedule(count)
            return conventions.validate_decay(
                value, f"{slot.name} (the schedule's value at count {count})"
            )
        if slot.kind in ("plateau", "noise"):
            return float(state.decay)
        return None

    def _gradients(self) -> list[torch.Tensor]:
        """The parameters' gradients, detached, on their device (nothing copied)."""
        grads = []
        for name, p in zip(self._parameter_names, self._parameters, strict=True):
            if p.grad is None:
                raise RuntimeError(
                    f"the GradientNoiseController reads the gradients, but {name} has no "
                    ".grad: call scheduler.step() after loss.backward() and before "
                    "optimizer.zero_grad(), or pass parameters= with the ones that get one"
                )
            grads.append(p.grad.detach())
        return grads

    def _apply(self, values: Mapping[str, float | None]) -> None:
        """Write the decays into the modules' buffers, in place."""
        cumulative = self._slots[1].kind == "cumulative"
        lam, tau = values["lam"], values["tau"]
        with torch.no_grad():
            if lam is not None:
                for mbn in self._lam_modules:
                    self._fill(mbn, "lam", lam)
            if cumulative or tau is not None:
                for module in self._decay_modules:
                    if tau is not None:
                        self._fill(module, "inference_decay", tau)
                    self._fill(module, "cumulative_average", cumulative)

    def _fill(self, module: nn.Module, name: str, value: float | bool) -> None:
        """``buffer.fill_(value)``, skipped when the buffer still holds what was written last.

        "Still" means: the same tensor, not written since (its version counter), and the same
        value. Any other write (a model's ``load_state_dict``, a manual ``fill_``, ``.to()``)
        makes the next step write again. An unchanged buffer keeps its version, so the
        modules' cached host copy of a decay (eager fast path) need not be read again.
        """
        buffer = module.get_buffer(name)
        key = (id(module), name)
        last = self._written.get(key)
        if last is not None:
            tensor, version, written = last
            if tensor is buffer and version == buffer._version and written == value:
                return
        buffer.fill_(value)
        self._written[key] = (buffer, buffer._version, value)

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: plain Python values and tensors.

        Keys: ``last_step``; ``lam`` and ``tau``, the decays applied last (``None`` where not
        driven or cumulative); ``lam_controller`` and ``tau_controller``, the controllers'
        states (``None`` without one): a ``PlateauController``'s as plain numbers, a
        ``GradientNoiseController``'s with its moments ``mean``/``var`` as float64 tensors on
        the gradients' device (not lists: a large model's moments stay compact). It loads
        with ``torch.load(..., weights_only=True)``. The configuration (schedules,
        controllers' settings) is not saved: build the scheduler the same way, then load.
        """
        out: dict[str, Any] = {"last_step": self.last_step, **self._values}
        for slot in self._slots:
            key = f"{slot.name}_controller"
            if slot.controller is None:
                out[key] = None
            elif isinstance(slot.controller, GradientNoiseController):
                d = slot.controller.state_to_dict(self._states[slot.name], arrays=True)
                out[key] = {
                    **d,
                    "mean": torch.as_tensor(d["mean"]),
                    "var": torch.as_tensor(d["var"]),
                }
            else:
                out[key] = slot.controller.state_to_dict(self._states[slot.name])
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` and apply its decays to the modules.

        Everything is checked before anything changes: the key set, ``last_step`` (an
        integer ``>= 0``), ``lam``/``tau`` (decays, or ``None`` exactly where this scheduler
        applies none), the controllers' states (their ``state_from_dict``; the gradient
        moments must have the size of the parameters' gradients). The gradient moments move
        to the parameters' device. Then ``lam``/``tau`` are written into the modules, as
        :meth:`step` would have (after loading the model's own ``state_dict`` this changes
        nothing; after building a fresh scheduler it undoes its count-0 values).

        Raises
        ------
        ValueError
            A missing, unknown or bad key, named in the message; nothing is changed.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"MomentumScheduler state must be a dict, got {type(state_dict).__name__}"
            )
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        unknown = [k for k in state_dict if k not in _STATE_KEYS]
        if missing or unknown:
            what = f"missing key {missing[0]!r}" if missing else f"unknown key {unknown[0]!r}"
            raise ValueError(f"MomentumScheduler state: {what} (expected {list(_STATE_KEYS)})")
        try:
            last_step = check_int("last_step", state_dict["last_step"], minimum=0)
        except TypeError as exc:
            raise ValueError(f"MomentumScheduler state: key 'last_step': {exc}") from None
        values: dict[str, float | None] = {}
        states: dict[str, Any] = {}
        for slot in self._slots:
            values[slot.name] = self._read_value(slot, state_dict[slot.name])
            key = f"{slot.name}_controller"
            raw = state_dict[key]
            if slot.controller is None:
                if raw is not None:
                    raise ValueError(
                        f"MomentumScheduler state: key {key!r} holds a controller state, but "
                        f"this scheduler's {slot.name} has no controller"
                    )
                continue
            if raw is None:
                raise ValueError(
                    f"MomentumScheduler state: key {key!r} is None, but this scheduler's "
                    f"{slot.name} has a {type(slot.controller).__name__}"
                )
            states[slot.name] = self._read_controller_state(slot, key, raw)
            if values[slot.name] != states[slot.name].decay:
                raise ValueError(
                    f"MomentumScheduler state: key {slot.name!r} ({values[slot.name]!r}) is not "
                    f"the decay of {key!r} ({states[slot.name].decay!r})"
                )
        self._apply(values)
        self.last_step, self._states, self._values = last_step, states, values

    def _read_value(self, slot: _Slot, value: object) -> float | None:
        if not slot.has_value:
            if value is not None:
                raise ValueError(
                    f"MomentumScheduler state: key {slot.name!r} must be None (this "
                    f"scheduler's {slot.name} is {slot.kind!r}), got {value!r}"
                )
            return None
        try:
            return conventions.validate_decay(value, f"MomentumScheduler state: key {slot.name!r}")  # type: ignore[arg-type]
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    def _read_controller_state(self, slot: _Slot, key: str, raw: object) -> Any:
        ctl = slot.controller
        assert ctl is not None
        try:
            if isinstance(ctl, PlateauController):
                return ctl.state_from_dict(raw)
            if isinstance(raw, Mapping):  # the moments go to the parameters' device first
                device = self._parameters[0].device
                raw = {
                    k: v.to(device) if k in ("mean", "var") and isinstance(v, torch.Tensor) else v
                    for k, v in raw.items()
                }
            state = ctl.state_from_dict(raw)
        except ValueError as exc:
            raise ValueError(f"MomentumScheduler state: key {key!r}: {exc}") from None
        if state.num_updates == 0:
            return state
        expected = sum(p.numel() for p in self._parameters)
        if state.mean.shape[0] != expected:
            raise ValueError(
                f"MomentumScheduler state: key {key!r}: the gradient moments have "
                f"{state.mean.shape[0]} elements, the parameters' gradients {expected}"
            )
        if isinstance(state.mean, np.ndarray):  # restored from lists (JSON)
            device = self._parameters[0].device
            state = state._replace(
                mean=torch.as_tensor(state.mean, device=device),
                var=torch.as_tensor(state.var, device=device),
            )
        return state
