"""Keras callbacks that move the decays of every mbn_tf layer of a model during ``fit``.

- :class:`MomentumScheduler`: any :mod:`mbn_ref.schedules` schedule, per epoch or per
  batch; by default the paper's Eq. 11 for ``lam`` and Eq. 12 for ``momentum``.
- :class:`MomentumOnPlateau`: :class:`mbn_ref.schedules.PlateauController` on a logged
  metric (``val_loss`` by default), once per epoch.
- :class:`MomentumFromGradientNoise`: :class:`mbn_ref.schedules.GradientNoiseController`
  on the gradient of every training step, recorded on the device by a
  :class:`GradientRecordingModel` (a Keras model whose train step keeps its gradient).

Every value comes from :mod:`mbn_ref.schedules`; a callback only assigns it to the layers'
0-d variables (``lam`` of every :class:`~mbn_tf.MomentumBatchNormalization`,
``inference_decay``, Keras' ``momentum``, of every layer of ours), which the compiled train
step reads at run time: ``fit`` traces its step once. A value is validated (a decay in
``[0, 1]``) before any layer changes. Both decays are **decays** (weight on history), the
layers' and Keras' convention; PyTorch's ``momentum`` is ``1 - momentum``.

State: the decays themselves are the layers' variables, saved with the model
(``model.save``, ``save_weights``). What a callback adds (its counters, a controller's
state) is :meth:`~MomentumScheduler.state_dict`, plain JSON-compatible values. It is saved
**inside** the ``.keras`` file (an asset of the model's first layer of ours, written at
save time), and a callback built the same way restores it at the start of its first
``fit`` on the loaded model (``restore=False`` starts afresh); ``load_state_dict`` restores
it by hand (docs/keras.md, *Resuming*).

>>> import numpy as np
>>> import keras
>>> import mbn_tf
>>> model = keras.Sequential([keras.Input((3,)), mbn_tf.MomentumBatchNormalization()])
>>> model.compile(optimizer="sgd", loss="mse")
>>> sched = MomentumScheduler(batch_size=8, total_epochs=4)       # Eq. 11 and Eq. 12
>>> x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
>>> _ = model.fit(x, x, batch_size=8, epochs=4, verbose=0, callbacks=[sched])
>>> round(float(model.layers[0].lam.numpy()), 4), sched.state_dict()["epochs"]
(0.75, 4)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Literal, TypeAlias

import keras

from mbn_ref import conventions, schedules
from mbn_ref._validate import check_int, is_real_scalar
from mbn_ref.schedules import (
    PAPER_DEFAULTS_SEC_5_2,
    GradientNoiseController,
    PlateauController,
    Schedule,
)

from .layers import MomentumBatchNormalization, _DecayNormalization, _ScheduleState

__all__ = [
    "DecaySource",
    "GradientRecordingModel",
    "MomentumFromGradientNoise",
    "MomentumOnPlateau",
    "MomentumScheduler",
]

DecaySource: TypeAlias = float | Schedule | Literal["keep"] | None
"""What drives a decay: a constant, a schedule ``count -> decay``, ``None`` (the paper's
default) or ``"keep"`` (the layers keep their own value)."""

Target = Literal["lam", "momentum"]


def _layers(model: Any) -> Iterator[Any]:
    """Every layer inside ``model`` (nested models included), depth first, once each."""
    seen: set[int] = set()
    stack = list(reversed(getattr(model, "layers", [])))
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer
        stack.extend(reversed(getattr(layer, "layers", [])))


class _DecayCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Finds the layers of ours in the model and assigns validated decays to them.

    Its state travels in the model: :meth:`_attach` (at the start of ``fit``) restores the
    state a loaded model carries for this kind of callback, once, into a callback that has
    not trained yet (unless ``restore=False``), and registers :meth:`state_dict` with the
    model's first layer of ours, which writes it into the ``.keras`` file at save time.
    """

    restore = True
    restored = False  # whether _attach loaded a state the model carried
    _attached = False

    def _state_key(self) -> str:
        """The key of this callback's state in the model (one per kind and decay)."""
        decay = getattr(self, "decay", None)
        return type(self).__name__ + ("" if decay is None else f":{decay}")

    def _attach(self) -> None:
        holder: _ScheduleState = self._ours()[0]._schedule
        key = self._state_key()
        if self.restore and not self._attached and key in holder.saved:
            self.load_state_dict(holder.saved[key])
            self.restored = True
        holder.providers[key] = self.state_dict
        self._attached = True

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _ours(self) -> list[_DecayNormalization]:
        """The model's layers of ours, depth first (``ValueError`` when there are none)."""
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a model yet")
        ours = [layer for layer in _layers(self.model) if isinstance(layer, _DecayNormalization)]
        if not ours:
            raise ValueError(
                f"{type(self).__name__}: the model {self.model.name!r} has no "
                "MomentumBatchNormalization or DynamicBatchNormalization layer (convert its "
                "BatchNormalization layers with mbn_tf.from_batchnorm)"
            )
        return ours

    def _targets(self, target: Target) -> list[Any]:
        """The variables a decay goes to: ``lam`` of MBN layers, ``inference_decay`` of all."""
        ours = self._ours()
        if target == "lam":
            return [layer.lam for layer in ours if isinstance(layer, MomentumBatchNormalization)]
        return [layer.inference_decay for layer in ours]

    def _assign(self, values: Mapping[Target, float | None]) -> None:
        """Assign every decay that is not ``None`` (already validated) to its variables."""
        for target, value in values.items():
            if value is not None:
                for variable in self._targets(target):
                    variable.assign(value)


def _source(name: Target, source: object, paper_default: Callable[[], Schedule]) -> Schedule | None:
    """A :data:`DecaySource` as a schedule, ``None`` for ``"keep"``."""
    if isinstance(source, str):
        if source == "keep":
            return None
        raise ValueError(f"{name}={source!r}: the only string accepted is 'keep'")
    if source is None:
        return paper_default()
    if is_real_scalar(source):
        return schedules.constant(conventions.validate_decay(source, name))  # type: ignore[arg-type]
    if isinstance(source, PlateauController) or not callable(source):
        raise TypeError(
            f"{name} must be a decay (a number in [0, 1]), a schedule (a callable count -> "
            f"decay, e.g. from mbn_ref.schedules), None (the paper's default) or 'keep', got "
            f"{source!r}"
            + ("; use MomentumOnPlateau" if callable(getattr(source, "update", None)) else "")
        )
    return source  # type: ignore[return-value]


class MomentumScheduler(_DecayCallback):
    """Apply :mod:`mbn_ref.schedules` to ``lam`` and ``momentum`` of every layer, during ``fit``.

    Keras' ``LearningRateScheduler`` for the decays, with the counting of
    ``mbn_torch.MomentumScheduler``: the callback counts the epochs and the training batches
    it has seen (across ``fit`` calls; saved by :meth:`state_dict`). Per epoch, at the start
    of each epoch the schedules receive ``count`` = completed epochs; per batch, before each
    training batch, ``count`` = completed batches, or with ``steps_per_epoch`` the fractional
    ``completed batches / steps_per_epoch`` (a schedule written in epochs, e.g. Eq. 11,
    rising smoothly within each epoch). ``mbn_ref.schedules.cumulative()`` applied per batch
    to ``momentum`` makes the moving statistics the exact average of every batch's.

    Parameters
    ----------
    batch_size : float, optional
        The batch size ``m`` of the normalization statistics (per replica unless the layers
        are ``synchronized``). Needed by the paper's defaults.
    total_epochs : float, optional
        ``T`` of Eq. 11, in epochs. Needed by the default ``lam``.
    ideal_batch_size : float, optional
        ``m0`` of Eq. 11/12 (the paper's §5.2: 32).
    tau0 : float, optional
        ``tau0`` of Eq. 12 (the paper's §5.2: 0.85).
    lam : float, schedule, None or "keep", optional
        The training decay of every ``MomentumBatchNormalization``: a constant, a schedule
        ``count -> decay``, ``None`` for Eq. 11 (``mbn_lambda_schedule(total_epochs,
        batch_size, ideal_batch_size)``) or ``"keep"``.
    momentum : float, schedule, None or "keep", optional
        The decay of the inference statistics (Keras' ``momentum``) of every layer of ours;
        ``None`` for Eq. 12 (``mbn_tau(batch_size, ideal_batch_size, tau0)``).
    per : {"epoch", "batch"}, optional
        When the schedules are applied.
    steps_per_epoch : int, optional
        With ``per="batch"``: batches per epoch, to give the schedules fractional epochs.
    restore : bool, optional
        At the start of its first ``fit``, load the state that the model carries for this
        kind of callback (a model saved with one and loaded); ``False`` starts afresh.

    Raises
    ------
    ValueError
        A default needing ``batch_size``/``total_epochs`` without them; a decay outside
        ``[0, 1]`` (also a schedule's value at count 0, checked here); a model without a
        layer of ours (at the start of ``fit``); a schedule's later value that is not a
        decay (at that epoch or batch: no layer is changed, the count does not advance).
    TypeError
        A source of the wrong type.

    Examples
    --------
    >>> from mbn_ref import schedules
    >>> sched = MomentumScheduler(lam=schedules.linear(0.0, 0.9, num_steps=9), momentum="keep",
    ...                           per="batch")
    >>> sched.values_at(3)
    {'lam': 0.3, 'momentum': None}
    """

    def __init__(
        self,
        *,
        batch_size: float | None = None,
        total_epochs: float | None = None,
        ideal_batch_size: float = PAPER_DEFAULTS_SEC_5_2.ideal_batch_size,
        tau0: float = PAPER_DEFAULTS_SEC_5_2.tau0,
        lam: DecaySource = None,
        momentum: DecaySource = None,
        per: Literal["epoch", "batch"] = "epoch",
        steps_per_epoch: int | None = None,
        restore: bool = True,
    ) -> None:
        super().__init__()
        self.restore = bool(restore)
        if per not in ("epoch", "batch"):
            raise ValueError(f"per must be 'epoch' or 'batch', got {per!r}")
        if steps_per_epoch is not None and per != "batch":
            raise ValueError("steps_per_epoch is only used with per='batch'")
        self.per = per
        self.steps_per_epoch = (
            None
            if steps_per_epoch is None
            else check_int("steps_per_epoch", steps_per_epoch, minimum=1)
        )

        def eq11() -> Schedule:
            return schedules.default_lam_schedule(batch_size, total_epochs, ideal_batch_size)

        def eq12() -> Schedule:
            return schedules.default_tau_schedule(
                batch_size, ideal_batch_size, tau0, option="momentum"
            )

        self._schedules: dict[Target, Schedule | None] = {
            "lam": _source("lam", lam, eq11),
            "momentum": _source("momentum", momentum, eq12),
        }
        self.epochs = 0
        self.iterations = 0
        self._last: dict[Target, float | None] = self.values_at(0)

    def values_at(self, count: float) -> dict[Target, float | None]:
        """The validated decays at ``count`` (``None`` where ``"keep"``); changes nothing."""
        out: dict[Target, float | None] = {}
        for name, schedule in self._schedules.items():
            out[name] = (
                None
                if schedule is None
                else conventions.validate_decay(
                    schedule(count), f"{name} (the schedule's value at count {count})"
                )
            )
        return out

    @property
    def count(self) -> float:
        """What the schedules receive next (see the class docstring)."""
        if self.per == "epoch":
            return self.epochs
        if self.steps_per_epoch is None:
            return self.iterations
        return self.iterations / self.steps_per_epoch

    def get_last(self) -> dict[Target, float | None]:
        """The decays applied last (``None`` where ``"keep"``)."""
        return dict(self._last)

    def _apply_now(self) -> None:
        values = self.values_at(self.count)  # raises before any layer changes
        self._assign(values)
        self._last = values

    def on_train_begin(self, logs: Any = None) -> None:
        """Check that the model has layers of ours (``ValueError`` otherwise); attach."""
        self._attach()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        """Per epoch: apply the decays for the completed epochs."""
        if self.per == "epoch":
            self._apply_now()

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        """Per batch: apply the decays for the completed batches."""
        if self.per == "batch":
            self._apply_now()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        """Count the batch."""
        self.iterations += 1

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        """Count the epoch."""
        self.epochs += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"epochs", "iterations", "lam", "momentum"}``: counters and last decays (JSON)."""
        return {
            "epochs": self.epochs,
            "iterations": self.iterations,
            "lam": self._last["lam"],
            "momentum": self._last["momentum"],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (all checked first; ``ValueError`` names a bad key).

        The layers are not written here: their decays are saved with the model, and the
        next epoch or batch applies the schedules at the restored count.
        """
        keys = ("epochs", "iterations", "lam", "momentum")
        if not isinstance(state, Mapping) or set(state) != set(keys):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"MomentumScheduler state: expected keys {list(keys)}, got {got}")
        try:
            epochs = check_int("epochs", state["epochs"], minimum=0)
            iterations = check_int("iterations", state["iterations"], minimum=0)
            last: dict[Target, float | None] = {}
            for name in ("lam", "momentum"):
                value = state[name]
                keep = self._schedules[name] is None  # type: ignore[index]
                if keep != (value is None):
                    raise ValueError(f"{name}: {value!r} does not match this callback's source")
                last[name] = None if value is None else conventions.validate_decay(value, name)  # type: ignore[index]
        except (TypeError, ValueError) as err:
            raise ValueError(f"MomentumScheduler state: {err}") from None
        self.epochs, self.iterations, self._last = epochs, iterations, last


class _ControllerCallback(_DecayCallback):
    """A :mod:`mbn_ref.schedules` controller driving one decay of every layer of ours.

    Its state starts at ``controller.init()``; :meth:`_apply` assigns a state's decay and
    keeps the state; ``state_dict`` is the controller's ``state_to_dict`` (JSON-compatible).
    """

    _controller_type: ClassVar[Any]  # the controller class (Any: isinstance then keeps Any)

    def __init__(self, controller: Any, decay: Target, restore: bool) -> None:
        super().__init__()
        self.restore = bool(restore)
        if not isinstance(controller, self._controller_type):
            raise TypeError(
                f"controller must be a mbn_ref.schedules.{self._controller_type.__name__}, "
                f"got {controller!r}"
            )
        if decay not in ("lam", "momentum"):
            raise ValueError(f"decay must be 'lam' or 'momentum', got {decay!r}")
        self.controller = controller
        self.decay = decay
        self.state = self.controller.init()

    def _apply(self, state: Any) -> None:
        self._assign({self.decay: state.decay})
        self.state = state

    def on_train_begin(self, logs: Any = None) -> None:
        """Attach (restore the state the model carries) and apply the controller's decay."""
        self._attach()
        self._apply(self.state)

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (its ``state_to_dict``: JSON-compatible)."""
        state: dict[str, Any] = self.controller.state_to_dict(self.state)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the controller's ``state_from_dict``: strict)."""
        self.state = self.controller.state_from_dict(state)


class MomentumOnPlateau(_ControllerCallback):
    """Drive one decay with :class:`mbn_ref.schedules.PlateauController` on a logged metric.

    Keras' ``ReduceLROnPlateau`` for a decay: at the start of training the controller's
    current decay is applied; at the end of every epoch the controller observes
    ``logs[monitor]`` (e.g. ``val_loss``; its ``mode`` says whether lower or higher is
    better) and its new decay is applied at once, for the next epoch.

    Parameters
    ----------
    controller : PlateauController, optional
        The controller (its settings: steps, bounds, mode); default ``PlateauController()``.
    monitor : str, optional
        The key of the epoch's logs to observe.
    decay : {"lam", "momentum"}, optional
        Which decay it drives: ``lam`` of every ``MomentumBatchNormalization``, or the
        inference decay (``momentum``) of every layer of ours.
    restore : bool, optional
        At the start of its first ``fit``, load the state that the model carries for this
        kind of callback (a model saved with one and loaded); ``False`` starts afresh.

    Raises
    ------
    ValueError
        At an epoch's end, ``monitor`` is not in the logs (nothing changes).

    Examples
    --------
    >>> from mbn_ref.schedules import PlateauController
    >>> cb = MomentumOnPlateau(PlateauController(initial=0.9), monitor="val_loss")
    >>> cb.state_dict()
    {'decay': 0.9, 'best': None}
    """

    _controller_type = PlateauController

    def __init__(
        self,
        controller: PlateauController | None = None,
        *,
        monitor: str = "val_loss",
        decay: Target = "momentum",
        restore: bool = True,
    ) -> None:
        super().__init__(PlateauController() if controller is None else controller, decay, restore)
        self.monitor = str(monitor)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        """Observe ``logs[monitor]`` and apply the controller's new decay."""
        logs = logs or {}
        if self.monitor not in logs:
            raise ValueError(
                f"MomentumOnPlateau monitors {self.monitor!r}, which is not in the epoch's "
                f"logs {sorted(logs)} (pass validation_data to fit for 'val_*' metrics)"
            )
        self._apply(self.controller.update(self.state, float(logs[self.monitor])))


class _Record:
    """Holds the gradient record variable (a plain object: Keras does not track it)."""

    def __init__(self) -> None:
        self.variable: Any = None


@keras.saving.register_keras_serializable(package="mbn_tf")
class GradientRecordingModel(keras.Model):  # type: ignore[misc]
    """A Keras model whose train step keeps its gradient for :class:`MomentumFromGradientNoise`.

    Keras' train step hands the gradients to the optimizer and nowhere else, so a callback
    cannot see them. This model's ``train_step`` (TensorFlow backend) is Keras' own
    (forward, ``compute_loss``, the optimizer's loss scaling, ``optimizer.apply``, the
    metrics) plus one assignment: the flattened gradient, concatenated over
    ``trainable_weights``, goes into a non-trainable float32 variable on the device once
    :class:`MomentumFromGradientNoise` has created it (before that, the step records
    nothing). Use it as the functional ``keras.Model``, ``GradientRecordingModel(inputs,
    outputs)``, or as the base class of a subclassed model.

    Examples
    --------
    >>> import keras
    >>> inputs = keras.Input((3,))
    >>> model = GradientRecordingModel(inputs, keras.layers.Dense(2)(inputs))
    >>> model.recorded_gradient() is None              # nothing recorded yet
    True
    """

    def _gradient_record(self) -> _Record:
        record = self.__dict__.get("_mbn_record")
        if record is None:
            record = _Record()
            object.__setattr__(self, "_mbn_record", record)
        return record

    def recorded_gradient(self) -> Any:
        """The last training step's flat gradient (a float32 tensor), or ``None``."""
        import tensorflow as tf

        variable = self._gradient_record().variable
        return None if variable is None else tf.convert_to_tensor(variable)

    def train_step(self, data: Any) -> Any:
        """Keras' train step, recording the gradient (TensorFlow backend)."""
        import tensorflow as tf

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            scaled = self.optimizer.scale_loss(loss) if self.optimizer is not None else loss
        weights = self.trainable_weights
        gradients = tape.gradient(scaled, weights)
        self.optimizer.apply(gradients, weights)
        variable = self._gradient_record().variable
        if variable is not None:
            variable.assign(
                tf.concat(
                    [
                        tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float32), [-1])
                        for g in gradients
                    ],
                    0,
                )
            )
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _device_array(tensor: Any) -> Any:
    """A TensorFlow tensor as an Array API array on its device, without a copy (DLPack).

    A CPU tensor is viewed as a NumPy array (CPU memory is the host's); a GPU tensor as a
    PyTorch or JAX array on that GPU, whichever is installed. The controller reads only
    scalars of it on the host.
    """
    import numpy as np

    device = str(getattr(tensor, "device", "")).upper()
    if "GPU" not in device:
        return np.from_dlpack(tensor)
    try:
        import torch

        return torch.utils.dlpack.from_dlpack(tensor)
    except ImportError:
        import jax.numpy as jnp

        return jnp.from_dlpack(tensor)


class MomentumFromGradientNoise(_ControllerCallback):
    """Drive one decay with :class:`mbn_ref.schedules.GradientNoiseController` during ``fit``.

    After every training batch the controller folds in that step's gradient and the new
    decay is assigned at once, for the next batch. The gradient stays on the device: a
    :class:`GradientRecordingModel` writes it into a float32 variable inside the compiled
    step; the callback hands that variable's tensor to the controller through DLPack (a
    NumPy view on the CPU, a PyTorch/JAX array on a GPU), and the controller keeps its
    per-coordinate moments there and reads a few scalars per step on the host.

    Parameters
    ----------
    controller : GradientNoiseController
        The controller (``batch_size``: examples per gradient, the global batch).
    decay : {"lam", "momentum"}, optional
        Which decay it drives (default: ``lam`` of every ``MomentumBatchNormalization``).
    restore : bool, optional
        At the start of its first ``fit``, load the state that the model carries for this
        kind of callback (a model saved with one and loaded); ``False`` starts afresh.

    Raises
    ------
    TypeError
        The model is not a :class:`GradientRecordingModel` (at the start of ``fit``).

    Notes
    -----
    The first ``fit`` with this callback creates the record variable; a train step traced
    before it (an earlier ``fit`` without the callback) is rebuilt once. The state
    (:meth:`state_dict`) holds the moments as lists: JSON, but a copy to the host, at save
    time only.

    Examples
    --------
    >>> from mbn_ref.schedules import GradientNoiseController
    >>> cb = MomentumFromGradientNoise(GradientNoiseController(batch_size=8, initial=0.5))
    >>> cb.state_dict()["decay"], cb.state_dict()["num_updates"]
    (0.5, 0)
    """

    _controller_type = GradientNoiseController

    def __init__(
        self, controller: GradientNoiseController, *, decay: Target = "lam", restore: bool = True
    ) -> None:
        super().__init__(controller, decay, restore)

    def on_train_begin(self, logs: Any = None) -> None:
        """Attach (as the other callbacks), create the gradient record, apply the decay."""
        import tensorflow as tf

        model = self.model
        if not isinstance(model, GradientRecordingModel):
            raise TypeError(
                "MomentumFromGradientNoise reads the gradients that a "
                "mbn_tf.GradientRecordingModel records; build the model as "
                f"GradientRecordingModel(inputs, outputs), not {type(model).__name__}"
            )
        super().on_train_begin(logs)
        record = model._gradient_record()
        size = sum(int(w.numpy().size) for w in model.trainable_weights)
        if record.variable is None or int(record.variable.shape[0]) != size:
            record.variable = tf.Variable(tf.zeros([size], tf.float32), trainable=False)
            model.train_function = None
            model.make_train_function(force=True)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        """Fold in the step's gradient and apply the controller's new decay."""
        assert isinstance(self.model, GradientRecordingModel)
        gradient = self.model.recorded_gradient()
        self._apply(self.controller.update(self.state, _device_array(gradient)))
