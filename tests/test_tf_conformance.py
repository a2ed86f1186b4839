"""``mbn_tf``'s conformance adapter and its entry point (``mbn-ref conformance --backend keras``).

The whole suite (golden cases, synchronized ones included, refusals and the hypothesis
properties) runs against the Keras layers on the TensorFlow backend; each verdict is pinned:
no failure, no error, and exactly the declared skips. The core is shown to do the work: every
training step of every passing case calls ``mbn_ref.bn_forward`` (``DynamicBatchNormalization``)
or ``mbn_ref.mbn_forward`` (``MomentumBatchNormalization``), with a collective on every shard
of the synchronized cases. Then the entry point: through the CLI and the console script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import mbn_ref

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on the environment
    pytest.skip(
        f"Keras was imported with the {keras.backend.backend()!r} backend; this file needs "
        "the TensorFlow backend",
        allow_module_level=True,
    )

from mbn_conformance import Setup, Step, checks  # noqa: E402
from mbn_conformance.loading import backend_adapter, backend_spec, registered_backends  # noqa: E402
from mbn_ref.cli import main  # noqa: E402
from mbn_tf.conformance import KNOWN_FAILURES, KerasLayersAdapter, Layer, make  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKIPS = {
    "cumulative/NCHW/N2/float64/eps1e-05": "algorithm cumulative not declared",
    "mbn/NCHW/N2/float64/eps1e-05/lam0.5-tauNone": (
        "cumulative average needs a batch counter (batch_counter=False)"
    ),
    "refusal/one_value_per_channel": "refusal one_value_per_channel not declared",
}
"""Every skip, with its reason: Keras keeps no batch counter (so no cumulative average), and
a batch of one value per channel normalizes to ``beta`` (not refused). The schedule checks
run through the callback ``mbn_tf.MomentumScheduler``."""
PROPERTY_SETTINGS = settings(
    max_examples=10,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
VARIANTS = {"dynamic": None, "mbn": "mbn"}  # BN through DynamicBatchNormalization, or MBN lam=0


# -- what ran: the core's forward, with or without a collective -------------------------------


class _CoreCalls:
    """The core's training forwards the layers call: ``(function, lam, collective given)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, bool]] = []

    def training(self, name: str) -> int:
        return sum(1 for f, _, _ in self.calls if f == name)

    @property
    def synced(self) -> int:
        return sum(1 for _, _, s in self.calls if s)


@pytest.fixture
def core_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[_CoreCalls]:
    recorder = _CoreCalls()
    for name in ("bn_forward", "mbn_forward"):
        original = getattr(mbn_ref, name)

        def recorded(*args: Any, _f: Any = original, _name: str = name, **kwargs: Any) -> Any:
            if kwargs.get("training", True):
                lam = float(np.asarray(kwargs.get("lam", 0.0)))
                recorder.calls.append((_name, lam, kwargs.get("all_sum") is not None))
            return _f(*args, **kwargs)

        monkeypatch.setattr(mbn_ref, name, recorded)  # the layers call mr.<name>
    yield recorder


# -- the whole suite -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_check_passes(variant: str, core_calls: _CoreCalls) -> None:
    adapter = make(VARIANTS[variant])
    outcomes: dict[str, Any] = {}
    ran: dict[str, tuple[int, int, int]] = {}
    for check in checks(adapter, properties=True, hypothesis_settings=PROPERTY_SETTINGS):
        core_calls.calls.clear()
        outcomes[check.id] = result = check.outcome()
        if result.status == "pass":
            bn, mbn = core_calls.training("bn_forward"), core_calls.training("mbn_forward")
            ran[check.id] = (bn, mbn, core_calls.synced)
    by_status: dict[str, list[str]] = {}
    for cid, result in outcomes.items():
        by_status.setdefault(result.status, []).append(cid)
    problems = {s: ids for s, ids in by_status.items() if s in ("fail", "error", "xpass")}
    detail = {cid: (outcomes[cid].reason, outcomes[cid].failures[:3]) for ids in
              problems.values() for cid in ids}  # fmt: skip
    assert not problems, detail
    assert {cid: outcomes[cid].reason for cid in by_status.get("skip", [])} == SKIPS
    assert sorted(by_status.get("xfail", [])) == sorted(KNOWN_FAILURES) == []
    kinds = {outcomes[cid].kind for cid in by_status["pass"]}
    assert kinds == {"golden", "refusal", "property", "schedule"}
    assert len(by_status["pass"]) == len(outcomes) - len(SKIPS) >= 70
    assert "refusal/decay_out_of_range" in ran and "refusal/eps_not_positive" in ran

    # BN: the core's bn_forward (DynamicBatchNormalization) or mbn_forward (lam = 0)
    bn = [c for c in ran if c.split("/")[0] in ("bn", "dynamic_bn")]
    assert len(bn) >= 25
    for cid in bn:
        n_bn, n_mbn, _ = ran[cid]
        assert (n_bn, n_mbn) == ((5, 0) if variant == "dynamic" else (0, 5)), (cid, ran[cid])
    # MBN: mbn_forward on every training step
    mbn = [c for c in ran if c.startswith("mbn/")]
    assert len(mbn) >= 25
    for cid in mbn:
        assert ran[cid][:2] == (0, 5), (cid, ran[cid])
    # synchronized BN and MBN: a collective on every shard of every step
    sync = [c for c in ran if c.startswith("sync")]
    assert len(sync) == 7
    for cid in sync:
        shards = len(cid.split("/shards")[1].split("/")[0].split("-"))
        assert ran[cid][2] == sum(ran[cid][:2]) == 5 * shards, (cid, ran[cid])


# -- the adapter's plumbing --------------------------------------------------------------------


def _setup(kind: str, layout: str, shape: tuple[int, ...], dtype: str = "float64") -> Setup:
    axis = -1 if layout == "NHWC" else 1
    return Setup(kind, layout, shape, axis, shape[axis], dtype, True)  # type: ignore[arg-type]


def test_state_is_copied_out_and_keys_follow_the_kind() -> None:
    adapter = make()
    layer = adapter.init_state(_setup("mbn", "NC", (4, 3)))
    before = adapter.state_to_numpy(layer)
    assert sorted(before) == ["moving_mean", "moving_var", "running_mean", "running_var"]
    step = Step("mbn", 0, True, 1e-5, 1, "biased", lam=0.5)
    x = adapter.from_numpy(np.arange(12.0).reshape(4, 3))
    ones, zeros = tf.ones(3, tf.float64), tf.zeros(3, tf.float64)
    adapter.train_step(step, layer, x, ones, zeros)
    after = adapter.state_to_numpy(layer)
    assert before["running_mean"].tolist() == [0.0] * 3  # the snapshot did not move
    assert after["moving_mean"].tolist() == [2.25, 2.75, 3.25]  # 0.5 * batch mean
    assert np.allclose(after["running_mean"], 0.1 * np.array([4.5, 5.5, 6.5]))
    bn = make().init_state(_setup("bn", "NHWC", (2, 3, 3, 5)))
    assert type(bn.layer).__name__ == "DynamicBatchNormalization" and bn.layer.axis == -1
    assert sorted(make().state_to_numpy(bn)) == ["running_mean", "running_var"]
    via_mbn = make("mbn").init_state(_setup("bn", "NCDHW", (2, 3, 2, 2, 2)))
    assert type(via_mbn.layer).__name__ == "MomentumBatchNormalization"
    assert sorted(make("mbn").state_to_numpy(via_mbn)) == ["running_mean", "running_var"]


def test_float16_runs_the_mixed_float16_policy() -> None:
    adapter = make()
    layer = adapter.init_state(_setup("mbn", "NCHW", (4, 2, 3, 3), "float16"))
    assert layer.layer.dtype_policy.name == "mixed_float16"
    assert {v.dtype for v in layer.layer.weights} == {"float32"}
    step = Step("mbn", 0, True, 1e-5, 1, "biased", lam=0.5)
    x = adapter.from_numpy(np.linspace(-2, 2, 72).reshape(4, 2, 3, 3).astype(np.float16))
    y, _, ctx = adapter.train_step(step, layer, x, tf.ones(2), tf.zeros(2))
    dx, dgamma, _ = adapter.backward(ctx, tf.ones_like(y))
    assert (y.dtype, dx.dtype, dgamma.dtype) == (tf.float16, tf.float16, tf.float32)


@pytest.mark.parametrize(("field", "value"), [("lam", 1.5), ("tau", -0.1), ("decay", 2.0)])
def test_a_refused_decay_leaves_the_decays_and_state_unchanged(field: str, value: float) -> None:
    adapter = make()
    kind = "bn" if field == "decay" else "mbn"
    layer = adapter.init_state(_setup(kind, "NC", (4, 3)))
    good = Step(kind, 0, True, 1e-5, 1, "biased", decay=0.8, lam=0.25, tau=0.7)  # type: ignore[arg-type]
    x = adapter.from_numpy(np.arange(12.0).reshape(4, 3))
    ones, zeros = tf.ones(3, tf.float64), tf.zeros(3, tf.float64)
    adapter.train_step(good, layer, x, ones, zeros)
    decays = [float(v.numpy()) for v in layer.layer.weights if v.name in ("lam", "inference_decay")]
    state = adapter.state_to_numpy(layer)
    decay_args: dict[str, Any] = {"decay": 0.8, "lam": 0.25, "tau": 0.7, field: value}
    bad = Step(kind, 1, True, 1e-5, 1, "biased", **decay_args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a decay"):
        adapter.train_step(bad, layer, x, ones, zeros)
    after = [float(v.numpy()) for v in layer.layer.weights if v.name in ("lam", "inference_decay")]
    assert after == decays == ([0.8] if kind == "bn" else [0.25, 0.7])
    assert all(np.array_equal(v, state[k]) for k, v in adapter.state_to_numpy(layer).items())


def test_sync_ranks_share_one_state_and_match_the_whole_batch() -> None:
    """Three shards through replicas equal one layer on the concatenated batch."""
    adapter, whole = make(), make()
    setup = _setup("mbn", "NHWC", (7, 2, 2, 3))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 2, 2, 3))
    dy = rng.normal(size=(7, 2, 2, 3))
    step = Step("mbn", 0, True, 1e-5, -1, "biased", lam=0.5, tau=0.8)
    gamma, beta = (
        tf.constant([1.0, 2.0, 0.5], tf.float64),
        tf.constant([0.0, 1.0, -1.0], tf.float64),
    )
    state = adapter.init_state(setup)
    shards = [adapter.from_numpy(x[a:b]) for a, b in ((0, 3), (3, 3), (3, 7))]
    ys, state, ctx = adapter.sync_train_step(step, state, shards, gamma, beta)
    dxs, dgamma, dbeta = adapter.sync_backward(
        ctx, [adapter.from_numpy(dy[a:b]) for a, b in ((0, 3), (3, 3), (3, 7))]
    )
    ref = whole.init_state(setup)
    y, ref, ref_ctx = whole.train_step(step, ref, whole.from_numpy(x), gamma, beta)
    rdx, rdgamma, rdbeta = whole.backward(ref_ctx, whole.from_numpy(dy))
    np.testing.assert_allclose(np.concatenate([v.numpy() for v in ys]), y.numpy(), atol=1e-12)
    np.testing.assert_allclose(np.concatenate([v.numpy() for v in dxs]), rdx.numpy(), atol=1e-12)
    np.testing.assert_allclose(dgamma.numpy(), rdgamma.numpy(), atol=1e-12)
    np.testing.assert_allclose(dbeta.numpy(), rdbeta.numpy(), atol=1e-12)
    got, want = adapter.state_to_numpy(state), whole.state_to_numpy(ref)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-14, err_msg=key)
    with pytest.raises(ValueError, match="got 1 gradients for 3 shards"):
        adapter.sync_backward(ctx, [adapter.from_numpy(dy)])


def test_make_rejects_an_unknown_argument() -> None:
    assert isinstance(make(""), KerasLayersAdapter)
    with pytest.raises(ValueError, match="takes nothing or 'mbn', got 'fast'"):
        make("fast")


def test_layer_state_type() -> None:
    state = make().init_state(_setup("bn", "NC", (2, 3)))
    assert isinstance(state, Layer) and state.keys == {
        "running_mean": "moving_mean",
        "running_var": "moving_variance",
    }


# -- the entry point ----------------------------------------------------------------------------


def test_keras_is_a_registered_backend() -> None:
    assert registered_backends()["keras"] == "mbn_tf.conformance:make"
    assert backend_spec("keras:mbn") == "mbn_tf.conformance:make(mbn)"
    assert backend_adapter("keras").name == make().name
    assert backend_adapter("keras:mbn").name == make("mbn").name


def test_cli_backend_keras(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--backend", "keras", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["implementation"]["source"] == "--backend keras"
    assert doc["implementation"]["name"] == make().name
    s = doc["summary"]
    golden_skips = len(SKIPS)
    assert (s["fail"], s["error"], s["xpass"], s["xfail"]) == (0, 0, 0, 0)
    assert s["skip"] == golden_skips and s["succeeded"]
    assert s["pass"] == s["total"] - golden_skips == 68
    assert s["verdict"].startswith(f"CONFORMS: 68 of {s['total']} checks run (68 passed)")


def test_console_script_sync_cases() -> None:
    exe = Path(sys.executable).parent / "mbn-ref"
    out = subprocess.run(
        [str(exe), "conformance", "--backend", "keras", "--cases", "sync*", "--plain"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("CONFORMS: 7 of 7 checks run (7 passed)")
