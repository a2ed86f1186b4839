"""mbn_tf's Keras callbacks: schedules, plateau and gradient-noise controllers, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import mbn_ref as mr  # noqa: E402
from mbn_ref import schedules  # noqa: E402
from mbn_tf import (  # noqa: E402
    DynamicBatchNormalization,
    GradientRecordingModel,
    MomentumBatchNormalization,
    MomentumFromGradientNoise,
    MomentumOnPlateau,
    MomentumScheduler,
)

N, BATCH, C = 36, 8, 3  # 5 batches per epoch, the last one of 4
STEPS = -(-N // BATCH)


class _CountingMBN(MomentumBatchNormalization):
    """Counts the training calls that run Python: in a compiled train step, its traces."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.traces = 0

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if training:
            self.traces += 1
        return super().call(inputs, training=training, mask=mask)


class _Seen(keras.callbacks.Callback):  # type: ignore[misc]
    """Records (lam, momentum) of a layer before each batch (after the callbacks before it)."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.layer = layer
        self.values: list[tuple[float, float]] = []

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.values.append((float(self.layer.lam.numpy()), float(self.layer.momentum)))


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 2.0, size=(N, C)).astype("float32"), rng.normal(size=(N, 1))


def _model(layer: Any) -> Any:
    model = keras.Sequential([keras.Input((C,)), layer, keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _check_state(layer: Any, x: np.ndarray, seen: list[tuple[float, float]]) -> None:
    """The layer's statistics equal the core's run with the decays each batch saw."""
    state = mr.init_state(C)
    for k, (lam, tau) in enumerate(seen):
        xb = x[(k % STEPS) * BATCH : (k % STEPS + 1) * BATCH].astype(np.float64)
        _, state, _ = mr.mbn_forward(xb, state, lam=lam, tau=tau, eps=1e-3)
    np.testing.assert_allclose(layer.moving_train_mean.numpy(), state.moving_mean, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), state.running_mean, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), state.running_var, atol=1e-5)


def test_scheduler_per_batch_one_trace_and_values_used_at_once() -> None:
    """Any schedules per batch (fractional epochs): one trace; each batch used its values."""
    layer = _CountingMBN()
    model = _model(layer)
    lam = schedules.linear(0.0, 0.9, num_steps=2)  # in epochs
    tau = schedules.cosine(0.5, 0.95, num_steps=2)
    sched = MomentumScheduler(lam=lam, momentum=tau, per="batch", steps_per_epoch=STEPS)
    seen = _Seen(layer)
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[sched, seen])
    assert layer.traces == 1
    want = [(lam(k / STEPS), tau(k / STEPS)) for k in range(2 * STEPS)]
    np.testing.assert_allclose(seen.values, want, atol=1e-7)  # float32 variables
    assert sched.iterations == 2 * STEPS and sched.epochs == 2
    _check_state(layer, x, seen.values)


def test_scheduler_defaults_are_eq11_and_eq12_per_epoch() -> None:
    layer = _CountingMBN()
    model = _model(layer)
    sched = MomentumScheduler(batch_size=BATCH, total_epochs=3)
    seen = _Seen(layer)
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0, callbacks=[sched, seen])
    eq11 = schedules.mbn_lambda_schedule(total_epochs=3, batch_size=BATCH)
    eq12 = schedules.mbn_tau(batch_size=BATCH)
    want = [(eq11(k // STEPS), eq12) for k in range(3 * STEPS)]
    np.testing.assert_allclose(seen.values, want, atol=1e-7)
    assert layer.traces == 1
    assert sched.get_last() == {"lam": eq11(2), "momentum": eq12}


def test_cumulative_per_batch_averages_every_batch() -> None:
    """``schedules.cumulative()`` per batch: moving_mean is the mean of the batch means."""
    layer = DynamicBatchNormalization()
    model = _model(layer)
    sched = MomentumScheduler(lam="keep", momentum=schedules.cumulative(), per="batch")
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[sched])
    means = [x[i : i + BATCH].astype(np.float64).mean(0) for i in range(0, N, BATCH)]
    np.testing.assert_allclose(layer.moving_mean.numpy(), np.mean(means, 0), atol=1e-5)


def test_bad_schedule_value_changes_nothing() -> None:
    """A schedule's bad value raises at that epoch, before any layer or counter changes."""
    layer = MomentumBatchNormalization()
    model = _model(layer)
    sched = MomentumScheduler(lam=lambda c: [0.1, 0.2, 1.5][int(c)], momentum="keep")
    x, y = _data()
    with pytest.raises(ValueError, match="count 2"):
        model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[sched])
    assert float(layer.lam.numpy()) == pytest.approx(0.2) and sched.epochs == 2
    assert sched.get_last()["lam"] == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "Eq. 11"),
        ({"batch_size": 8, "lam": 0.5}, ValueError, None),  # no total_epochs needed: fine
        ({"lam": 0.5, "momentum": None}, ValueError, "Eq. 12"),
        ({"lam": 1.5, "momentum": "keep"}, ValueError, "lam"),
        ({"lam": "cumulative", "momentum": "keep"}, ValueError, "'keep'"),
        ({"lam": schedules.PlateauController(), "momentum": "keep"}, TypeError, "Plateau"),
        ({"lam": 0.5, "momentum": "keep", "per": "step"}, ValueError, "per"),
        ({"lam": 0.5, "momentum": "keep", "steps_per_epoch": 3}, ValueError, "per='batch'"),
    ],
)
def test_scheduler_bad_arguments(kwargs: dict[str, Any], error: type, match: str | None) -> None:
    if match is None:
        MomentumScheduler(**kwargs)
        return
    with pytest.raises(error, match=match):
        MomentumScheduler(**kwargs)


def test_model_without_our_layers_is_refused() -> None:
    model = keras.Sequential([keras.Input((C,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data()
    with pytest.raises(ValueError, match="has no MomentumBatchNormalization"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[MomentumScheduler(lam=0.5, momentum=0.9)])


def _resume_pair() -> tuple[Any, MomentumScheduler]:
    keras.utils.set_random_seed(1)
    layer = MomentumBatchNormalization(name="mbn")
    return _model(layer), MomentumScheduler(batch_size=BATCH, total_epochs=4, per="batch")


def _fit(model: Any, callback: Any, epochs: int, initial_epoch: int = 0) -> None:
    x, y = _data()
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=[callback],
    )


def test_resume_from_the_keras_file_alone(tmp_path: Path) -> None:
    """2 epochs, save (.keras), load (safe mode), a fresh callback, 2 more = 4 epochs straight.

    The callback's state travels inside the .keras file; the fresh callback takes it up at
    the start of fit.
    """
    straight, sched = _resume_pair()
    _fit(straight, sched, 4)

    first, sched1 = _resume_pair()
    _fit(first, sched1, 2)
    first.save(tmp_path / "m.keras")

    resumed = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    _, sched2 = _resume_pair()
    assert sched2.state_dict()["iterations"] == 0 and not sched2.restored
    _fit(resumed, sched2, 4, initial_epoch=2)
    assert sched2.restored
    assert sched2.state_dict() == sched.state_dict()
    for a, b in zip(straight.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)

    # saved again after the resumed run: the file holds the state of the moment it was saved
    resumed.save(tmp_path / "m2.keras")
    again = keras.models.load_model(tmp_path / "m2.keras", safe_mode=True)
    _, sched3 = _resume_pair()
    sched3.set_model(again)
    sched3.on_train_begin()
    assert sched3.state_dict() == sched.state_dict()

    # restore=False starts afresh on the same file
    fresh = MomentumScheduler(batch_size=BATCH, total_epochs=4, per="batch", restore=False)
    fresh.set_model(keras.models.load_model(tmp_path / "m.keras", safe_mode=True))
    fresh.on_train_begin()
    assert not fresh.restored and fresh.state_dict()["iterations"] == 0


def test_resume_from_a_json_state_by_hand(tmp_path: Path) -> None:
    """state_dict/load_state_dict: JSON beside the model (strict, unchanged after an error)."""
    straight, sched = _resume_pair()
    _fit(straight, sched, 4)
    first, sched1 = _resume_pair()
    _fit(first, sched1, 2)
    first.save_weights(tmp_path / "m.weights.h5")  # weights only: no callback state inside
    (tmp_path / "sched.json").write_text(json.dumps(sched1.state_dict()))

    resumed, sched2 = _resume_pair()
    resumed.load_weights(tmp_path / "m.weights.h5")
    sched2.load_state_dict(json.loads((tmp_path / "sched.json").read_text()))
    _fit(resumed, sched2, 4, initial_epoch=2)
    assert not sched2.restored  # the model carried nothing; the hand-loaded state ran
    assert sched2.state_dict() == sched.state_dict()
    with pytest.raises(ValueError, match="expected keys"):
        sched2.load_state_dict({"epochs": 1})
    with pytest.raises(ValueError, match="epochs"):
        sched2.load_state_dict({**sched.state_dict(), "epochs": -1})
    assert sched2.state_dict() == sched.state_dict()  # unchanged by the bad loads


def test_a_corrupt_state_file_is_a_clear_error(tmp_path: Path) -> None:
    layer = MomentumBatchNormalization(name="mbn")
    (tmp_path / "schedule_state.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object of callback states"):
        layer.load_assets(str(tmp_path))
    assert layer._schedule.saved == {}


def test_plateau_on_val_loss(tmp_path: Path) -> None:
    layer = _CountingMBN()
    model = _model(layer)
    ctl = schedules.PlateauController(initial=0.9, step_up=0.02, step_down=0.05, min_decay=0.5)
    cb = MomentumOnPlateau(ctl, monitor="val_loss", decay="lam")
    seen = _Seen(layer)
    x, y = _data()
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=4,
        shuffle=False,
        verbose=0,
        validation_data=(x[:8], y[:8] + 5.0),
        callbacks=[cb, seen],
    )
    state, want = ctl.init(), []
    for loss in history.history["val_loss"]:
        want.append(state.decay)
        state = ctl.update(state, loss)
    got = [seen.values[k * STEPS][0] for k in range(4)]  # lam at each epoch's first batch
    np.testing.assert_allclose(got, want, atol=1e-7)
    assert cb.state == state and float(layer.lam.numpy()) == pytest.approx(state.decay)
    assert layer.traces == 1
    # resume: the state round-trips through JSON and through the .keras file; a missing
    # metric raises, nothing changes
    cb2 = MomentumOnPlateau(ctl, monitor="val_loss", decay="lam")
    cb2.load_state_dict(json.loads(json.dumps(cb.state_dict())))
    assert cb2.state == cb.state
    model.save(tmp_path / "p.keras")
    cb3 = MomentumOnPlateau(ctl, monitor="val_loss", decay="lam")
    cb3.set_model(
        keras.models.load_model(tmp_path / "p.keras", custom_objects={"_CountingMBN": _CountingMBN})
    )
    cb3.on_train_begin()
    assert cb3.restored and cb3.state == cb.state
    assert float(cb3.model.layers[0].lam.numpy()) == pytest.approx(state.decay)
    with pytest.raises(ValueError, match="val_accuracy"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[MomentumOnPlateau(monitor="val_accuracy")])


def test_gradient_noise_controller_sees_every_step_gradient(tmp_path: Path) -> None:
    """The callback's controller equals one fed, by hand, each step's gradient."""
    x, y = _data()
    ctl = schedules.GradientNoiseController(batch_size=BATCH, warmup_steps=3, alpha=0.2)

    def new() -> Any:
        keras.utils.set_random_seed(2)
        inputs = keras.Input((C,))
        hidden = keras.layers.Dense(4)(inputs)
        outputs = keras.layers.Dense(1)(_CountingMBN(name="mbn")(hidden))
        return GradientRecordingModel(inputs, outputs)

    model = new()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    cb = MomentumFromGradientNoise(ctl)
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
    assert model.get_layer("mbn").traces == 1
    assert np.isfinite(history.history["loss"]).all()

    ref = new()  # the same steps by hand
    opt = keras.optimizers.SGD(0.01)
    state = ctl.init()
    mbn = ref.get_layer("mbn")
    for k in range(2 * STEPS):
        xb = x[(k % STEPS) * BATCH : (k % STEPS + 1) * BATCH]
        yb = y[(k % STEPS) * BATCH : (k % STEPS + 1) * BATCH].astype("float32")
        mbn.lam = state.decay
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(ref(xb, training=True) - yb))
        grads = tape.gradient(loss, ref.trainable_weights)
        opt.apply(grads, ref.trainable_weights)
        state = ctl.update(state, np.concatenate([g.numpy().ravel() for g in grads]))
    assert cb.state.num_updates == state.num_updates == 2 * STEPS
    assert cb.state.decay == pytest.approx(state.decay, abs=1e-4)
    assert cb.state.decay != ctl.initial  # the controller moved past its warm-up value
    np.testing.assert_allclose(cb.state.mean, state.mean, rtol=1e-4, atol=1e-6)
    assert float(model.get_layer("mbn").lam.numpy()) == pytest.approx(cb.state.decay)
    # resume: by hand through JSON, and through the .keras file (one more epoch continues)
    cb2 = MomentumFromGradientNoise(ctl)
    cb2.load_state_dict(json.loads(json.dumps(cb.state_dict())))
    assert cb2.state.num_updates == cb.state.num_updates
    np.testing.assert_array_equal(cb2.state.mean, cb.state.mean)
    model.save(tmp_path / "g.keras")
    loaded = keras.models.load_model(
        tmp_path / "g.keras", custom_objects={"_CountingMBN": _CountingMBN}
    )
    cb3 = MomentumFromGradientNoise(ctl)
    loaded.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb3])
    assert cb3.restored and cb3.state.num_updates == 3 * STEPS


def test_gradient_noise_needs_a_recording_model() -> None:
    model = _model(MomentumBatchNormalization())
    x, y = _data()
    cb = MomentumFromGradientNoise(schedules.GradientNoiseController(batch_size=BATCH))
    with pytest.raises(TypeError, match="GradientRecordingModel"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
