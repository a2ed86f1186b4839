"""Keras 3 layers whose decays are non-trainable variables, on the core's math.

- :class:`MomentumBatchNormalization`: momentum batch normalization (MBN, the paper's
  Algorithm 1); ``lam = 0`` is ``keras.layers.BatchNormalization``.
- :class:`DynamicBatchNormalization`: ``keras.layers.BatchNormalization`` whose
  ``momentum`` is a variable, so a schedule can move it without retracing.

Keras' conventions: ``momentum`` is the **decay** (weight on history) of the inference
statistics ``moving_mean``/``moving_variance`` (biased variance, as Keras keeps it); ``lam``
is the paper's training decay. Both decays live in 0-d non-trainable variables
(``inference_decay``, ``lam``) that a compiled ``tf.function`` or ``model.fit`` reads at
run time: assigning them never retraces (docs/keras.md).

>>> import numpy as np
>>> import keras
>>> import mbn_tf
>>> layer = mbn_tf.MomentumBatchNormalization(lam=0.5, momentum=0.9)
>>> y = layer(np.arange(6.0, dtype="float32").reshape(3, 2), training=True)
>>> [w.name for w in layer.weights]  # doctest: +NORMALIZE_WHITESPACE
['gamma', 'beta', 'lam', 'inference_decay', 'moving_mean', 'moving_variance',
 'moving_train_mean', 'moving_train_variance']
>>> layer.moving_train_mean.numpy().tolist()   # 0.5*0 + 0.5*batch mean
[1.0, 1.5]
>>> layer.lam = 0.75                           # assigns the variable
>>> float(layer.lam.numpy()), layer.momentum
(0.75, 0.9)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import constraints, initializers, regularizers

import mbn_ref as mr
from mbn_ref import conventions
from mbn_ref._validate import check_positive
from mbn_ref.context import NormContext
from mbn_ref.distributed import AllSum

from . import _backends

__all__ = ["DynamicBatchNormalization", "MomentumBatchNormalization"]

Array = Any


def _clone_initializer(initializer: Any) -> Any:
    """A fresh copy of an initializer object (Keras' own ``_clone_initializer``)."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


def _checked_decay(name: str, value: Any) -> float:
    """A decay argument as a ``float``, by the core's rule, with a Keras-style message."""
    try:
        return conventions.validate_decay(value, name)
    except (TypeError, ValueError) as err:
        raise type(err)(
            f"Argument `{name}` must be a decay (weight on history) in [0, 1]. "
            f"Received: {name}={value!r} ({err})"
        ) from None


def _host_value(variable: Any) -> float:
    """A 0-d variable's value as the shortest decimal that round-trips its dtype.

    A float32 decay holding 0.9 reads ``0.9``, not ``0.8999999761581421``, so
    ``get_config`` gives back what the user wrote.
    """
    return float(str(variable.numpy()))


def _count_at_run_time(x: Any, axis: int) -> Any:
    """``x`` (a TensorFlow tensor) with its first non-channel dimension unknown in a graph.

    Under ``all_sum`` the core reads the global count on the host when the local one is a
    Python integer (eagerly: one read per step, as PyTorch's ``SyncBatchNorm``); inside a
    ``tf.function`` there is no host value, so the local count must be an array, which the
    core computes from a tensor whose static shape has a ``None`` (docs/spec.md §9.2).
    ``placeholder_with_default`` forgets the static size without copying. Eagerly ``x``
    is returned as it is. It runs inside the custom gradient, whose backward gives ``dx``.
    """
    import tensorflow as tf

    if tf.executing_eagerly():
        return x
    ndim = len(x.shape)
    channel = axis % ndim
    forget = 1 if channel == 0 and ndim > 1 else 0
    shape = [None if i == forget else size for i, size in enumerate(x.shape)]
    return tf.compat.v1.placeholder_with_default(x, shape)


class _ScheduleState:
    """The callbacks' state that a model carries in its ``.keras`` file.

    ``saved`` is what the file held when the model was loaded; ``providers`` the
    ``state_dict`` methods of the callbacks attached since (:mod:`mbn_tf.callbacks`), asked
    at save time, so a file always holds the state of the moment it was written, and the
    gradient-noise controller's moments are copied to the host only then. A plain object:
    Keras does not track it.
    """

    FILE = "schedule_state.json"

    def __init__(self) -> None:
        self.saved: dict[str, Any] = {}
        self.providers: dict[str, Callable[[], Any]] = {}

    def current(self) -> dict[str, Any]:
        return {**self.saved, **{key: state() for key, state in self.providers.items()}}


class _DecayNormalization(keras.layers.Layer):  # type: ignore[misc]
    """What both layers share: Keras BN's weights and arguments, the variable ``momentum``.

    Subclasses add their state (``_build_extra_state``, ``_state_variables``), list their
    decays (``_decay_variables``) and call the core in :meth:`_forward`.
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        synchronized: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"Argument `axis` must be an integer. Received: axis={axis!r}")
        self.axis = axis
        momentum = _checked_decay("momentum", momentum)
        try:
            self.epsilon = check_positive("epsilon", epsilon)
        except (TypeError, ValueError) as err:
            raise type(err)(
                f"Argument `epsilon` must be a finite number > 0. Received: epsilon={epsilon!r}"
            ) from None
        if synchronized and keras.backend.backend() != "tensorflow":
            raise ValueError(
                "Argument synchronized=True is only supported with the TensorFlow backend."
            )
        self.synchronized = bool(synchronized)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = True
        self._backend = keras.backend.backend()
        self._xp = _backends.namespace(self._backend)
        self._create_decays(momentum)
        self.gamma: Any = None
        self.beta: Any = None
        self.moving_mean: Any = None
        self.moving_variance: Any = None
        self._schedule = _ScheduleState()

    # -- decays ---------------------------------------------------------------------------
    def _create_decays(self, momentum: float) -> None:
        self.inference_decay = self._decay_variable("inference_decay", momentum)

    def _decay_variable(self, name: str, value: float) -> Any:
        """A 0-d non-trainable variable holding a decay (read at run time by the graph).

        Under a ``tf.distribute`` strategy it is a mirrored variable that a replica may
        assign (``aggregation="only_first_replica"``: every replica holds the same decay).
        """
        variable = self.add_weight(
            shape=(),
            name=name,
            initializer="zeros",
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
        )
        # assigned, not initialized with Constant(value), which rounds through float32
        variable.assign(value)
        return variable

    @property
    def momentum(self) -> float:
        """Keras' ``momentum``: the decay of ``moving_mean``/``moving_variance``.

        Reading it reads the variable ``inference_decay`` on the host; setting it assigns
        the variable (validated: a decay in ``[0, 1]``), which a traced graph reads at its
        next run. Inside a ``tf.function``, assign a tensor to ``inference_decay`` instead.
        """
        return _host_value(self.inference_decay)

    @momentum.setter
    def momentum(self, value: float) -> None:
        self.inference_decay.assign(_checked_decay("momentum", value))

    # -- building ---------------------------------------------------------------------------
    def build(self, input_shape: Sequence[int | None]) -> None:
        """Create ``gamma``, ``beta`` and the statistics for ``input_shape``'s channels."""
        ndim = len(input_shape)
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"Axis {self.axis} is out of bounds for input shape {tuple(input_shape)}. "
                f"Received: axis={self.axis}"
            )
        channels = input_shape[self.axis]
        if channels is None:
            raise ValueError(
                f"Axis {self.axis} of the input should have a defined dimension, but the layer "
                f"received an input with shape {tuple(input_shape)}."
            )
        shape = (channels,)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = self._statistic("moving_mean", shape, self.moving_mean_initializer)
        self.moving_variance = self._statistic(
            "moving_variance", shape, self.moving_variance_initializer
        )
        self._build_extra_state(shape)
        self.input_spec = keras.layers.InputSpec(ndim=ndim, axes={self.axis: channels})

    def _statistic(self, name: str, shape: tuple[int, ...], initializer: Any) -> Any:
        """A statistic: a non-trainable variable, mirrored under a ``tf.distribute`` strategy.

        The replicas assign it in the replica context: synchronized, they all compute the
        same global statistics, so the first replica's value is kept
        (``"only_first_replica"``, no extra collective); per replica, the replicas' values
        are averaged (``"mean"``, what Keras 2's BN did with its ``ON_READ`` statistics).
        """
        return self.add_weight(
            shape=shape,
            name=name,
            initializer=initializer,
            trainable=False,
            autocast=False,
            aggregation="only_first_replica" if self.synchronized else "mean",
        )

    def _build_extra_state(self, shape: tuple[int, ...]) -> None:
        """Subclasses add their own state variables here."""

    def compute_output_shape(self, input_shape: Any) -> Any:
        """The input's shape."""
        return input_shape

    # -- the call -----------------------------------------------------------------------------
    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        """Normalize ``inputs``; in training (``training=True`` and ``trainable``) update the state.

        ``training=None`` and a frozen layer (``trainable=False``) mean inference, as in
        Keras' ``BatchNormalization``.
        """
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if not keras.backend.is_float_dtype(dtype):
            raise TypeError(
                f'Layer "{self.name}" expects a floating-point input, but received an input '
                f"of dtype {dtype} with shape {tuple(inputs.shape)}; cast it first, e.g. "
                f'keras.ops.cast(x, "float32")'
            )
        training = bool(training) and self.trainable
        if training and mask is not None:
            raise NotImplementedError(
                f'Layer "{self.name}" does not compute masked batch statistics; '
                "call it without a mask in training"
            )
        # the state enters the core in its compute dtype (float32 for half-precision inputs,
        # as Keras' BN does) and goes back into the variables in their own dtype:
        # TensorFlow does not promote float16 state against float32 statistics
        stats_dtype = "float32" if dtype in ("float16", "bfloat16") else dtype
        state_variables = self._state_variables()
        consts = [
            keras.ops.cast(v, stats_dtype) for v in [*state_variables, *self._decay_variables()]
        ]
        gamma = None if self.gamma is None else keras.ops.convert_to_tensor(self.gamma)
        beta = None if self.beta is None else keras.ops.convert_to_tensor(self.beta)
        n_state = len(state_variables)
        all_sum = self._all_sum() if training else None

        def forward(
            x: Array, gamma: Array | None, beta: Array | None, consts: Sequence[Array]
        ) -> tuple[Array, tuple[Array, ...], NormContext]:
            if all_sum is not None:
                x = _count_at_run_time(x, self.axis)
            return self._forward(
                x,
                gamma,
                beta,
                consts[:n_state],
                consts[n_state:],
                training=training,
                all_sum=all_sum,
            )

        y, new_state = _backends.differentiable(
            forward, inputs, gamma, beta, consts, backend=self._backend
        )
        if training:
            for variable, value in zip(state_variables, new_state, strict=True):
                variable.assign(keras.ops.cast(value, variable.dtype))
        return y

    def _all_sum(self) -> AllSum | None:
        """The collective of synchronized statistics for the core's ``all_sum``.

        With ``synchronized=True``, inside a ``tf.distribute`` replica context with more
        than one replica: the replica context's ``all_reduce(SUM, ...)``, which the core
        uses for the global moments (Chan's merge: sums, then squared deviations from the
        global mean, ``mbn_ref._kernels.batch_moments``) and, through the backward
        context, for the two per-channel sums of the gradient. Otherwise ``None``:
        statistics of the replica's own batch (``synchronized=False``, no strategy, or
        one replica).
        """
        if not self.synchronized:
            return None
        import tensorflow as tf

        replica = tf.distribute.get_replica_context()
        if replica is None or replica.num_replicas_in_sync == 1:
            return None

        def all_sum(value: Array) -> Array:
            return replica.all_reduce(tf.distribute.ReduceOp.SUM, value)

        return all_sum

    def _counter(self) -> Array:
        """A 0-d integer for the core's ``num_batches_tracked`` (Keras counts no batches)."""
        return self._xp.zeros((), dtype=self._xp.int32)

    def _state_variables(self) -> list[Any]:
        raise NotImplementedError

    def _decay_variables(self) -> list[Any]:
        raise NotImplementedError

    def _forward(
        self,
        x: Array,
        gamma: Array | None,
        beta: Array | None,
        state: Sequence[Array],
        decays: Sequence[Array],
        *,
        training: bool,
        all_sum: AllSum | None = None,
    ) -> tuple[Array, tuple[Array, ...], NormContext]:
        raise NotImplementedError

    # -- the callbacks' state, saved with the model -------------------------------------------
    def save_assets(self, dir_path: str) -> None:
        """Write the callbacks' state this layer carries (``model.save``, ``.keras``)."""
        state = self._schedule.current()
        if state:
            with open(os.path.join(dir_path, _ScheduleState.FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, sort_keys=True)

    def load_assets(self, dir_path: str) -> None:
        """Read the callbacks' state back (``keras.models.load_model``); JSON, safe mode."""
        path = os.path.join(dir_path, _ScheduleState.FILE)
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict):
            raise ValueError(
                f"{self.name}: {_ScheduleState.FILE} holds {type(state).__name__}, expected an "
                "object of callback states"
            )
        self._schedule.saved = state

    # -- configuration ------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """Keras BN's configuration with the current decays (``momentum``, ``lam``)."""
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
        }
        base: dict[str, Any] = super().get_config()
        return {**base, **config}


@keras.saving.register_keras_serializable(package="mbn_tf")
class DynamicBatchNormalization(_DecayNormalization):
    """``keras.layers.BatchNormalization`` whose ``momentum`` is a variable.

    The same arguments, weights and behaviour as Keras' layer (without ``renorm``), computed
    by :func:`mbn_ref.bn_forward`; the decay of ``moving_mean``/``moving_variance`` is the
    0-d non-trainable variable ``inference_decay`` that ``momentum`` reads and assigns, so a
    new value reaches a traced train step without retracing.

    Parameters
    ----------
    axis : int, optional
        The channel axis (``-1``: channels-last; ``1`` after a ``channels_first`` conv).
    momentum : float, optional
        Keras' momentum: the **decay** (weight on history) of the inference statistics, in
        ``[0, 1]`` (PyTorch's ``momentum=0.1`` is Keras' ``0.9``).
    epsilon : float, optional
        Added to the variance inside the square root; a finite number ``> 0``.
    center, scale : bool, optional
        Whether ``beta``/``gamma`` exist.
    beta_initializer, gamma_initializer, moving_mean_initializer,
    moving_variance_initializer, beta_regularizer, gamma_regularizer, beta_constraint,
    gamma_constraint
        As in ``keras.layers.BatchNormalization``.
    synchronized : bool, optional
        Synchronized statistics under ``tf.distribute`` (TensorFlow backend only): in a
        replica context, every replica normalizes with the moments of the global batch
        (the replica context's ``all_reduce`` as the core's ``all_sum``) and the backward
        sums its two per-channel vectors over the replicas too. ``False``: each replica
        uses its own batch (the statistics variables average the replicas' updates).
    **kwargs
        Base layer arguments (``name``, ``dtype``, ``trainable``).

    Examples
    --------
    >>> import numpy as np
    >>> import mbn_tf
    >>> layer = DynamicBatchNormalization(momentum=0.5)
    >>> _ = layer(np.array([[2.0], [4.0]], dtype="float32"), training=True)
    >>> layer.moving_mean.numpy().tolist()      # 0.5*0 + 0.5*3
    [1.5]
    >>> layer.momentum = 0.0                    # assigns the variable inference_decay
    >>> _ = layer(np.array([[2.0], [4.0]], dtype="float32"), training=True)
    >>> layer.moving_mean.numpy().tolist()
    [3.0]
    """

    def _state_variables(self) -> list[Any]:
        return [self.moving_mean, self.moving_variance]

    def _decay_variables(self) -> list[Any]:
        return [self.inference_decay]

    def _forward(
        self,
        x: Array,
        gamma: Array | None,
        beta: Array | None,
        state: Sequence[Array],
        decays: Sequence[Array],
        *,
        training: bool,
        all_sum: AllSum | None = None,
    ) -> tuple[Array, tuple[Array, ...], NormContext]:
        (decay,) = decays
        bn_state = mr.BNState(state[0], state[1], self._counter())
        y, new, ctx = mr.bn_forward(
            x,
            bn_state,
            gamma,
            beta,
            decay=decay,
            eps=self.epsilon,
            axis=self.axis,
            training=training,
            all_sum=all_sum,
            xp=self._xp,
        )
        assert new is not None
        return y, ((new.running_mean, new.running_var) if training else ()), ctx


@keras.saving.register_keras_serializable(package="mbn_tf")
class MomentumBatchNormalization(_DecayNormalization):
    """Momentum batch normalization (the paper's Algorithm 1) as a Keras 3 layer.

    Training normalizes with moving statistics that the batch has just updated with the
    decay ``lam`` (Eq. 8), ``moving_train_mean <- lam*moving_train_mean + (1-lam)*mu_B``
    (likewise the biased variance), and updates the inference statistics
    ``moving_mean``/``moving_variance`` with the decay ``momentum``; inference normalizes
    with the latter. ``lam = 0`` is exactly ``keras.layers.BatchNormalization``. Forward
    and backward are the core's (:func:`mbn_ref.mbn_forward`, :func:`mbn_ref.backward`,
    the corrected Eq. 13) on the active Keras backend.

    Parameters
    ----------
    axis, momentum, epsilon, center, scale, beta_initializer, gamma_initializer,
    moving_mean_initializer, moving_variance_initializer, beta_regularizer,
    gamma_regularizer, beta_constraint, gamma_constraint, synchronized
        As in :class:`DynamicBatchNormalization` (Keras' BN arguments; ``momentum`` is the
        decay of the inference statistics).
    lam : float, optional
        The paper's training decay (weight on history) in ``[0, 1]``; 0 is BN. Held in the
        0-d non-trainable variable ``lam``: the property ``layer.lam`` returns the variable,
        and ``layer.lam = v`` assigns it (validated).
    **kwargs
        Base layer arguments (``name``, ``dtype``, ``trainable``).

    Examples
    --------
    >>> import numpy as np
    >>> layer = MomentumBatchNormalization(lam=0.5, momentum=0.9, epsilon=1e-5)
    >>> x = np.array([[1.0], [3.0]], dtype="float32")     # batch mean 2, variance 1
    >>> [round(v, 3) for v in layer(x, training=True).numpy().ravel().tolist()]
    [0.0, 2.0]
    >>> float(layer.moving_train_mean.numpy()[0]), round(float(layer.moving_mean.numpy()[0]), 6)
    (1.0, 0.2)
    """

    def __init__(self, *args: Any, lam: float = 0.0, **kwargs: Any) -> None:
        self._initial_lam = _checked_decay("lam", lam)
        self.moving_train_mean: Any = None
        self.moving_train_variance: Any = None
        super().__init__(*args, **kwargs)

    def _create_decays(self, momentum: float) -> None:
        self._lam = self._decay_variable("lam", self._initial_lam)
        super()._create_decays(momentum)

    @property
    def lam(self) -> Any:
        """The training decay: the 0-d non-trainable variable named ``lam``.

        ``layer.lam.assign(t)`` takes a tensor (inside a ``tf.function``);
        ``layer.lam = v`` assigns a validated host number.
        """
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam.assign(_checked_decay("lam", value))

    def _build_extra_state(self, shape: tuple[int, ...]) -> None:
        self.moving_train_mean = self._statistic(
            "moving_train_mean", shape, _clone_initializer(self.moving_mean_initializer)
        )
        self.moving_train_variance = self._statistic(
            "moving_train_variance", shape, _clone_initializer(self.moving_variance_initializer)
        )

    def _state_variables(self) -> list[Any]:
        return [
            self.moving_train_mean,
            self.moving_train_variance,
            self.moving_mean,
            self.moving_variance,
        ]

    def _decay_variables(self) -> list[Any]:
        return [self._lam, self.inference_decay]

    def _forward(
        self,
        x: Array,
        gamma: Array | None,
        beta: Array | None,
        state: Sequence[Array],
        decays: Sequence[Array],
        *,
        training: bool,
        all_sum: AllSum | None = None,
    ) -> tuple[Array, tuple[Array, ...], NormContext]:
        lam, tau = decays
        y, new, ctx = mr.mbn_forward(
            x,
            mr.MBNState(state[0], state[1], state[2], state[3], self._counter()),
            gamma,
            beta,
            lam=lam,
            tau=tau,
            eps=self.epsilon,
            axis=self.axis,
            training=training,
            all_sum=all_sum,
            xp=self._xp,
        )
        return y, (tuple(new[:4]) if training else ()), ctx

    def get_config(self) -> dict[str, Any]:
        """Keras BN's configuration plus the current ``lam``."""
        config = super().get_config()
        config["lam"] = _host_value(self._lam)
        return config
