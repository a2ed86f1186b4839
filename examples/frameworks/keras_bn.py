"""Keras 3's own ``keras.layers.BatchNormalization`` (TensorFlow backend) through the suite.

Run it with ``mbn-ref conformance --impl examples.frameworks.keras_bn:make``. The adapter
drives a real layer: the state is the layer itself (its ``moving_mean`` and
``moving_variance`` variables), each step sets the layer's ``momentum`` and ``epsilon`` and
calls it eagerly, and the gradients come from ``tf.GradientTape``. Importing the module sets
``KERAS_BACKEND=tensorflow`` unless the environment already names a backend (it must be
``tensorflow``).

**Momentum.** Keras' ``momentum`` is a decay (``moving = moving * momentum + batch * (1 -
momentum)``), held as a Python float: ``BatchNormalization.call`` reads ``self.momentum``
and ``self.epsilon`` at every call. The adapter sets them on the layer before each step,
which works because it calls the layer eagerly. Inside a ``tf.function`` the floats are
baked into the trace at its first call (tried: a traced call keeps decaying by 0.9 after
``layer.momentum = 0.5``), so a changing decay there needs a layer, or a trace, per value.

What it declares, and why:

- ``running_var="biased"``: ``moving_variance`` is updated with ``tf.nn.moments``' biased
  variance; ``native_momentum="decay"``.
- every layout: ``axis=1`` for ``NC`` to ``NCDHW`` and ``axis=-1`` for channels-last
  ``NHWC`` (Keras' default); affine parameters optional (``center=False, scale=False``).
- dtypes float16, float32, float64. float64 runs a layer of ``dtype="float64"``; float16
  runs the ``mixed_float16`` policy (float32 variables, float16 outputs), the policy Keras
  recommends for half precision; ``call`` computes in ``result_type(inputs, "float32")``.
- ``batch_counter=False`` (Keras counts nothing, so there is no cumulative average: the
  ``cumulative`` cases are skipped), no MBN, no synchronized statistics (see
  ``keras_sync_bn.py``).
- ``refuses`` nothing: Keras checks neither ``momentum`` nor ``epsilon``, and a batch of one
  value per channel normalizes to ``beta`` (variance 0).

Known failures (found by the suite; the reasons are in :data:`KNOWN_FAILURES`):

- **An empty batch makes the moving statistics NaN.**
  ``keras/src/layers/normalization/batch_normalization.py``, ``BatchNormalization.call``,
  updates ``moving_mean``/``moving_variance`` on every training call with the moments of
  ``_moments``, which is ``keras.ops.moments``, on TensorFlow
  ``keras/src/backend/tensorflow/nn.py``, ``moments`` -> ``_compute_moments`` ->
  ``tf.nn.moments``: the mean of zero elements is ``0/0 = NaN``, so ``dgamma``, every later
  step and the evaluation output are NaN.

Offset data are fine: ``tf.nn.moments`` (``tensorflow/python/ops/nn_impl.py``) takes the
variance as the mean of ``squared_difference(x, stop_gradient(mean))``, two passes, so the
float32 offset cases pass (compare ``keras_sync_bn``).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mbn_conformance.protocol import Capabilities, Setup, Step

if keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on the environment
    raise ImportError(
        f"keras_bn needs Keras' TensorFlow backend; KERAS_BACKEND={keras.backend.backend()!r}"
    )

POLICIES: dict[str, str] = {
    "float16": "mixed_float16",
    "float32": "float32",
    "float64": "float64",
}
"""The Keras dtype policy a layer runs under, per input dtype."""

KNOWN_FAILURES: dict[str, str] = {
    "*/N0/*": "an empty batch makes moving_mean/moving_variance (and dgamma) NaN: "
    "BatchNormalization.call (keras/src/layers/normalization/batch_normalization.py) "
    "updates them on every training call with tf.nn.moments' mean of zero elements "
    "(keras/src/backend/tensorflow/nn.py, moments -> _compute_moments)",
}
"""The plain layer's known failures: check-id patterns and their reasons."""


@dataclass
class KerasState:
    """A Keras layer under test and the layer geometry it was built for.

    Attributes
    ----------
    layer : keras.layers.BatchNormalization
        The built layer; its ``moving_mean`` and ``moving_variance`` are the state.
    setup : Setup
        The geometry the suite announced.
    """

    layer: keras.layers.BatchNormalization
    setup: Setup


@dataclass
class KerasContext:
    """What :meth:`KerasBatchNorm.backward` needs of a training step.

    Attributes
    ----------
    tape : tf.GradientTape
        The tape that recorded the forward.
    x, y : tf.Tensor
        The input (watched) and the output.
    layer : keras.layers.BatchNormalization
        The layer, for its ``gamma`` and ``beta``.
    """

    tape: tf.GradientTape
    x: tf.Tensor
    y: tf.Tensor
    layer: keras.layers.BatchNormalization


def build_layer(setup: Setup, *, synchronized: bool = False) -> keras.layers.BatchNormalization:
    """A built ``BatchNormalization`` for ``setup``: its axis, dtype policy and affinity.

    Parameters
    ----------
    setup : Setup
        The layer's geometry.
    synchronized : bool
        Keras' ``synchronized`` argument.

    Returns
    -------
    keras.layers.BatchNormalization
        Built for inputs of ``setup.shape`` (any batch size).
    """
    layer = keras.layers.BatchNormalization(
        axis=setup.axis,
        center=setup.affine,
        scale=setup.affine,
        synchronized=synchronized,
        dtype=POLICIES[setup.dtype],
    )
    layer.build((None, *setup.shape[1:]))
    return layer


def configure(layer: keras.layers.BatchNormalization, step: Step, gamma: Any, beta: Any) -> None:
    """Set the layer's ``momentum`` (a decay), ``epsilon`` and affine parameters for ``step``.

    Parameters
    ----------
    layer : keras.layers.BatchNormalization
        The layer, called eagerly afterwards (the floats are read at call time).
    step : Step
        The step; its ``decay`` must not be ``None`` (Keras has no cumulative average).
    gamma, beta : tf.Tensor or None
        The affine parameters, cast to the variables' dtype.
    """
    if step.decay is None:
        raise ValueError("Keras' BatchNormalization has no cumulative average (decay=None)")
    layer.momentum = float(step.decay)
    layer.epsilon = float(step.eps)
    if gamma is not None:
        layer.gamma.assign(tf.cast(gamma, layer.gamma.dtype))
        layer.beta.assign(tf.cast(beta, layer.beta.dtype))


def trainable(layer: keras.layers.BatchNormalization) -> list[Any]:
    """``[gamma, beta]`` as the TensorFlow variables a tape differentiates (empty if none)."""
    if not layer.scale:
        return []
    return [layer.gamma.value, layer.beta.value]


class KerasBatchNorm:
    """A conformance adapter for ``keras.layers.BatchNormalization`` (see the module docstring).

    Parameters
    ----------
    synchronized : bool
        Build layers with ``synchronized=True`` (``keras_sync_bn`` uses it).
    """

    name = f"keras.layers.BatchNormalization (keras {keras.__version__}, tf {tf.__version__})"

    def __init__(self, *, synchronized: bool = False) -> None:
        self.synchronized = synchronized
        self.capabilities = Capabilities(
            dtypes=frozenset(POLICIES),
            layouts=frozenset({"NC", "NCL", "NCHW", "NCDHW", "NHWC"}),
            algorithms=frozenset({"bn", "dynamic_bn"}),
            running_var="biased",
            native_momentum="decay",
            batch_counter=False,
            version=keras.__version__,
            known_failures=KNOWN_FAILURES,
        )

    def from_numpy(self, a: np.ndarray) -> tf.Tensor:
        """``a`` as a ``tf.Tensor`` of the same dtype."""
        return tf.constant(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        """A tensor (or variable) as a NumPy array."""
        return np.asarray(a.numpy())

    def init_state(self, setup: Setup) -> KerasState:
        """A layer built for ``setup`` (Keras' initial moving statistics, 0 and 1)."""
        return KerasState(build_layer(setup, synchronized=self.synchronized), setup)

    def load_state(self, state: KerasState, values: Mapping[str, np.ndarray]) -> KerasState:
        """The layer with ``moving_mean``/``moving_variance`` set to ``values``."""
        layer = state.layer
        layer.moving_mean.assign(np.asarray(values["running_mean"], layer.moving_mean.dtype))
        layer.moving_variance.assign(np.asarray(values["running_var"], layer.moving_variance.dtype))
        return state

    def state_to_numpy(self, state: KerasState) -> dict[str, np.ndarray]:
        """The moving statistics under the canonical keys (no counter)."""
        layer = state.layer
        return {
            "running_mean": self.to_numpy(layer.moving_mean),
            "running_var": self.to_numpy(layer.moving_variance),
        }

    def train_step(
        self, step: Step, state: KerasState, x: Any, gamma: Any, beta: Any
    ) -> tuple[Any, KerasState, KerasContext]:
        """One eager training call under a tape; the moving statistics update in place."""
        layer = state.layer
        configure(layer, step, gamma, beta)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return y, state, KerasContext(tape, x, y, layer)

    def eval_step(self, step: Step, state: KerasState, x: Any, gamma: Any, beta: Any) -> Any:
        """One eager call with ``training=False`` (normalizes with the moving statistics)."""
        layer = state.layer
        if gamma is not None:
            layer.gamma.assign(tf.cast(gamma, layer.gamma.dtype))
            layer.beta.assign(tf.cast(beta, layer.beta.dtype))
        layer.epsilon = float(step.eps)
        return layer(x, training=False)

    def backward(self, ctx: KerasContext, dy: Any) -> tuple[Any, Any, Any]:
        """``(dx, dgamma, dbeta)`` from the step's tape, for the upstream gradient ``dy``."""
        grads = ctx.tape.gradient(
            ctx.y, [ctx.x, *trainable(ctx.layer)], output_gradients=tf.cast(dy, ctx.y.dtype)
        )
        if len(grads) == 1:
            return grads[0], None, None
        return grads[0], grads[1], grads[2]


def make() -> KerasBatchNorm:
    """The factory for ``--impl examples.frameworks.keras_bn:make``."""
    return KerasBatchNorm()
