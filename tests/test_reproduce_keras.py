"""``mbn-ref reproduce --framework keras`` (adapters/mbn_tf/reproduce): the Keras experiment.

The same experiment as tests/test_reproduce.py checks on torch, on the Keras adapter
(TensorFlow backend, in this process): complete records, Eq. 11/12 reaching the layers,
one trace per run, determinism, and the paper's claim on the quick preset.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")  # the `reproduce` extra
pytest.importorskip("torch")  # the shared parts live in mbn_torch.reproduce
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on the environment
    pytest.skip(
        f"Keras was imported with the {keras.backend.backend()!r} backend; the Keras "
        "experiment needs TensorFlow",
        allow_module_level=True,
    )

import torch  # noqa: E402

from mbn_ref import schedules  # noqa: E402
from mbn_tf import DynamicBatchNormalization, MomentumBatchNormalization  # noqa: E402
from mbn_tf.reproduce import experiment as kx  # noqa: E402
from mbn_tf.reproduce.models import make_model, make_norm  # noqa: E402
from mbn_torch.reproduce import PRESETS, Config, RunResult  # noqa: E402
from mbn_torch.reproduce.data import Digits, load_digits_split  # noqa: E402
from mbn_torch.reproduce.experiment import steps_per_run  # noqa: E402
from mbn_torch.reproduce.models import make_model as make_torch_model  # noqa: E402
from mbn_torch.reproduce.output import format_table, make_report, plot, write_json  # noqa: E402

SMALL = Config(norms=("none", "bn", "mbn"), batch_sizes=(2, 32), seeds=(0,), epochs=3)
"""A reduced grid on 320 training samples: every kind of record, in seconds."""


@pytest.fixture(scope="module")
def data() -> Digits:
    return load_digits_split()


@pytest.fixture(scope="module")
def small_data(data: Digits) -> Digits:
    return dataclasses.replace(data, x_train=data.x_train[:320], y_train=data.y_train[:320])


class Run:
    """One ``run_experiment`` call: its results, step count and the trainers it built."""

    def __init__(self, config: Config, data: Digits) -> None:
        self.trainers: list[kx.Trainer] = []
        self.steps = 0
        trainers = self.trainers

        class Recording(kx.Trainer):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                trainers.append(self)

        def step() -> None:
            self.steps += 1

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kx, "Trainer", Recording)
            self.results = kx.run_experiment(config, data, on_step=step)


@pytest.fixture(scope="module")
def small(small_data: Digits) -> Run:
    return Run(SMALL, small_data)


def by_key(results: list[RunResult]) -> dict[tuple[str, int, int], RunResult]:
    return {(r.norm, r.batch_size, r.seed): r for r in results}


def decay_layers(model: Any) -> Iterator[Any]:
    return (
        la
        for la in model.layers
        if isinstance(la, DynamicBatchNormalization | MomentumBatchNormalization)
    )


# ------------------------------------------------------------------------------ the records


def test_every_record_is_complete_and_typed(small: Run, small_data: Digits) -> None:
    n = len(small_data.y_train)
    assert [(r.model, r.norm, r.batch_size, r.seed) for r in small.results] == SMALL.runs()
    for r in small.results:
        assert isinstance(r, RunResult)
        assert type(r.batch_size) is int and type(r.seed) is int and type(r.steps) is int
        for value in (r.test_accuracy, r.train_accuracy, r.final_train_loss, r.seconds):
            assert type(value) is float
        assert 0.0 <= r.test_accuracy <= 1.0 and 0.0 <= r.train_accuracy <= 1.0
        assert math.isfinite(r.final_train_loss) and r.seconds > 0
        assert r.steps == (n // r.batch_size) * SMALL.epochs and r.nproc == 1
        if r.norm == "mbn":
            assert isinstance(r.lam, list) and len(r.lam) == SMALL.epochs
            assert all(type(v) is float for v in r.lam)
        else:
            assert r.lam is None
        if r.norm in ("bn", "mbn"):
            assert type(r.inference_decay) is float
        else:
            assert r.inference_decay is None
        json.dumps(r.record())  # JSON-ready
    assert by_key(small.results)[("mbn", 32, 0)].train_accuracy > 0.8  # it learns


def test_batch_statistics_as_the_torch_records(small: Run, small_data: Digits) -> None:
    """BN and MBN at the smallest batch size, first seed: channel 0 over the last epoch."""
    recorded = {r.norm: r.batch_statistics for r in small.results if r.batch_statistics}
    assert set(recorded) == {"bn", "mbn"}
    per_epoch = len(small_data.y_train) // 2
    assert set(recorded["bn"]) == {"channel", "count", "mean", "var"}
    assert set(recorded["mbn"]) == {"channel", "count", "mean", "var", "moving_mean", "moving_var"}
    for stats in recorded.values():
        assert stats["channel"] == 0 and stats["count"] == 2
        for key in set(stats) - {"channel", "count"}:
            assert len(stats[key]) == per_epoch and all(type(v) is float for v in stats[key])
        assert min(stats["var"]) >= 0.0
    # the recorded statistics are those the MBN layer used: Eq. 8 with the last epoch's lam
    lam = by_key(small.results)[("mbn", 2, 0)].lam[-1]  # type: ignore[index]
    st = recorded["mbn"]
    for key, batch in (("moving_mean", "mean"), ("moving_var", "var")):
        moving, values = np.array(st[key]), np.array(st[batch])
        expect = lam * moving[:-1] + (1 - lam) * values[1:]
        np.testing.assert_allclose(moving[1:], expect, rtol=1e-5, atol=1e-5)


def test_step_callback_total_matches_steps_per_run(small: Run, small_data: Digits) -> None:
    expected = sum(steps_per_run(SMALL, len(small_data.y_train)))
    assert small.steps == expected == sum(r.steps for r in small.results)


def test_outputs_take_the_records_unchanged(small: Run, tmp_path: Path) -> None:
    """output.py's table, JSON report and figure, as the CLI writes them for torch."""
    table = format_table(small.results)
    assert "MBN" in table and "m=2" in table and "m=32" in table
    report = make_report(SMALL, small.results, data={}, seconds=1.0, argv=[])
    write_json(report, tmp_path / "r.json")
    again = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert len(again["results"]) == len(small.results)
    assert {s["norm"] for s in again["batch_statistics"]} == {"bn", "mbn"}
    plot(small.results, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ the decays


def test_lam_follows_eq_11_and_reaches_the_layers(small: Run) -> None:
    for r, trainer in zip(small.results, small.trainers, strict=True):
        if r.norm != "mbn":
            continue
        eq11 = [
            schedules.mbn_lambda(t + 1, total_epochs=SMALL.epochs, batch_size=r.batch_size)
            for t in range(SMALL.epochs)
        ]
        assert r.lam == eq11
        layers = list(decay_layers(trainer.model))
        assert len(layers) == 2
        for layer in layers:  # the last epoch's value, in the variable the graph read
            assert float(layer.lam.numpy()) == pytest.approx(eq11[-1], abs=1e-7)
    lam2 = by_key(small.results)[("mbn", 2, 0)].lam
    assert lam2 is not None and lam2[0] == 0.0 and lam2[-1] == pytest.approx(1 - 2 / 32)
    assert 0.0 < lam2[1] < lam2[-1]  # it moved during the run


@pytest.mark.parametrize("m", [2, 32])
def test_bn_and_mbn_share_tau(small: Run, m: int) -> None:
    """Both get Eq. 12's inference decay: they differ only in how they normalize in training."""
    tau = schedules.mbn_tau(batch_size=m)
    runs = by_key(small.results)
    assert runs[("bn", m, 0)].inference_decay == runs[("mbn", m, 0)].inference_decay == tau
    for r, trainer in zip(small.results, small.trainers, strict=True):
        if r.batch_size == m and r.norm in ("bn", "mbn"):
            values = [float(la.inference_decay.numpy()) for la in decay_layers(trainer.model)]
            assert values == pytest.approx([tau, tau], abs=1e-7)
    if m == 32:  # Eq. 11 gives lam = 0 at m = m0: MBN computes what BN does
        bn, mbn = runs[("bn", 32, 0)], runs[("mbn", 32, 0)]
        assert bn.test_accuracy == mbn.test_accuracy
        assert bn.final_train_loss == pytest.approx(mbn.final_train_loss, rel=1e-5)


def test_one_trace_per_run_while_the_decays_move(small: Run) -> None:
    """The scheduler and the learning rate change variables: the compiled step never retraces."""
    assert len(small.trainers) == len(small.results)
    assert [t.traces for t in small.trainers] == [1] * len(small.results)
    assert len(set(by_key(small.results)[("mbn", 2, 0)].lam or [])) == SMALL.epochs


def test_learning_rate_is_torchs_multistep(small: Run) -> None:
    for epochs in (1, 3, 4, 10):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[round(0.6 * epochs), round(0.9 * epochs)], gamma=0.1
        )
        for epoch in range(epochs):
            ours = kx.learning_rate(epoch, epochs=epochs, base=0.5)
            assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), (epochs, epoch)
            opt.step()  # (no gradient: nothing moves) in torch's order, before the scheduler
            sched.step()
    trainer = small.trainers[-1]  # the last epoch's rate is in the optimizer's variable
    expect = kx.learning_rate(SMALL.epochs - 1, epochs=SMALL.epochs, base=0.1 * 32 / 32)
    assert float(trainer.optimizer.learning_rate.numpy()) == pytest.approx(expect)


def test_same_call_same_results(small: Run, small_data: Digits) -> None:
    config = dataclasses.replace(SMALL, norms=("mbn",), batch_sizes=(2, 32))
    again = Run(config, small_data).results
    first = [r for r in small.results if r.norm == "mbn"]
    assert len(again) == len(first) == 2 and first[0].batch_statistics is not None
    for a, b in zip(first, again, strict=True):  # batch statistics and lam included
        assert dataclasses.replace(a, seconds=0.0) == dataclasses.replace(b, seconds=0.0)
    other = kx.train_one(small_data, "mlp", "mbn", 2, 1, epochs=SMALL.epochs)
    assert other.final_train_loss != first[0].final_train_loss  # the seed matters


def test_weight_decay_is_torchs(small_data: Digits) -> None:
    """PyTorch's SGD weight decay: ``wd * w`` added to the gradient (one step: ``-lr*wd*w``)."""
    x, y = small_data.x_train.numpy(), small_data.y_train.numpy()
    weights = []
    for wd in (0.0, 0.5):
        keras.utils.set_random_seed(0)
        trainer = kx.Trainer(make_model("mlp", "bn"), x, y, batch_size=4, lr=0.1, weight_decay=wd)
        start = [v.numpy() for v in trainer.model.trainable_weights]
        trainer.run(np.arange(4).reshape(1, 4))
        weights.append([v.numpy() for v in trainer.model.trainable_weights])
    for w0, plain, decayed in zip(start, *weights, strict=True):
        np.testing.assert_allclose(decayed - plain, -0.1 * 0.5 * w0, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------ the models


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["none", "bn", "mbn", "gn", "ln", "in"])
def test_models_have_the_torch_models_parameters(model: str, norm: str) -> None:
    if (model, norm) == ("mlp", "in"):
        with pytest.raises(ValueError, match="CNN only"):
            make_model(model, norm)
        return
    ours = make_model(model, norm)
    theirs = make_torch_model(model, norm)
    counts = sorted(int(np.prod(w.shape)) for w in ours.trainable_weights)
    assert counts == sorted(p.numel() for p in theirs.parameters())
    out = ours(np.zeros((3, 64), dtype="float32"), training=False)
    assert tuple(out.shape) == (3, 10)


def test_cnn_runs_with_the_batch_normalizations(small_data: Digits) -> None:
    config = Config(models=("cnn",), norms=("bn", "mbn"), batch_sizes=(32,), seeds=(0,), epochs=1)
    run = Run(config, small_data)
    assert [r.norm for r in run.results] == ["bn", "mbn"]
    assert all(math.isfinite(r.final_train_loss) for r in run.results)
    stats = [r.batch_statistics for r in run.results if r.batch_statistics is not None]
    assert [s["count"] for s in stats] == [32 * 64, 32 * 64]  # m x 8 x 8 values per channel
    assert run.results[0].final_train_loss == pytest.approx(
        run.results[1].final_train_loss, rel=1e-5
    )
    assert [t.traces for t in run.trainers] == [1, 1]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nproc": 2}, "nproc=2: the Keras experiment runs in one process"),
        ({"data": "cifar10", "models": ("resnet18",)}, "runs the digits only"),
        ({"device": "cuda"}, "device='cuda': the Keras experiment takes no device"),
    ],
)
def test_what_keras_does_not_run_is_refused(
    small_data: Digits, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        kx.run_experiment(dataclasses.replace(SMALL, **change), small_data)


def test_another_keras_backend_is_refused(
    small_data: Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(
        RuntimeError, match="needs Keras' TensorFlow backend, but Keras runs on 'jax'"
    ):
        kx.run_experiment(SMALL, small_data)


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown normalization 'batchnorm'"):
        make_norm("batchnorm", 8, spatial=False)
    with pytest.raises(ValueError, match="unknown model 'rnn'"):
        make_model("rnn", "bn")


# ------------------------------------------------------------------------------ the claim


def test_quick_preset_mbn_beats_bn_at_batch_size_2(data: Digits) -> None:
    """The paper's claim on Keras, as CI checks it on torch: at m = 2, MBN >= BN + 10 points."""
    results = kx.run_experiment(PRESETS["quick"], data)
    acc: dict[tuple[str, int], list[float]] = {}
    for r in results:
        acc.setdefault((r.norm, r.batch_size), []).append(r.test_accuracy)
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    assert mean[("mbn", 2)] - mean[("bn", 2)] >= 0.10, mean
    assert mean[("bn", 32)] > 0.9 and mean[("mbn", 32)] > 0.9, mean  # both fine at m = 32


@pytest.mark.parametrize("name", ["", ".models", ".experiment"])
def test_doctests(name: str) -> None:
    """The modules' examples (the test run's --doctest-modules does not reach adapters/)."""
    module = importlib.import_module(f"mbn_tf.reproduce{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
