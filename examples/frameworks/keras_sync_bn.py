"""Keras 3's ``BatchNormalization(synchronized=True)`` under ``MirroredStrategy`` in the suite.

Run it with ``mbn-ref conformance --impl examples.frameworks.keras_sync_bn:make``.

**Setup it needs.** Importing the module splits the host CPU into :data:`DEVICES` logical
devices with ``tf.config.set_logical_device_configuration``, which TensorFlow accepts only
before it initializes its devices: import this module before anything runs a TensorFlow op
(``--impl`` does; in a process that already used TensorFlow with fewer devices the import
raises ``RuntimeError``, so run it in a fresh process, as ``tests/test_frameworks.py`` and
``examples/frameworks/findings.py`` do). The number of logical devices bounds the number of
shards of a synchronized step (the golden cases have up to 4, some of them empty; the
``sync_shard_equivalence`` property up to 5).

**How a step runs.** Single-device steps (``train_step``, ``backward``, ``eval_step``) call
a ``synchronized=True`` layer eagerly, outside any strategy, exactly as
:mod:`examples.frameworks.keras_bn` does (and as a user who sets ``synchronized=True``
without a strategy gets). A synchronized step goes to a layer built under one
``tf.distribute.MirroredStrategy`` over all the logical devices: the adapter copies the
state's moving statistics, ``gamma`` and ``beta`` into it, hands replica ``i`` shard ``i``
(``experimental_distribute_values_from_function``; empty shards included, and empty ones to
the replicas beyond the last shard: one strategy serves every shard count, because
strategies over different device subsets collide on TensorFlow's collective group keys) and
runs forward, tape and gradient in one ``strategy.run``, because a gradient through the
all-reduce cannot leave the replica context: this is
:class:`~mbn_conformance.protocol.FusedSyncAdapter`'s ``sync_step``. ``dgamma``/``dbeta``
are the replicas' gradients summed; the moving statistics are copied back into the state.
An empty replica adds exact zeros to every all-reduced sum, so the padding changes no bit.

What it declares: as ``keras_bn`` (biased moving variance, momentum a decay, every layout,
float16/32/64, no counter, refuses nothing), plus the ``sync`` algorithm.

Known failures, found by the suite and read in the installed Keras source
(:data:`KNOWN_FAILURES`):

- **Raw moments.** ``keras/src/layers/normalization/batch_normalization.py``,
  ``BatchNormalization._moments``, calls ``ops.moments(..., synchronized=True)``; on
  TensorFlow that is ``keras/src/backend/tensorflow/nn.py``, ``moments`` ->
  ``_compute_moments_sync``, which all-reduces ``sum(x)``, ``sum(x**2)`` and the count and
  computes ``variance = tf.maximum(E[x^2] - E[x]^2, 0.0)``. On float32 data with a mean of
  ``1e4`` and unit spread, ``E[x^2]`` is ``1e8``, whose float32 spacing is 8: the variance
  (about 1) is lost entirely, clamped to 0 or made up of rounding, and with ``eps = 1e-5``
  the golden offset cases get ``y`` off by up to about ``1e3`` and ``dx`` by up to ``4e7``.
  In float64 about half the digits of the variance remain (``y`` off by ``1e-8`` to
  ``1e-7``, beyond the float64 tolerance). It runs **even on one device**: outside a
  strategy ``tf.distribute.get_replica_context()`` returns the default replica context, so
  ``_compute_moments_sync`` takes the same path with an identity all-reduce (the
  single-device offset cases fail too). The offset examples of the properties
  ``bn_affine_invariance`` and ``bn_normalized_moments`` fail for the same reason.
- **An empty batch moves the moving statistics.** ``_compute_moments_sync`` divides with
  ``tf.math.divide_no_nan``, so zero elements give mean 0 and variance 0, and
  ``BatchNormalization.call`` updates ``moving_mean``/``moving_variance`` on every training
  call: both decay toward 0 by the momentum (the ``N0`` case).

Where the data are near 0 (every other case, empty shards included) the synchronized
statistics are right: the merge weights each shard by its count.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf

DEVICES = 8
"""Logical CPU devices the module asks for: the most shards a synchronized step can have."""


def configure_devices(count: int = DEVICES) -> int:
    """Split the first physical CPU into ``count`` logical devices; the number available.

    Parameters
    ----------
    count : int
        Logical devices wanted.

    Returns
    -------
    int
        The number of logical CPU devices TensorFlow now has.

    Raises
    ------
    RuntimeError
        When TensorFlow has already initialized its devices with fewer than ``count``
        (``set_logical_device_configuration`` must come first: use a fresh process).
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as exc:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < count:
            raise RuntimeError(
                f"keras_sync_bn needs {count} logical CPU devices but TensorFlow was "
                f"initialized with {have}: import examples.frameworks.keras_sync_bn before "
                "any TensorFlow op runs (a fresh process)"
            ) from exc
    return len(tf.config.list_logical_devices("CPU"))


configure_devices()

from collections.abc import Sequence  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402

from examples.frameworks.keras_bn import (  # noqa: E402
    KerasBatchNorm,
    KerasState,
    build_layer,
    configure,
    trainable,
)
from mbn_conformance.protocol import Setup, Step  # noqa: E402

_RAW_MOMENTS = (
    "variance as E[x^2] - E[x]^2 in _compute_moments_sync (keras/src/backend/tensorflow/nn.py), "
    "taken even on one device (the default replica context): data at 1e4 lose the variance "
    "(all of it in float32, half its digits in float64)"
)

KNOWN_FAILURES: dict[str, str] = {
    "*/N0/*": "an empty batch moves moving_mean/moving_variance toward 0: "
    "_compute_moments_sync (keras/src/backend/tensorflow/nn.py) returns mean 0 and "
    "variance 0 for zero elements (tf.math.divide_no_nan) and BatchNormalization.call "
    "(keras/src/layers/normalization/batch_normalization.py) updates them on every "
    "training call",
    "*/offset": _RAW_MOMENTS,
    "property/bn_affine_invariance": _RAW_MOMENTS + "; the property shifts x by up to 1e4",
    "property/bn_normalized_moments": _RAW_MOMENTS + "; the property draws offset batches",
}
"""The synchronized layer's known failures: check-id patterns and their reasons."""


class KerasSyncBatchNorm(KerasBatchNorm):
    """A fused-sync conformance adapter for ``BatchNormalization(synchronized=True)``.

    See the module docstring. The strategy is built once; a mirrored layer is built once per
    layer geometry and reused.
    """

    name = (
        f"keras.layers.BatchNormalization(synchronized=True) under MirroredStrategy "
        f"(keras {keras.__version__}, tf {tf.__version__})"
    )

    def __init__(self) -> None:
        super().__init__(synchronized=True)
        caps = self.capabilities
        self.capabilities = replace(
            caps, algorithms=caps.algorithms | {"sync"}, known_failures=KNOWN_FAILURES
        )
        self.devices = len(tf.config.list_logical_devices("CPU"))
        self.strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(self.devices)])
        self._layers: dict[Setup, keras.layers.BatchNormalization] = {}

    def mirrored_layer(self, setup: Setup) -> keras.layers.BatchNormalization:
        """A ``synchronized=True`` layer built under the strategy, for ``setup``'s geometry."""
        key = replace(setup, shape=(0, *setup.shape[1:]))
        if key not in self._layers:
            with self.strategy.scope():
                self._layers[key] = build_layer(setup, synchronized=True)
        return self._layers[key]

    def sync_step(
        self,
        step: Step,
        state: KerasState,
        shards: Sequence[Any],
        gamma: Any,
        beta: Any,
        dys: Sequence[Any] | None,
    ) -> tuple[list[Any], KerasState, list[Any] | None, Any, Any]:
        """One synchronized training step: forward, tape and gradient in one ``strategy.run``.

        Parameters
        ----------
        step : Step
            The step (a training step with a decay).
        state : KerasState
            The state; its moving statistics are updated in place.
        shards : sequence of tf.Tensor
            One input per replica (empty ones included), at most :data:`DEVICES`.
        gamma, beta : tf.Tensor or None
            The affine parameters.
        dys : sequence of tf.Tensor or None
            The upstream gradients per shard, or ``None`` for no backward.

        Returns
        -------
        tuple
            ``(ys, state, dxs, dgamma, dbeta)``; the last three ``None`` without ``dys``.
        """
        if len(shards) > self.devices:
            raise ValueError(
                f"{len(shards)} shards but only {self.devices} logical CPU devices "
                f"(keras_sync_bn.DEVICES = {DEVICES})"
            )
        n = len(shards)
        strategy = self.strategy
        layer = self.mirrored_layer(state.setup)
        configure(layer, step, gamma, beta)
        layer.moving_mean.assign(state.layer.moving_mean.value)
        layer.moving_variance.assign(state.layer.moving_variance.value)
        xs = strategy.experimental_distribute_values_from_function(
            lambda ctx: _padded(shards, self.devices)[ctx.replica_id_in_sync_group]
        )
        upstream = None
        if dys is not None:
            padded_dys = _padded(dys, self.devices)
            upstream = strategy.experimental_distribute_values_from_function(
                lambda ctx: padded_dys[ctx.replica_id_in_sync_group]
            )

        def replica(x: tf.Tensor, dy: tf.Tensor | None) -> tuple[Any, ...]:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            if dy is None:
                return (y,)
            grads = tape.gradient(y, [x, *trainable(layer)], output_gradients=tf.cast(dy, y.dtype))
            return (y, *grads)

        out = strategy.run(replica, args=(xs, upstream))
        local = [list(strategy.experimental_local_results(o)) for o in out]
        state.layer.moving_mean.assign(layer.moving_mean.value.read_value())
        state.layer.moving_variance.assign(layer.moving_variance.value.read_value())
        ys = local[0][:n]
        if dys is None:
            return ys, state, None, None, None
        dxs = local[1][:n]
        if len(local) == 2:
            return ys, state, dxs, None, None
        return ys, state, dxs, tf.add_n(local[2]), tf.add_n(local[3])


def _padded(shards: Sequence[Any], count: int) -> list[Any]:
    """``shards`` followed by empty tensors of their shape and dtype, ``count`` in all."""
    first = shards[0]
    empty = tf.zeros((0, *first.shape[1:]), first.dtype)
    return [*shards, *([empty] * (count - len(shards)))]


def make() -> KerasSyncBatchNorm:
    """The factory for ``--impl examples.frameworks.keras_sync_bn:make``."""
    return KerasSyncBatchNorm()
