"""The frameworks' own BN through the suite: the adapters of ``examples/frameworks/``.

Each adapter is constructed and driven through the protocol on a few steps and compared with
``mbn_ref`` (float64, the biased estimator unless the framework stores the unbiased one), and
a few golden cases go through the suite's runner. The tests assert each framework's real
behaviour: where it agrees with the reference, and the findings of ``docs/frameworks.md``
(Keras' synchronized raw moments and empty batches, Flax's fast variance and ``pmap``'s mean
of shard means, PyTorch's counter).

Keras and Flax run in two subprocesses started together (this file, run as a script with
``keras`` or ``flax``): their adapters configure virtual devices before the framework
initializes, and the test process keeps its own JAX and TensorFlow untouched. Each prints
one JSON object of measurements that the tests below assert on. They are skipped, with the
reason, where tensorflow/keras or flax are not importable.

The page's table is checked cheaply: it must be ``findings.render`` of the committed JSON
reports under ``docs/frameworks/``, which must hold no unexplained finding, must have run the
current golden cases, and whose declarations must be the adapters' current ones (the drivers
report them). A fresh run of every adapter takes minutes (3.5 on two cores), so it is not
part of this file: ``python -m examples.frameworks.findings --check``.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `examples` is a package of the repository, not installed
    sys.path.insert(0, str(ROOT))

TIMEOUT = 240
"""Seconds a driver subprocess may take (they take about 15 s together)."""

DECAYS = (0.9, 0.5, 0.75)
EPS = 1e-3
LAYOUTS = {  # layout: (shape without N, channel axis)
    "NC": ((3,), 1),
    "NCL": ((3, 4), 1),
    "NCHW": ((3, 2, 3), 1),
    "NCDHW": ((3, 2, 2, 2), 1),
    "NHWC": ((2, 3, 3), -1),
}


# -- driving an adapter (used in this process and in the driver subprocesses) ------------------
def _data(
    layout: str, dtype: str, n: int, steps: int, offset: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    rest, axis = LAYOUTS[layout]
    shape = (n, *rest)
    c = shape[axis]
    cs = [1] * len(shape)
    cs[axis] = c
    rng = np.random.default_rng(seed)
    xs, dys = [], []
    for _ in range(steps + 1):
        loc = offset + rng.uniform(-2, 2, c).reshape(cs)
        scale = 1.0 if offset else rng.uniform(0.5, 3, c).reshape(cs)
        xs.append(np.round((loc + scale * rng.standard_normal(shape)) * 256) / 256)
        dys.append(np.round(rng.standard_normal(shape) * 256) / 256)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.uniform(-1, 1, c)
    xs = [x.astype(dtype) for x in xs]
    dys = [d.astype(dtype) for d in dys]
    return xs, dys, gamma.astype(dtype), beta.astype(dtype)


def _err(got: Any, want: Any) -> float:
    """Max abs error (inf where either side is not finite); 0 for empty arrays."""
    g = np.asarray(got, np.float64)
    w = np.asarray(want, np.float64)
    if g.shape != w.shape:
        raise AssertionError(f"shape {g.shape} != {w.shape}")
    if g.size == 0:
        return 0.0
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(w))):
        return math.inf
    return float(np.max(np.abs(g - w)))


def drive(
    adapter: Any,
    *,
    layout: str = "NCHW",
    dtype: str = "float64",
    n: int = 4,
    steps: int = 3,
    offset: float = 0.0,
    shards: Sequence[int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``steps`` steps and evaluate once through the protocol, and with ``mbn_ref``.

    ``shards`` (sizes summing to ``n``) makes every training step a synchronized one through
    ``sync_step``. Returns the largest error of each quantity over the steps (``inf`` where
    not finite), the state before and after each step, and the decays used.
    """
    import mbn_ref as mr
    from mbn_conformance.protocol import Setup, Step

    xs, dys, gamma, beta = _data(layout, dtype, n, steps, offset, seed)
    axis = LAYOUTS[layout][1]
    c = xs[0].shape[axis]
    caps = adapter.capabilities
    estimator = caps.running_var

    def hp(v: float) -> float:  # hyper-parameters as the implementation holds them
        return float(np.float32(v)) if caps.hyperparameter_dtype == "float32" else v

    eps = hp(EPS)
    setup = Setup("bn", layout, xs[0].shape, axis, c, dtype, True)
    init = {
        "running_mean": np.linspace(-0.5, 0.5, c) + offset,
        "running_var": np.linspace(0.5, 2, c),
    }
    values = dict(init)
    if caps.batch_counter:
        values["num_batches_tracked"] = np.asarray(0, np.int64)
    state = adapter.load_state(adapter.init_state(setup), values)
    ref: Any = mr.BNState(init["running_mean"], init["running_var"], np.asarray(0, np.int64))
    g, b = adapter.from_numpy(gamma), adapter.from_numpy(beta)
    g64, b64 = gamma.astype(np.float64), beta.astype(np.float64)
    errors: dict[str, float] = {}
    states = [{k: np.asarray(v).tolist() for k, v in adapter.state_to_numpy(state).items()}]

    def note(name: str, value: float) -> None:
        errors[name] = max(errors.get(name, 0.0), value)

    for k in range(steps):
        step = Step("bn", k, True, eps, axis, estimator, decay=hp(DECAYS[k % len(DECAYS)]))
        x, dy = xs[k], dys[k]
        y_ref, ref, ctx = mr.bn_forward(
            x.astype(np.float64),
            ref,
            g64,
            b64,
            decay=step.decay,
            eps=eps,
            axis=axis,
            estimator=estimator,
        )
        dx_ref, dg_ref, db_ref = mr.backward(dy.astype(np.float64), ctx)
        if shards is None:
            y, state, actx = adapter.train_step(step, state, adapter.from_numpy(x), g, b)
            ys = [adapter.to_numpy(y)]
            dxs = dg = db = None
            if caps.backward:
                dx, dg, db = adapter.backward(actx, adapter.from_numpy(dy))
                dxs = [adapter.to_numpy(dx)]
        else:
            cuts = np.cumsum([0, *shards])
            parts = [slice(lo, hi) for lo, hi in itertools.pairwise(cuts)]
            ys_, state, dxs_, dg, db = adapter.sync_step(
                step,
                state,
                [adapter.from_numpy(x[p]) for p in parts],
                g,
                b,
                [adapter.from_numpy(dy[p]) for p in parts],
            )
            ys = [adapter.to_numpy(v) for v in ys_]
            dxs = [adapter.to_numpy(v) for v in dxs_]
        note("y", _err(np.concatenate(ys), y_ref))
        if dxs is not None:
            note("dx", _err(np.concatenate(dxs), dx_ref))
            note("dgamma", _err(adapter.to_numpy(dg), dg_ref))
            note("dbeta", _err(adapter.to_numpy(db), db_ref))
        got = adapter.state_to_numpy(state)
        states.append({k_: np.asarray(v).tolist() for k_, v in got.items()})
        note("running_mean", _err(got["running_mean"], ref.running_mean))
        note("running_var", _err(got["running_var"], ref.running_var))
        if caps.batch_counter:
            note("num_batches_tracked", _err(got["num_batches_tracked"], ref.num_batches_tracked))
    step = Step("bn", steps, False, eps, axis, estimator, decay=None)
    y = adapter.eval_step(step, state, adapter.from_numpy(xs[steps]), g, b)
    y_ref, _, _ = mr.bn_forward(
        xs[steps].astype(np.float64),
        ref,
        g64,
        b64,
        eps=eps,
        axis=axis,
        training=False,
        estimator=estimator,
    )
    note("eval_y", _err(adapter.to_numpy(y), y_ref))
    return {"errors": errors, "states": states, "decays": [hp(d) for d in DECAYS[:steps]]}


def suite_statuses(adapter: Any, patterns: Sequence[str]) -> dict[str, str]:
    """The suite's verdict (after known failures) on the golden cases matching ``patterns``."""
    from mbn_conformance.checks import checks

    return {c.id: c.outcome().status for c in checks(adapter, select=patterns, refusals=False)}


def declarations(adapter: Any) -> dict[str, Any]:
    """The adapter's capabilities as its JSON report holds them."""
    from mbn_conformance.report import capabilities_dict

    return dict(capabilities_dict(adapter.capabilities))


# -- the subprocess drivers ----------------------------------------------------------------
def keras_driver() -> dict[str, Any]:
    """Measurements of the Keras adapters (splits the CPU first: imports keras_sync_bn)."""
    from examples.frameworks import (
        keras_bn,
        keras_sync_bn,  # before TensorFlow initializes
    )

    plain, sync = keras_bn.make(), keras_sync_bn.make()
    out: dict[str, Any] = {
        "devices": sync.devices,
        "declarations": {"keras_bn": declarations(plain), "keras_sync_bn": declarations(sync)},
    }
    for layout, dtype in (
        ("NCHW", "float64"),
        ("NHWC", "float64"),
        ("NCL", "float32"),
        ("NC", "float16"),
    ):
        out[f"plain/{layout}/{dtype}"] = drive(plain, layout=layout, dtype=dtype)
    out["plain/offset/float32"] = drive(plain, dtype="float32", n=3, offset=1e4)
    out["plain/empty"] = drive(plain, n=0, steps=1)
    out["sync/one-device/float64"] = drive(sync)
    out["sync/one-device/offset/float32"] = drive(sync, dtype="float32", n=3, offset=1e4)
    out["sync/one-device/empty"] = drive(sync, n=0, steps=1)
    out["sync/shards1-0-4/float64"] = drive(sync, layout="NCL", n=5, shards=(1, 0, 4))
    out["sync/shards1-3-2/offset/float32"] = drive(
        sync, dtype="float32", n=6, offset=1e4, shards=(1, 3, 2)
    )
    out["suite/keras_bn"] = suite_statuses(plain, ["bn/NHWC/N2/float64/*", "bn/NCHW/N0/*"])
    out["suite/keras_sync_bn"] = suite_statuses(
        sync, ["sync/NCHW/N6/float64/eps1e-05/shards3-3", "sync/NCL/*", "bn/NCHW/N0/*"]
    )
    return out


def flax_driver() -> dict[str, Any]:
    """Measurements of the Flax adapters (imports flax_bn first: 8 virtual CPU devices)."""
    from examples.frameworks import flax_bn  # before JAX initializes its backend

    plain, pmap = flax_bn.make(), flax_bn.make_pmap()
    two_pass = flax_bn.make_two_pass()
    out: dict[str, Any] = {
        "devices": pmap.devices,
        "declarations": {
            "flax_bn": declarations(plain),
            "flax_pmap": declarations(pmap),
            "flax_two_pass": declarations(two_pass),
        },
    }
    for layout, dtype in (
        ("NCHW", "float64"),
        ("NHWC", "float64"),
        ("NCL", "float32"),
        ("NC", "float16"),
    ):
        out[f"plain/{layout}/{dtype}"] = drive(plain, layout=layout, dtype=dtype)
    out["plain/offset/float32"] = drive(plain, dtype="float32", n=3, offset=1e4)
    out["two_pass/offset/float32"] = drive(two_pass, dtype="float32", n=3, offset=1e4)
    out["plain/empty"] = drive(plain, n=0, steps=1)
    out["pmap/shards3-3/float64"] = drive(pmap, n=6, shards=(3, 3))
    out["pmap/shards1-3-2/float64"] = run = drive(
        two_pass_pmap(flax_bn), n=6, steps=1, shards=(1, 3, 2)
    )
    # what Flax computes instead: the unweighted mean of the three shards' means
    xs, _, _, _ = _data("NCHW", "float64", 6, 1, 0.0, 0)
    shard_means = [xs[0][a:b].mean(axis=(0, 2, 3)) for a, b in ((0, 1), (1, 4), (4, 6))]
    d = run["decays"][0]
    before, after = (np.asarray(s["running_mean"]) for s in run["states"][:2])
    out["pmap/shards1-3-2/mean_of_means_err"] = _err(
        after, d * before + (1 - d) * np.mean(shard_means, axis=0)
    )
    out["pmap/shards1-3-2/true_mean_err"] = _err(
        after, d * before + (1 - d) * xs[0].mean(axis=(0, 2, 3))
    )
    out["pmap/shards1-0-4/float64"] = drive(pmap, layout="NCL", n=5, steps=1, shards=(1, 0, 4))
    out["suite/flax_bn"] = suite_statuses(plain, ["bn/NHWC/N2/float64/*", "bn/NCHW/N0/*"])
    out["suite/flax_pmap"] = suite_statuses(
        pmap, ["sync/NCHW/N6/float64/eps1e-05/shards3-3", "sync/NCL/*"]
    )
    return out


def two_pass_pmap(flax_bn: Any) -> Any:
    """The pmap adapter with ``use_fast_variance=False`` (isolates the mean of shard means)."""
    return flax_bn.FlaxPmapBatchNorm(fast_variance=False)


DRIVERS = {"keras": (keras_driver, ("tensorflow", "keras")), "flax": (flax_driver, ("flax",))}


def _missing(modules: Sequence[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


class Driver:
    """A driver subprocess: started at once, its JSON read when first needed."""

    def __init__(self, name: str) -> None:
        self.name = name
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            TF_CPP_MIN_LOG_LEVEL="3",
        )
        for key in ("XLA_FLAGS", "KERAS_BACKEND", "MBN_IMPL"):
            env.pop(key, None)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, name],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._result: dict[str, Any] | None = None

    def result(self) -> dict[str, Any]:
        """The driver's measurements (fails the test with its output if it failed)."""
        if self._result is None:
            try:
                out, err = self.proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.close()
                pytest.fail(f"the {self.name} driver ran past {TIMEOUT} s")
            if self.proc.returncode != 0:
                pytest.fail(f"the {self.name} driver exited {self.proc.returncode}:\n{err[-4000:]}")
            self._result = json.loads(out.strip().splitlines()[-1])
        return self._result

    def close(self) -> None:
        """Kill the subprocess if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def drivers() -> Iterator[dict[str, Driver | str]]:
    """Both driver subprocesses, started together; a skip reason where a framework is missing."""
    started: dict[str, Driver | str] = {}
    for name, (_, modules) in DRIVERS.items():
        missing = _missing(modules)
        started[name] = f"not importable: {', '.join(missing)}" if missing else Driver(name)
    yield started
    for d in started.values():
        if isinstance(d, Driver):
            d.close()


def _measured(drivers: dict[str, Driver | str], name: str) -> dict[str, Any]:
    d = drivers[name]
    if isinstance(d, str):
        pytest.skip(f"{name}: {d}")
    return d.result()


@pytest.fixture(scope="module")
def keras(drivers: dict[str, Driver | str]) -> dict[str, Any]:
    """The Keras driver's measurements."""
    return _measured(drivers, "keras")


@pytest.fixture(scope="module")
def flax(drivers: dict[str, Driver | str]) -> dict[str, Any]:
    """The Flax driver's measurements."""
    return _measured(drivers, "flax")


TOL = {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2}
"""Max abs error allowed on unit-scale data (y, dx, the statistics) per input dtype."""


def assert_agrees(run: dict[str, Any], dtype: str, skip: Sequence[str] = ()) -> None:
    bad = {k: v for k, v in run["errors"].items() if k not in skip and not v <= TOL[dtype]}
    assert not bad, f"disagrees with mbn_ref beyond {TOL[dtype]}: {bad}"


# -- Keras ------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["NCHW/float64", "NHWC/float64", "NCL/float32", "NC/float16"])
def test_keras_bn_is_biased_bn(keras: dict[str, Any], what: str) -> None:
    """Ordinary data: y, dx, dgamma, dbeta, moving statistics and evaluation as mbn_ref's
    biased BN, momentum as a decay, channels-last included."""
    assert_agrees(keras[f"plain/{what}"], what.split("/")[1])


def test_keras_bn_is_stable_on_offset_float32(keras: dict[str, Any]) -> None:
    """tf.nn.moments subtracts the mean before squaring: data at 1e4 are fine in float32."""
    errors = keras["plain/offset/float32"]["errors"]
    assert errors["y"] < 1e-2 and errors["running_var"] < 1e-2, errors


def test_keras_bn_empty_batch_makes_the_moving_statistics_nan(keras: dict[str, Any]) -> None:
    after = keras["plain/empty"]["states"][1]
    assert all(math.isnan(v) for v in after["running_mean"] + after["running_var"])


def test_keras_sync_devices(keras: dict[str, Any]) -> None:
    """The module split the CPU into 8 logical devices: the golden cases need up to 4."""
    assert keras["devices"] >= 4


def test_keras_sync_agrees_on_ordinary_data(keras: dict[str, Any]) -> None:
    """Near 0, one device and three shards (one empty) give the batch's BN."""
    assert_agrees(keras["sync/one-device/float64"], "float64")
    assert_agrees(keras["sync/shards1-0-4/float64"], "float64")


def test_keras_sync_raw_moments_lose_offset_float32(keras: dict[str, Any]) -> None:
    """E[x^2] - E[x]^2: on one device as across shards, y and dx are far off at 1e4."""
    for run in ("sync/one-device/offset/float32", "sync/shards1-3-2/offset/float32"):
        errors = keras[run]["errors"]
        assert errors["y"] > 1 and errors["dx"] > 1e3, (run, errors)


def test_keras_sync_empty_batch_moves_the_moving_statistics(keras: dict[str, Any]) -> None:
    """divide_no_nan gives mean 0 and variance 0: the statistics decay toward 0, not NaN."""
    run = keras["sync/one-device/empty"]
    before, after = run["states"]
    d = run["decays"][0]
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(after[key], d * np.asarray(before[key]), rtol=1e-12)
    assert before["running_var"] != after["running_var"]


def test_keras_through_the_suite(keras: dict[str, Any]) -> None:
    plain, sync = keras["suite/keras_bn"], keras["suite/keras_sync_bn"]
    assert (
        set(plain.values()) == {"pass", "xfail"} and plain["bn/NHWC/N2/float64/eps1e-05"] == "pass"
    )
    assert sync == {
        "sync/NCL/N5/float64/eps1e-05/shards1-0-4": "pass",
        "bn/NCHW/N0/float64/eps1e-05/init-random": "xfail",
        "sync/NCHW/N6/float64/eps1e-05/shards3-3": "pass",
    }


# -- Flax -------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["NCHW/float64", "NHWC/float64", "NCL/float32", "NC/float16"])
def test_flax_bn_is_biased_bn_on_ordinary_data(flax: dict[str, Any], what: str) -> None:
    assert_agrees(flax[f"plain/{what}"], what.split("/")[1])


def test_flax_fast_variance_loses_offset_float32(flax: dict[str, Any]) -> None:
    """The default use_fast_variance=True: y off by hundreds; the two-pass control is fine."""
    fast, two_pass = (
        flax["plain/offset/float32"]["errors"],
        flax["two_pass/offset/float32"]["errors"],
    )
    assert fast["y"] > 100, fast
    assert two_pass["y"] < 1e-2 and two_pass["running_var"] < 1e-2, two_pass


def test_flax_empty_batch_makes_batch_stats_nan(flax: dict[str, Any]) -> None:
    after = flax["plain/empty"]["states"][1]
    assert all(math.isnan(v) for v in after["running_mean"] + after["running_var"])


def test_flax_pmap_equal_shards_agree(flax: dict[str, Any]) -> None:
    assert flax["devices"] >= 4
    assert_agrees(flax["pmap/shards3-3/float64"], "float64")


def test_flax_pmap_statistics_are_a_mean_of_shard_means(flax: dict[str, Any]) -> None:
    """Unequal shards (two-pass variance, to isolate it): the running mean moves toward the
    unweighted mean of the shards' means, not toward the batch's mean."""
    assert flax["pmap/shards1-3-2/mean_of_means_err"] < 1e-12
    assert flax["pmap/shards1-3-2/true_mean_err"] > 1e-3
    assert flax["pmap/shards1-3-2/float64"]["errors"]["y"] > 1e-3


def test_flax_pmap_empty_shard_is_nan(flax: dict[str, Any]) -> None:
    errors = flax["pmap/shards1-0-4/float64"]["errors"]
    assert errors["y"] == math.inf and errors["running_mean"] == math.inf


def test_flax_through_the_suite(flax: dict[str, Any]) -> None:
    plain = flax["suite/flax_bn"]
    assert plain["bn/NHWC/N2/float64/eps1e-05"] == "pass"
    assert plain["bn/NCHW/N0/float64/eps1e-05/init-random"] == "xfail"
    assert flax["suite/flax_pmap"] == {
        "sync/NCL/N5/float64/eps1e-05/shards1-0-4": "xfail",
        "sync/NCHW/N6/float64/eps1e-05/shards3-3": "pass",
    }


# -- PyTorch and ONNX, in this process --------------------------------------------------------
def test_torch_bn_is_unbiased_bn() -> None:
    pytest.importorskip("torch")
    from examples.frameworks import torch_bn

    adapter = torch_bn.make()
    for layout, dtype in (
        ("NCHW", "float64"),
        ("NCDHW", "float64"),
        ("NC", "float32"),
        ("NCL", "float16"),
    ):
        assert_agrees(drive(adapter, layout=layout, dtype=dtype), dtype)


def test_torch_bn_counts_an_empty_batch() -> None:
    pytest.importorskip("torch")
    from examples.frameworks import torch_bn

    run = drive(torch_bn.make(), n=0, steps=2)
    assert [s["num_batches_tracked"] for s in run["states"]] == [0, 1, 2]
    assert run["errors"]["running_mean"] == 0 and run["errors"]["running_var"] == 0


def test_torch_bn_refuses_after_counting() -> None:
    """One value per channel raises, but num_batches_tracked has moved already."""
    torch = pytest.importorskip("torch")
    from examples.frameworks import torch_bn
    from mbn_conformance.protocol import Setup, Step

    a = torch_bn.make()
    state = a.load_state(
        a.init_state(Setup("bn", "NC", (1, 3), 1, 3, "float64", False)),
        {
            "running_mean": np.zeros(3),
            "running_var": np.ones(3),
            "num_batches_tracked": np.asarray(0),
        },
    )
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        a.train_step(
            Step("bn", 0, True, 1e-5, 1), state, torch.zeros(1, 3, dtype=torch.float64), None, None
        )
    assert int(a.state_to_numpy(state)["num_batches_tracked"]) == 1


def test_onnx_bn_is_biased_bn() -> None:
    pytest.importorskip("onnx")
    from examples.frameworks import onnx_bn

    a = onnx_bn.make()
    for layout, dtype in (("NCHW", "float64"), ("NC", "float32"), ("NCL", "float16")):
        run = drive(a, layout=layout, dtype=dtype)
        assert set(run["errors"]) == {"y", "running_mean", "running_var", "eval_y"}
        assert_agrees(run, dtype)


@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:Degrees of freedom")
def test_onnx_bn_empty_batch_makes_the_running_statistics_nan() -> None:
    pytest.importorskip("onnx")
    from examples.frameworks import onnx_bn

    with np.errstate(invalid="ignore", divide="ignore"):
        after = drive(onnx_bn.make(), n=0, steps=1)["states"][1]
    assert all(math.isnan(v) for v in after["running_mean"] + after["running_var"])


# -- the page ---------------------------------------------------------------------------------
def test_page_table_is_the_committed_reports() -> None:
    from examples.frameworks import findings

    page = findings.PAGE.read_text(encoding="utf-8")
    assert findings.generated_part(page) == findings.render(findings.load_reports()), (
        "docs/frameworks.md's table is not that of docs/frameworks/*.json: run "
        "`python -m examples.frameworks.findings --render` (or without --render to rerun)"
    )


def test_committed_reports_are_all_explained() -> None:
    from examples.frameworks import findings

    assert findings.problems(findings.load_reports()) == []


def test_committed_reports_ran_the_current_golden_cases() -> None:
    """A changed golden set makes the reports stale (rerun the findings script)."""
    from examples.frameworks import findings
    from mbn_conformance import vectors

    current = [case.id for case in vectors.read()]
    for key, rep in findings.load_reports().items():
        assert [c["id"] for c in rep["checks"] if c["kind"] == "golden"] == current, key


def _report_declarations(key: str) -> dict[str, Any]:
    from examples.frameworks import findings

    return dict(findings.load_reports()[key]["capabilities"])


@pytest.mark.parametrize("name", ["keras", "flax"])
def test_committed_reports_hold_current_declarations(
    drivers: dict[str, Driver | str], name: str
) -> None:
    """The reports were made with the adapters' present declarations (else rerun findings)."""
    measured = _measured(drivers, name)
    for key, caps in measured["declarations"].items():
        assert _report_declarations(key) == caps, key


def test_committed_torch_and_onnx_reports_hold_current_declarations() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from examples.frameworks import onnx_bn, torch_bn

    assert _report_declarations("torch_bn") == declarations(torch_bn.make())
    assert _report_declarations("onnx_bn") == declarations(onnx_bn.make())


if __name__ == "__main__":  # a driver subprocess: python tests/test_frameworks.py keras|flax
    sys.stdout.write(json.dumps(DRIVERS[sys.argv[1]][0]()) + "\n")


_KERAS_TRACED_MOMENTUM = """
import json, os
os.environ["KERAS_BACKEND"] = "tensorflow"
import numpy as np, tensorflow as tf, keras
x = tf.constant(np.random.default_rng(0).normal(3.0, 1.0, size=(8, 3)), tf.float32)
layer = keras.layers.BatchNormalization(momentum=0.9)
step = tf.function(lambda x: layer(x, training=True))
step(x)
layer.momentum = 0.0  # what an eager callback does between epochs
before = layer.moving_mean.numpy().copy()
step(x)
print(json.dumps({"before": before.tolist(), "after": layer.moving_mean.numpy().tolist(),
                  "batch": x.numpy().mean(0).tolist()}))
"""


def test_keras_bakes_momentum_into_a_traced_step() -> None:
    """Keras' ``momentum`` is a Python float read at trace time: setting it on the layer after a
    ``tf.function`` traced the step changes nothing (docs/frameworks.md; the reason the Keras
    adapter keeps its decays in variables)."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed")
    out = subprocess.run(
        [sys.executable, "-c", _KERAS_TRACED_MOMENTUM],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    before, after, batch = (np.asarray(data[k]) for k in ("before", "after", "batch"))
    frozen = 0.9 * before + 0.1 * batch  # the traced 0.9, not the new 0.0
    np.testing.assert_allclose(after, frozen, rtol=1e-5)
    assert np.max(np.abs(after - batch)) > 0.1  # momentum 0.0 would have copied the batch mean
