"""``synchronized=True`` under ``tf.distribute.MirroredStrategy``, against the core.

TensorFlow fixes its logical devices when it first initializes them, so each strategy runs
in a subprocess (bounded by a timeout) that splits the CPU into 2 or 3 logical devices;
this process is unaffected. Each subprocess runs a compiled replica step (``strategy.run``
in a ``tf.function``) on unequal per-replica batches and compares, step by step, the
outputs, the gradients of ``x``, ``gamma`` and ``beta`` and every statistic with the core
(:func:`mbn_ref.mbn_forward`, :func:`mbn_ref.bn_forward`, :func:`mbn_ref.backward`) on the
concatenated batch in NumPy float64. The float32 data with mean 1e4 shows what the two-pass
merge buys: Keras' own ``BatchNormalization(synchronized=True)`` (``E[x^2] - E[x]^2``)
loses most digits there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tensorflow")

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf

    n = int(sys.argv[1])
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * n
    )
    import keras
    import mbn_ref as mr
    import mbn_tf

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)])
    SIZES = {2: [5, 3], 3: [5, 1, 4]}[n]       # unequal shards, one of a single sample
    C = 3
    rng = np.random.default_rng(n)
    out = {"replicas": strategy.num_replicas_in_sync}

    def shards(a, sizes=SIZES):
        ends = np.cumsum([0] + sizes)
        parts = [a[ends[i]:ends[i + 1]] for i in range(n)]
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
        )

    def gather(values):
        return np.concatenate(
            [np.asarray(v) for v in strategy.experimental_local_results(values)]
        )

    def make_step(layer, traces):
        @tf.function
        def step(x, w):
            traces.append(1)
            def fn(x, w):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = layer(x, training=True)
                    loss = tf.reduce_sum(y * w)
                grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
                return (y, *grads)
            return strategy.run(fn, (x, w))
        return step

    def run(kind, dtype, offset, steps=3):
        mbn = kind == "mbn"
        with strategy.scope():
            cls = mbn_tf.MomentumBatchNormalization if mbn else mbn_tf.DynamicBatchNormalization
            layer = cls(momentum=0.8, epsilon=1e-5, synchronized=True, dtype=dtype)
            layer.build((None, C))
        g0 = rng.normal(size=C) + 1.0
        b0 = rng.normal(size=C)
        layer.gamma.assign(g0)
        layer.beta.assign(b0)
        state = mr.init_state(C) if mbn else mr.init_bn_state(C)
        traces, errors = [], {}
        step = make_step(layer, traces)
        lams = [0.0, 0.5, 0.9][:steps]
        for i, lam in enumerate(lams):
            x = (offset + rng.normal(size=(sum(SIZES), C))).astype(dtype)
            w = rng.normal(size=(sum(SIZES), C)).astype(dtype)
            if mbn:
                layer.lam = lam
            layer.momentum = 0.8 - 0.1 * i
            y, dx, dg, db = step(shards(x), shards(w))
            x64 = x.astype("float64")
            if mbn:
                ref, state, ctx = mr.mbn_forward(
                    x64, state, g0, b0, lam=lam, tau=0.8 - 0.1 * i, eps=1e-5
                )
                got_state = [layer.moving_train_mean, layer.moving_train_variance,
                             layer.moving_mean, layer.moving_variance]
                ref_state = [state.moving_mean, state.moving_var,
                             state.running_mean, state.running_var]
            else:
                ref, state, ctx = mr.bn_forward(
                    x64, state, g0, b0, decay=0.8 - 0.1 * i, eps=1e-5
                )
                got_state = [layer.moving_mean, layer.moving_variance]
                ref_state = [state.running_mean, state.running_var]
            rdx, rdg, rdb = mr.backward(w.astype("float64"), ctx)
            scale = np.abs(ref).max()
            errs = errors.setdefault("y", [])
            errs.append(float(np.abs(gather(y) - ref).max() / scale))
            errors.setdefault("dx", []).append(
                float(np.abs(gather(dx) - rdx).max() / np.abs(rdx).max()))
            # each replica's gradient of gamma and beta is its own part; their sum (what
            # the strategy's optimizer step all-reduces) is the global one
            dgs = sum(np.asarray(v) for v in strategy.experimental_local_results(dg))
            dbs = sum(np.asarray(v) for v in strategy.experimental_local_results(db))
            errors.setdefault("dgamma", []).append(
                float(np.abs(dgs - rdg).max() / np.abs(rdg).max()))
            errors.setdefault("dbeta", []).append(
                float(np.abs(dbs - rdb).max() / np.abs(rdb).max()))
            for name, got, want in zip(["s0", "s1", "s2", "s3"], got_state, ref_state):
                copies = [np.asarray(v) for v in strategy.experimental_local_results(got)]
                errors.setdefault("state", []).append(
                    float(max(np.abs(c - want).max() / np.abs(want).max() for c in copies)))
        return {"errors": {k: max(v) for k, v in errors.items()}, "traces": len(traces)}

    def keras_sync_bn(dtype, offset):
        with strategy.scope():
            layer = keras.layers.BatchNormalization(
                momentum=0.8, epsilon=1e-5, synchronized=True, dtype=dtype)
            layer.build((None, C))
        x = (offset + rng.normal(size=(sum(SIZES), C))).astype(dtype)
        @tf.function
        def step(x):
            return strategy.run(lambda x: layer(x, training=True), (x,))
        y = gather(step(shards(x)))
        ref, _, _ = mr.bn_forward(x.astype("float64"), None, eps=1e-5)
        biased = 0.8 * 1.0 + 0.2 * np.var(x.astype("float64"), axis=0)   # Keras' convention
        return {
            "y": float(np.abs(y - ref).max() / np.abs(ref).max()),
            "moving_variance": float(
                np.abs(np.asarray(layer.moving_variance) - biased).max() / biased.max()),
        }

    def per_replica_bn():
        # synchronized=False under the strategy: each replica its own batch, the moving
        # statistics average the replicas' updates ("mean" aggregation)
        sizes = [4, 2, 3][:n]
        with strategy.scope():
            layer = mbn_tf.DynamicBatchNormalization(momentum=0.8, epsilon=1e-5)
            layer.build((None, C))
        x = rng.normal(size=(sum(sizes), C))
        xs = x.astype("float32")
        @tf.function
        def step(x):
            return strategy.run(lambda x: layer(x, training=True), (x,))
        step(shards(xs, sizes))
        ends = np.cumsum([0] + sizes)
        means = []
        for i in range(n):
            _, st, _ = mr.bn_forward(xs[ends[i]:ends[i + 1]].astype("float64"),
                                     mr.init_bn_state(C), decay=0.8, eps=1e-5)
            means.append(st.running_mean)
        want = np.mean(means, axis=0)
        return float(np.abs(np.asarray(layer.moving_mean) - want).max())

    out["mbn64"] = run("mbn", "float64", 0.0)
    out["bn64"] = run("bn", "float64", 0.0)
    out["mbn32_1e4"] = run("mbn", "float32", 1e4)
    out["bn32_1e4"] = run("bn", "float32", 1e4)
    out["keras32_1e4"] = keras_sync_bn("float32", 1e4)
    out["per_replica_bn"] = per_replica_bn()
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-replicas", "3-replicas"])
def replicas(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Run the script on ``n`` logical CPU devices; its JSON result."""
    n = request.param
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(n)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=root,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    assert result["replicas"] == n
    return result


@pytest.mark.parametrize("kind", ["mbn64", "bn64"])
def test_sync_float64_equals_the_core_on_the_concatenated_batch(
    replicas: dict[str, Any], kind: str
) -> None:
    """Three compiled steps (lam 0, 0.5, 0.9; momentum changing): one trace, core to 1e-12."""
    run = replicas[kind]
    print(kind, run)
    assert run["traces"] == 1
    for name, err in run["errors"].items():
        assert err < 1e-12, (name, err)


def test_sync_float32_mean_1e4_keeps_digits_where_keras_sync_bn_loses_them(
    replicas: dict[str, Any],
) -> None:
    """Data with mean 1e4 and unit spread in float32: the two-pass merge against E[x^2]-E[x]^2.

    The reference is the float64 core on the same float32 values. Ours (MBN and BN):
    outputs, gradients and statistics within 5e-3 of it (relative to each quantity's
    largest value): float32 holds 1e4 to about 1e-3 (its spacing there), which is where
    the mean and so every centered value are rounded. Keras' own synchronized BN: its
    float32 variance from ``E[x^2] - E[x]^2`` at 1e8 is off by whole units, so its
    outputs are off by orders of magnitude more.
    """
    print({k: replicas[k]["errors"] for k in ("mbn32_1e4", "bn32_1e4")})
    ours = max(max(replicas[k]["errors"].values()) for k in ("mbn32_1e4", "bn32_1e4"))
    keras_y = replicas["keras32_1e4"]["y"]
    print(
        f"float32, mean 1e4, {replicas['replicas']} replicas: "
        f"mbn_tf sync error {ours:.2e}, keras BatchNormalization(synchronized=True) "
        f"output error {keras_y:.2e}, its moving_variance error "
        f"{replicas['keras32_1e4']['moving_variance']:.2e}"
    )
    assert replicas["mbn32_1e4"]["traces"] == replicas["bn32_1e4"]["traces"] == 1
    assert ours < 5e-3
    assert keras_y > 100 * ours


def test_per_replica_statistics_average_over_replicas(replicas: dict[str, Any]) -> None:
    """``synchronized=False`` under the strategy: each replica's BN, moving stats averaged."""
    assert replicas["per_replica_bn"] < 1e-6
