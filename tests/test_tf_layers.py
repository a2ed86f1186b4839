"""``mbn_tf`` layers on Keras 3: Keras BN parity, the core's MBN, no retracing, Keras users'
expectations (the pitfalls of "Why is TensorFlow's batch normalization producing unexpected
results?"), mixed precision, serialization, the BN-weights helper, bad input; and the same
layer on the JAX and PyTorch backends in subprocesses.

The TensorFlow backend runs in this process (``KERAS_BACKEND`` is set before Keras is
imported, unless the environment already names a backend: then the file is skipped).
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mbn_ref as mr

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on the environment
    pytest.skip(
        f"Keras was imported with the {keras.backend.backend()!r} backend; this file needs "
        "TensorFlow in-process (the other backends run in subprocesses below)",
        allow_module_level=True,
    )

import mbn_tf  # noqa: E402
from mbn_tf import DynamicBatchNormalization, MomentumBatchNormalization  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 240
"""Seconds a backend subprocess may take (about 15 s each on two cores)."""

GAMMA = np.array([0.5, 1.0, 2.0])
BETA = np.array([0.1, -0.2, 0.3])


def _batches(shape: tuple[int, ...], n: int = 5, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(1.0 + i, 2.0, size=shape) for i in range(n)]


def _upstream(shape: tuple[int, ...]) -> np.ndarray:
    """A fixed, non-constant output gradient (a constant one gives dx = 0 in BN)."""
    return np.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape) ** 3


def _set_affine(layer: Any) -> None:
    for variable, value in [(layer.gamma, GAMMA), (layer.beta, BETA)]:
        if variable is not None:
            variable.assign(value.astype(variable.dtype))


def _step(layer: Any, x: np.ndarray, dy: np.ndarray, training: Any = True) -> list[np.ndarray]:
    """One call under a tape: ``[y, dx, dgamma, dbeta]`` as float64 NumPy arrays."""
    dtype = layer.compute_dtype
    xt = tf.constant(x, dtype=dtype)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=training)
        loss = tf.reduce_sum(tf.cast(y, "float64") * tf.constant(dy, "float64"))
    params = [p for p in (layer.gamma, layer.beta) if p is not None]
    grads = tape.gradient(loss, [xt, *params])
    return [np.asarray(t, dtype=np.float64) for t in [y, *grads]]


def _weights(layer: Any) -> dict[str, np.ndarray]:
    return {w.path: np.array(w.numpy()) for w in layer.weights}


def _assert_same_weights(before: dict[str, np.ndarray], layer: Any) -> None:
    after = _weights(layer)
    assert after.keys() == before.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


@pytest.fixture
def policy() -> Iterator[None]:
    """Restores Keras' global dtype policy after a mixed-precision test."""
    saved = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(saved)


@pytest.mark.parametrize(
    "name", ["mbn_tf", "mbn_tf._namespace", "mbn_tf._backends", "mbn_tf.layers", "mbn_tf.convert"]
)
def test_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_docs_examples_run() -> None:
    """The Python blocks of docs/keras.md run, in order, in one namespace."""
    text = (ROOT / "docs" / "keras.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 2
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, "docs/keras.md", "exec"), namespace)
    assert float(namespace["layer"].lam.numpy()) == 0.5


# -- lam = 0 is Keras' BatchNormalization ------------------------------------------------------
@pytest.mark.parametrize("cls", [MomentumBatchNormalization, DynamicBatchNormalization])
@pytest.mark.parametrize(("axis", "shape"), [(-1, (6, 4, 3)), (1, (6, 3, 2, 2))])
@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("float64", 1e-12)])
def test_lam_zero_is_keras_batchnorm(
    cls: Any, axis: int, shape: Any, dtype: str, tol: float
) -> None:
    """Five training steps: outputs, gradients of x, gamma, beta, moving statistics."""
    ours = cls(axis=axis, momentum=0.8, epsilon=1e-3, dtype=dtype)
    keras_bn = keras.layers.BatchNormalization(axis=axis, momentum=0.8, epsilon=1e-3, dtype=dtype)
    for layer in (ours, keras_bn):
        layer.build(shape)
        _set_affine(layer)
    dy = _upstream(shape)
    for step, x in enumerate(_batches(shape)):
        got, want = _step(ours, x, dy), _step(keras_bn, x, dy)
        for what, a, b in zip(["y", "dx", "dgamma", "dbeta"], got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"{what} step {step}")
        for name in ("moving_mean", "moving_variance"):
            np.testing.assert_allclose(
                getattr(ours, name).numpy(),
                getattr(keras_bn, name).numpy(),
                rtol=tol,
                atol=tol,
                err_msg=f"{name} step {step}",
            )
    x = _batches(shape, n=1, seed=1)[0]
    for a, b in zip(_step(ours, x, dy, None), _step(keras_bn, x, dy, None), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)  # inference: y and gradients


def test_decays_are_non_trainable_variables() -> None:
    """``lam`` and ``inference_decay``: 0-d, non-trainable, Keras' weight names beside them."""
    layer = MomentumBatchNormalization(lam=0.25, momentum=0.75)
    layer.build((None, 3))
    assert [w.name for w in layer.trainable_weights] == ["gamma", "beta"]
    names = [w.name for w in layer.non_trainable_weights]
    assert names == [
        "lam",
        "inference_decay",
        "moving_mean",
        "moving_variance",
        "moving_train_mean",
        "moving_train_variance",
    ]
    assert layer.lam is layer.non_trainable_weights[0] and tuple(layer.lam.shape) == ()
    assert float(layer.lam.numpy()) == 0.25 and float(layer.inference_decay.numpy()) == 0.75
    dynamic = DynamicBatchNormalization(momentum=0.5)
    dynamic.build((None, 3))
    assert [w.name for w in dynamic.non_trainable_weights] == [
        "inference_decay",
        "moving_mean",
        "moving_variance",
    ]


# -- MBN is the core's ---------------------------------------------------------------------------
@pytest.mark.parametrize(("axis", "shape"), [(-1, (4, 5, 3)), (1, (2, 3, 2, 3))])
def test_mbn_equals_the_core(axis: int, shape: Any) -> None:
    """lam changing every step (Eq. 11 at T = 5, m = 4): every output, gradient and statistic."""
    layer = MomentumBatchNormalization(axis=axis, momentum=0.7, epsilon=1e-5, dtype="float64")
    layer.build(shape)
    _set_affine(layer)
    state = mr.init_state(3)
    schedule = mr.schedules.mbn_lambda_schedule(5, 4, 32)
    dy = _upstream(shape)
    for step, x in enumerate(_batches(shape)):
        lam = schedule(step)
        layer.lam = lam
        got = _step(layer, x, dy)
        y, state, ctx = mr.mbn_forward(x, state, GAMMA, BETA, lam=lam, tau=0.7, eps=1e-5, axis=axis)
        want = [y, *mr.backward(dy, ctx)]
        for what, a, b in zip(["y", "dx", "dgamma", "dbeta"], got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=f"{what} step {step}")
        for name, field in [
            ("moving_train_mean", "moving_mean"),
            ("moving_train_variance", "moving_var"),
            ("moving_mean", "running_mean"),
            ("moving_variance", "running_var"),
        ]:
            np.testing.assert_allclose(
                getattr(layer, name).numpy(), getattr(state, field), rtol=1e-12, atol=1e-12
            )
    assert schedule(4) > 0.5  # the run reached MBN's regime, not only BN's
    x = _batches(shape, n=1, seed=3)[0]
    y_eval, _, _ = mr.mbn_forward(x, state, GAMMA, BETA, eps=1e-5, axis=axis, training=False)
    np.testing.assert_allclose(layer(x).numpy(), y_eval, rtol=1e-12, atol=1e-12)


# -- never retraces -----------------------------------------------------------------------------
def test_tf_function_never_retraces_and_reads_new_decays_at_once() -> None:
    """A train step traced once with a None batch; lam and momentum assigned every step.

    Batch sizes vary (the count is a run-time array, docs/spec.md §9.2), an empty batch
    leaves the state unchanged (Keras' BN makes it NaN), and the state follows the core.
    """
    layer = MomentumBatchNormalization(momentum=0.9)
    layer.build((None, 3))
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)], autograph=False)
    def train_step(x: Any) -> Any:
        traces.append(tf.executing_eagerly())
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y * tf.constant([1.0, 2.0, 3.0]))
        return tape.gradient(loss, [x, layer.gamma, layer.beta])

    state = mr.init_state(3)
    rng = np.random.default_rng(0)
    sizes = [4, 7, 2, 0, 5, 3]
    for step, n in enumerate(sizes):
        lam, tau = [0.0, 0.3, 0.6, 0.6, 0.9, 1.0][step], [0.9, 0.5, 0.0, 0.7, 0.99, 0.8][step]
        layer.lam = lam
        layer.momentum = tau
        x = rng.normal(2.0, 3.0, size=(n, 3))
        dx, dgamma, dbeta = train_step(tf.constant(x, tf.float32))
        y, state, ctx = mr.mbn_forward(
            x, state, np.ones(3), np.zeros(3), lam=lam, tau=tau, eps=1e-3, axis=-1
        )
        g = 2 * y * np.array([1.0, 2.0, 3.0])
        want = mr.backward(g, ctx)
        for a, b in zip([dx, dgamma, dbeta], want, strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)
        for name, field in [
            ("moving_train_mean", "moving_mean"),
            ("moving_mean", "running_mean"),
            ("moving_train_variance", "moving_var"),
            ("moving_variance", "running_var"),
        ]:
            np.testing.assert_allclose(
                getattr(layer, name).numpy(), getattr(state, field), rtol=1e-5, atol=1e-5
            )
    assert traces == [False]
    assert train_step.experimental_get_tracing_count() == 1
    assert np.all(np.isfinite(layer.moving_mean.numpy()))


def test_dynamic_momentum_changed_inside_the_graph() -> None:
    """``inference_decay.assign`` inside the traced step: BN with a run-time momentum."""
    layer = DynamicBatchNormalization()
    layer.build((None, 2))

    @tf.function(
        input_signature=[tf.TensorSpec([None, 2], tf.float32), tf.TensorSpec([], tf.float32)],
        autograph=False,
    )
    def step(x: Any, decay: Any) -> Any:
        layer.inference_decay.assign(decay)
        return layer(x, training=True)

    state = mr.init_bn_state(2)
    for i, x in enumerate(_batches((5, 2), n=4)):
        decay = [0.9, 0.1, 0.5, 1.0][i]
        step(tf.constant(x, tf.float32), tf.constant(decay))
        _, state, _ = mr.bn_forward(x, state, decay=decay, eps=1e-3, axis=-1)
        np.testing.assert_allclose(
            layer.moving_mean.numpy(), state.running_mean, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            layer.moving_variance.numpy(), state.running_var, rtol=1e-5, atol=1e-5
        )
    assert step.experimental_get_tracing_count() == 1
    assert layer.momentum == 1.0


class _CountingMBN(MomentumBatchNormalization):
    """Counts the training calls that run Python: in a compiled train step, its traces."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.traces: list[tuple[bool, int | None]] = []

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if training:
            self.traces.append((tf.executing_eagerly(), inputs.shape[0]))
        return super().call(inputs, training=training, mask=mask)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_model_fit_never_retraces_with_a_changing_schedule(jit_compile: bool) -> None:
    """``model.fit`` over 3 epochs: lam (Eq. 11) per epoch, momentum per batch, one trace.

    36 samples in batches of 8: the last batch of each epoch has 4, so Keras traces its step
    with a ``None`` batch size and the count is a run-time array (docs/spec.md §9.2). Also
    compiled with XLA (``jit_compile=True``).
    """
    epochs, batch, n = 3, 8, 36
    steps = -(-n // batch)
    lam_schedule = mr.schedules.mbn_lambda_schedule(epochs, batch, 32)
    momenta = mr.schedules.linear(0.5, 0.95, epochs * steps)
    layer = _CountingMBN(name="mbn")
    model = keras.Sequential([keras.Input((3,)), layer, keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    seen: list[tuple[float, float]] = []

    class Schedule(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            layer.lam = lam_schedule(epoch)

        def on_train_batch_begin(self, batch_index: int, logs: Any = None) -> None:
            layer.momentum = momenta(len(seen))
            seen.append((float(layer.lam.numpy()), layer.momentum))

    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(n, 3)).astype("float32")
    model.fit(
        x,
        rng.normal(size=(n, 1)),
        batch_size=batch,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[Schedule()],
    )
    assert layer.traces == [(False, None)]  # one graph; Keras traces with a None batch size
    assert len(seen) == epochs * steps
    state = mr.init_state(3)
    for k, (lam, tau) in enumerate(seen):  # the new values were used at once
        xb = x[(k % steps) * batch : (k % steps + 1) * batch].astype(np.float64)
        _, state, _ = mr.mbn_forward(xb, state, lam=lam, tau=tau, eps=1e-3, axis=-1)
    assert seen[-1][0] > 0.5 and seen[0][0] == 0.0
    for name, field in [
        ("moving_train_mean", "moving_mean"),
        ("moving_mean", "running_mean"),
        ("moving_train_variance", "moving_var"),
        ("moving_variance", "running_var"),
    ]:
        np.testing.assert_allclose(
            getattr(layer, name).numpy(), getattr(state, field), rtol=1e-5, atol=1e-5
        )


# -- Keras users' expectations and the article's pitfalls -----------------------------------------
def _trained(cls: Any = MomentumBatchNormalization, **kwargs: Any) -> Any:
    layer = cls(**kwargs)
    for x in _batches((8, 3), n=3):
        layer(x.astype("float32"), training=True)
    return layer


def test_training_none_and_frozen_layer_mean_inference() -> None:
    """``training=None`` (a model called without it too) and ``trainable=False``: inference."""
    layer = _trained(lam=0.5)
    x = _batches((5, 3), n=1, seed=7)[0].astype("float32")
    before = _weights(layer)
    inference = layer(x, training=False).numpy()
    np.testing.assert_array_equal(layer(x).numpy(), inference)
    model = keras.Sequential([keras.Input((3,)), layer])
    np.testing.assert_array_equal(model(x).numpy(), inference)  # pitfall 1: no training flag
    np.testing.assert_array_equal(model.predict(x, verbose=0), inference)
    _assert_same_weights(before, layer)
    state = mr.MBNState(
        *(
            np.asarray(getattr(layer, n).numpy(), np.float64)
            for n in (
                "moving_train_mean",
                "moving_train_variance",
                "moving_mean",
                "moving_variance",
            )
        ),
        np.asarray(0),
    )
    want, _, _ = mr.mbn_forward(x.astype(np.float64), state, eps=1e-3, axis=-1, training=False)
    np.testing.assert_allclose(inference, want, rtol=1e-5, atol=1e-5)
    layer.trainable = False
    np.testing.assert_array_equal(layer(x, training=True).numpy(), inference)
    _assert_same_weights(before, layer)
    assert layer.trainable_weights == []


@pytest.mark.parametrize("cls", [keras.layers.BatchNormalization, MomentumBatchNormalization])
def test_a_model_called_without_training_is_in_inference_mode(cls: Any) -> None:
    """The article's first example: ``model(one_sample)`` already is inference in Keras 3."""
    layer = _trained(cls)
    model = keras.Sequential([keras.Input((3,)), layer])
    one = np.array([[3.0, -1.0, 2.0]], dtype="float32")
    before = _weights(layer)
    default, inference = model(one).numpy(), model(one, training=False).numpy()
    np.testing.assert_array_equal(default, inference)
    _assert_same_weights(before, layer)
    assert not np.allclose(model(one, training=True).numpy(), inference)  # batch statistics


def test_single_sample_and_any_inference_batch_size() -> None:
    """Pitfalls 1 and 2: in inference each row is normalized alone, whatever the batch size."""
    layer = _trained(lam=0.25)
    x = _batches((17, 3), n=1, seed=8)[0].astype("float32")
    full = layer(x, training=False).numpy()
    np.testing.assert_allclose(layer(x[:1], training=False).numpy(), full[:1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer(x[:5], training=False).numpy(), full[:5], rtol=1e-6, atol=1e-6)
    # one sample in training: Keras' BN and MBN (lam a variable, never read on the host)
    # normalize it to beta (variance 0); BN whose batch alone normalizes refuses it when the
    # batch size is known (docs/spec.md §3.5), as PyTorch does
    keras_bn = keras.layers.BatchNormalization()
    mbn = MomentumBatchNormalization()
    np.testing.assert_array_equal(
        mbn(x[:1], training=True).numpy(), keras_bn(x[:1], training=True).numpy()
    )
    assert np.all(mbn(x[:1], training=True).numpy() == 0.0)
    dynamic = _trained(DynamicBatchNormalization)
    before = _weights(dynamic)
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        dynamic(x[:1], training=True)
    _assert_same_weights(before, dynamic)


@pytest.mark.parametrize("momentum", [0.1, 0.9])
def test_momentum_is_a_decay_of_the_moving_statistics(momentum: float) -> None:
    """Pitfall 3 / erratum 9: Keras' momentum 0.1 keeps 10% of history, not 90%."""
    layer = DynamicBatchNormalization(momentum=momentum)
    keras_bn = keras.layers.BatchNormalization(momentum=momentum)
    means = [0.0, 5.0, 10.0]
    for mean in means:
        x = np.array([[mean - 1.0], [mean + 1.0]], dtype="float32")
        layer(x, training=True)
        keras_bn(x, training=True)
    want = 0.0
    for mean in means:
        want = momentum * want + (1 - momentum) * mean
    np.testing.assert_allclose(layer.moving_mean.numpy(), [want], rtol=1e-6)
    np.testing.assert_allclose(keras_bn.moving_mean.numpy(), [want], rtol=1e-6)
    if momentum == 0.1:
        assert abs(want - 10.0) < 1.0  # nearly the last batch's
    else:
        assert want < 3.0  # history dominates


def test_fine_tuning_with_a_frozen_layer() -> None:
    """A frozen layer keeps its statistics and parameters; gradients still pass through it."""
    rng = np.random.default_rng(0)
    mbn = MomentumBatchNormalization(lam=0.5, name="mbn")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="d1"), mbn, keras.layers.Dense(1, name="d2")]
    )
    x, target = rng.normal(size=(32, 4)), rng.normal(size=(32, 1))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, target, batch_size=8, epochs=1, verbose=0)
    mbn.trainable = False
    model.compile(optimizer="sgd", loss="mse")  # Keras: recompile after changing trainable
    before, d1 = _weights(mbn), model.get_layer("d1").kernel.numpy().copy()
    model.fit(x, target, batch_size=8, epochs=2, verbose=0)
    _assert_same_weights(before, mbn)
    assert not np.allclose(model.get_layer("d1").kernel.numpy(), d1)


# -- mixed precision -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "half", "tol"),
    [("mixed_float16", "float16", 2e-3), ("mixed_bfloat16", "bfloat16", 2e-2)],
)
def test_mixed_precision(policy: None, name: str, half: str, tol: float) -> None:
    """Statistics and variables in float32, outputs and dx in the compute dtype."""
    keras.config.set_dtype_policy(name)
    layer = MomentumBatchNormalization(lam=0.5)
    keras.config.set_dtype_policy("float32")
    reference = MomentumBatchNormalization(lam=0.5)
    shape = (8, 3)
    dy = _upstream(shape)
    for x in _batches(shape):
        x = np.asarray(tf.cast(tf.cast(x, half), "float32"))  # the same values for both
        got, want = _step(layer, x, dy), _step(reference, x, dy)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
        for w, r in zip(layer.weights, reference.weights, strict=True):
            assert w.dtype == "float32"
            np.testing.assert_allclose(w.numpy(), r.numpy(), rtol=1e-5, atol=1e-5)
    y = layer(tf.constant(x, half), training=True)
    assert y.dtype == half


def test_half_precision_variables() -> None:
    """A pure float16 layer: float16 variables, statistics computed in float32."""
    layer = MomentumBatchNormalization(lam=0.5, dtype="float16")
    reference = MomentumBatchNormalization(lam=0.5)
    for x in _batches((8, 3), n=3):
        x = np.asarray(tf.cast(tf.cast(x, "float16"), "float32"))
        assert layer(x, training=True).dtype == "float16"
        reference(x, training=True)
    for w, r in zip(layer.weights, reference.weights, strict=True):
        assert w.dtype == "float16"
        np.testing.assert_allclose(w.numpy(), r.numpy(), rtol=2e-3, atol=2e-3)


# -- serialization ---------------------------------------------------------------------------------
def test_get_config_round_trip() -> None:
    layer = MomentumBatchNormalization(
        axis=1,
        momentum=0.95,
        epsilon=1e-4,
        center=False,
        lam=0.25,
        gamma_regularizer="l2",
        name="custom",
    )
    layer.lam = 0.5
    layer.momentum = 0.9
    config = layer.get_config()
    assert config["lam"] == 0.5 and config["momentum"] == 0.9  # current values, as written
    clone = MomentumBatchNormalization.from_config(config)
    assert clone.get_config() == config
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(again) is MomentumBatchNormalization and again.get_config() == config
    dynamic = DynamicBatchNormalization(momentum=0.5)
    assert (
        DynamicBatchNormalization.from_config(dynamic.get_config()).get_config()
        == dynamic.get_config()
    )
    assert "lam" not in dynamic.get_config()


def _model() -> Any:
    return keras.Sequential(
        [
            keras.Input((4, 4, 3)),
            keras.layers.Conv2D(3, 3, padding="same"),
            MomentumBatchNormalization(lam=0.5, name="mbn"),
            DynamicBatchNormalization(name="dbn"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1),
        ]
    )


def test_keras_save_and_load_in_safe_mode(tmp_path: Path) -> None:
    """Every weight, statistic and decay bit-exact; the next training step too."""
    model = _model()
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x, target = rng.normal(size=(8, 4, 4, 3)), rng.normal(size=(8, 1))
    model.fit(x, target, batch_size=4, epochs=1, verbose=0)
    model.get_layer("mbn").lam = 0.625
    model.get_layer("dbn").momentum = 0.75
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert [w.name for w in loaded.weights] == [w.name for w in model.weights]
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert float(loaded.get_layer("mbn").lam.numpy()) == 0.625
    assert loaded.get_layer("dbn").momentum == 0.75
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    xs = tf.constant(x[:4], "float32")
    np.testing.assert_array_equal(
        loaded(xs, training=True).numpy(), model(xs, training=True).numpy()
    )
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_export_saved_model_for_inference(tmp_path: Path) -> None:
    model = _model()
    rng = np.random.default_rng(1)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(rng.normal(size=(8, 4, 4, 3)), rng.normal(size=(8, 1)), batch_size=4, verbose=0)
    model.export(str(tmp_path / "exported"), verbose=False)
    artifact = tf.saved_model.load(str(tmp_path / "exported"))
    for n in (1, 5):
        x = rng.normal(size=(n, 4, 4, 3)).astype("float32")
        np.testing.assert_allclose(
            artifact.serve(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6
        )


# -- Keras BatchNormalization weights --------------------------------------------------------------
def _trained_keras_bn(**kwargs: Any) -> Any:
    bn = keras.layers.BatchNormalization(momentum=0.8, **kwargs)
    dy = _upstream((8, 3))
    for x in _batches((8, 3), n=3):
        _step(bn, x, dy)  # moves the statistics
    _set_affine(bn)
    return bn


def test_from_batchnorm_then_training_is_keras_bn() -> None:
    bn = _trained_keras_bn()
    ours = mbn_tf.from_batchnorm(bn)
    assert ours.momentum == 0.8 and float(ours.lam.numpy()) == 0.0
    np.testing.assert_array_equal(ours.moving_train_mean.numpy(), bn.moving_mean.numpy())
    x = _batches((8, 3), n=1, seed=4)[0]
    np.testing.assert_allclose(ours(x).numpy(), bn(x).numpy(), rtol=1e-6, atol=1e-6)
    dy = _upstream((8, 3))
    for x in _batches((8, 3), n=3, seed=5):
        for got, want in zip(_step(ours, x, dy), _step(bn, x, dy), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.moving_variance.numpy(), bn.moving_variance.numpy(), rtol=1e-5)


def test_clone_model_with_from_batchnorm_shares_other_layers() -> None:
    """The documented recipe: ``clone_model`` with ``from_batchnorm`` as clone function."""
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(2)
    model.fit(rng.normal(size=(16, 4)), rng.normal(size=(16, 1)), batch_size=8, verbose=0)

    def clone(layer: Any) -> Any:
        if isinstance(layer, keras.layers.BatchNormalization):
            return mbn_tf.from_batchnorm(layer, lam=0.5)
        return layer

    converted = keras.models.clone_model(model, clone_function=clone)
    assert isinstance(converted.layers[1], MomentumBatchNormalization)
    assert converted.layers[0] is model.layers[0]
    x = rng.normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(converted(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)


def test_load_batchnorm_weights_refuses_mismatches_and_changes_nothing() -> None:
    bn = _trained_keras_bn(center=False)
    ours = MomentumBatchNormalization()
    ours.build((None, 3))
    before = _weights(ours)
    with pytest.raises(ValueError, match=r"center True vs False.*Nothing was loaded"):
        mbn_tf.load_batchnorm_weights(ours, bn)
    _assert_same_weights(before, ours)
    with pytest.raises(ValueError, match="not built"):
        mbn_tf.load_batchnorm_weights(MomentumBatchNormalization(), bn)
    with pytest.raises(ValueError, match="renorm"):
        mbn_tf.from_batchnorm(keras.layers.BatchNormalization(renorm=True))
    unbuilt = mbn_tf.from_batchnorm(keras.layers.BatchNormalization(epsilon=0.5), lam=None)
    assert isinstance(unbuilt, DynamicBatchNormalization) and not unbuilt.built
    assert unbuilt.epsilon == 0.5


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_keras_messages_and_state_unchanged() -> None:
    layer = _trained(lam=0.5)
    before = _weights(layer)
    with pytest.raises(ValueError, match=r"expected axis -1 of input shape to have value 3"):
        layer(np.ones((4, 5), "float32"), training=True)
    with pytest.raises(ValueError, match="expected ndim=2"):
        layer(np.ones((4, 2, 3), "float32"), training=True)
    with pytest.raises(TypeError, match=r"expects a floating-point input.*int32"):
        layer(np.ones((4, 3), "int32"), training=True)
    with pytest.raises(NotImplementedError, match="mask"):
        layer(np.ones((4, 3), "float32"), training=True, mask=np.ones((4,), bool))
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"Argument `lam` must be a decay .* Received: lam="):
            layer.lam = bad
        with pytest.raises(ValueError, match=r"Argument `momentum` must be a decay"):
            layer.momentum = bad
    with pytest.raises(TypeError, match="momentum"):
        layer.momentum = "0.9"
    _assert_same_weights(before, layer)
    assert layer(np.ones((4, 3), "float32")).shape == (4, 3)  # still works


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"momentum": 1.5}, ValueError, "Received: momentum=1.5"),
        ({"lam": -1.0}, ValueError, "Received: lam=-1.0"),
        ({"momentum": None}, TypeError, "momentum"),
        ({"epsilon": 0.0}, ValueError, "epsilon=0.0"),
        ({"epsilon": "1e-3"}, TypeError, "epsilon"),
        ({"axis": 1.0}, TypeError, "axis"),
    ],
)
def test_bad_arguments_at_construction(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MomentumBatchNormalization(**kwargs)


def test_axis_out_of_range_and_undefined_channels_at_build() -> None:
    with pytest.raises(ValueError, match="Axis 3 is out of bounds"):
        MomentumBatchNormalization(axis=3).build((None, 3))
    with pytest.raises(ValueError, match="defined dimension"):
        MomentumBatchNormalization().build((None, None))


# -- the other Keras backends, in subprocesses -----------------------------------------------------
_BACKEND_SCRIPT = textwrap.dedent(
    """
    import json, os
    import numpy as np
    import keras
    import mbn_ref as mr
    import mbn_tf

    backend = keras.backend.backend()
    assert backend == os.environ["KERAS_BACKEND"], backend
    rng = np.random.default_rng(0)
    shape, axis = (4, 3, 5), 1
    gamma, beta = np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.3])
    layer = mbn_tf.MomentumBatchNormalization(axis=axis, momentum=0.8, epsilon=1e-3)
    layer.build(shape)
    layer.gamma.assign(gamma.astype("float32"))
    layer.beta.assign(beta.astype("float32"))
    dy = (np.linspace(-1, 1, int(np.prod(shape))).reshape(shape) ** 3).astype("float32")
    traces = []

    if backend == "jax":
        import jax
        import jax.numpy as jnp

        @jax.jit
        def step(trainable, non_trainable, x):
            traces.append(1)
            def loss(x, trainable):
                y, state = layer.stateless_call(trainable, non_trainable, x, training=True)
                return jnp.sum(y * dy), (y, state)
            (_, (y, state)), (dx, dparams) = jax.value_and_grad(
                loss, argnums=(0, 1), has_aux=True)(x, trainable)
            return y, dx, dparams, state

        def train(x):
            y, dx, dparams, state = step(
                [v.value for v in layer.trainable_variables],
                [v.value for v in layer.non_trainable_variables], jnp.asarray(x))
            for v, value in zip(layer.non_trainable_variables, state):
                v.assign(value)
            return [y, dx, *dparams]
    elif backend == "torch":
        import torch

        def train(x):
            traces.append(1)
            for v in layer.trainable_variables:
                v.value.grad = None
            xt = torch.tensor(x, requires_grad=True)
            y = layer(xt, training=True)
            (y * torch.tensor(dy)).sum().backward()
            return [y, xt.grad, layer.gamma.value.grad, layer.beta.value.grad]

    state = mr.init_state(3)
    errors = {}
    for k, lam in enumerate([0.0, 0.5, 0.9, 0.25]):
        layer.lam = lam
        x = rng.normal(1.0 + k, 2.0, size=shape).astype("float32")
        got = train(x)
        y, state, ctx = mr.mbn_forward(x.astype(np.float64), state, gamma, beta, lam=lam,
                                       tau=0.8, eps=1e-3, axis=axis)
        want = [y, *mr.backward(dy.astype(np.float64), ctx)]
        stats = [layer.moving_train_mean, layer.moving_train_variance, layer.moving_mean,
                 layer.moving_variance]
        got += stats
        want += [state.moving_mean, state.moving_var, state.running_mean, state.running_var]
        names = ["y", "dx", "dgamma", "dbeta", "moving_train_mean", "moving_train_variance",
                 "moving_mean", "moving_variance"]
        for name, a, b in zip(names, got, want):
            a = np.asarray(keras.ops.convert_to_numpy(a), dtype=np.float64)
            errors[name] = max(errors.get(name, 0.0), float(np.max(np.abs(a - b))))
    print(json.dumps({"backend": backend, "errors": errors, "traces": len(traces)}))
    """
)


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Starts the JAX and PyTorch subprocesses together; their JSON reports (or errors)."""
    script = tmp_path_factory.mktemp("keras_backends") / "backend_check.py"
    script.write_text(_BACKEND_SCRIPT)
    procs = {}
    for backend in ("jax", "torch"):
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        procs[backend] = subprocess.Popen(
            [sys.executable, str(script)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    out: dict[str, Any] = {}
    for backend, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            out[backend] = f"timed out after {SUBPROCESS_TIMEOUT} s"
            continue
        lines = stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            out[backend] = f"exit {proc.returncode}: {stderr[-3000:]}"
        else:
            out[backend] = json.loads(lines[-1])
    return out


@pytest.mark.parametrize(("backend", "traces"), [("jax", 1), ("torch", 4)])
def test_other_backend_matches_the_core(
    backend_runs: dict[str, Any], backend: str, traces: int
) -> None:
    """Four steps with lam 0, 0.5, 0.9, 0.25: outputs, gradients, every statistic (float32).

    On JAX the step is ``jax.jit``-compiled once (a new lam is a new variable value); on
    PyTorch it runs eagerly.
    """
    pytest.importorskip(backend)
    report = backend_runs[backend]
    assert isinstance(report, dict), report
    assert report["backend"] == backend
    assert report["traces"] == traces
    for name, error in report["errors"].items():
        assert error < 1e-5, (name, error)
