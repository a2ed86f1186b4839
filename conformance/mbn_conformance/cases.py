"""The golden cases (docs/spec.md §10) and the seeded script that computes them from the core.

Regenerate the committed file with ``python -m mbn_conformance.cases`` (it rewrites
``data/golden_v1.npz``); ``tests/test_conformance_vectors.py`` regenerates it in memory
and checks that every array is bit-identical to the committed one.
"""

from __future__ import annotations

import argparse
import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import mbn_ref as mr
from mbn_ref import distributed, schedules

from . import vectors

SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    # layout: (shape without N, channel axis)
    "NC": ((4,), 1),
    "NCL": ((3, 5), 1),
    "NCHW": ((3, 2, 3), 1),
    "NCDHW": ((2, 2, 3, 2), 1),
    "NHWC": ((2, 3, 3), -1),
}
TRAIN_STEPS = 5


@dataclass(frozen=True)
class Spec:
    """How to build one case: everything but the arrays."""

    algorithm: str  # bn | dynamic_bn | cumulative | mbn | sync
    layout: str = "NCHW"
    n: int = 2
    dtype: str = "float64"
    eps: float = 1e-5
    estimator: str = "biased"
    affine: bool = True
    lam: float | str = 0.0  # a number, or "eq11" for the paper's schedule over the steps
    tau: float | str | None = 0.9  # a number, None (cumulative) or "eq12"
    decay: float | str | None = 0.9  # a number, None (cumulative) or "linear"
    shards: tuple[int, ...] | None = None
    mbn_sync: bool = False
    data: str = "normal"  # normal | offset | zero_var_channel
    init: str = "default"  # default | random
    tags: tuple[str, ...] = field(default=())

    @property
    def kind(self) -> str:
        """``"mbn"`` for MBN and synchronized MBN cases, else ``"bn"``."""
        return "mbn" if self.algorithm == "mbn" or self.mbn_sync else "bn"

    @property
    def id(self) -> str:
        """The case id: the settings, ``/``-separated.

        Algorithm, layout, N, dtype, eps and estimator always; then MBN's decays and the
        settings that differ from their defaults.
        """
        parts = [
            self.algorithm + ("-mbn" if self.mbn_sync else ""),
            self.layout,
            f"N{self.n}",
            self.dtype,
            f"eps{self.eps:g}",
            self.estimator,
        ]
        if self.kind == "mbn":
            parts.append(f"lam{self.lam}" + (f"-tau{self.tau}" if self.tau != 0.9 else ""))
        elif self.algorithm == "bn" and self.decay != 0.9:
            parts.append(f"decay{self.decay}")
        if self.shards is not None:
            parts.append("shards" + "-".join(map(str, self.shards)))
        if not self.affine:
            parts.append("noaffine")
        if self.data != "normal":
            parts.append(self.data)
        if self.init != "default":
            parts.append("init-" + self.init)
        return "/".join(parts)


def specs() -> Iterator[Spec]:
    """The specs of docs/spec.md §10's grid of golden cases.

    Layouts, N in {1, 2, 3, 64}, eps in {1e-5, 1e-3, 0.5}, lam in {0, 0.5, 0.9375, 1},
    trajectories under schedules, a zero-variance channel, offset data, unequal and empty
    shards, float16/32/64. Training outputs do not depend on the running-variance estimator,
    so the unbiased estimator gets the cases where the running variance is read back
    (evaluation steps and state) in every algorithm, not the whole grid.
    """
    for layout in SHAPES:
        for n in (2, 3):
            yield Spec("bn", layout, n)
        yield Spec("mbn", layout, 2, lam=0.5, init="random")
        yield Spec("bn", layout, 2, estimator="unbiased")
    for eps in (1e-3, 0.5):
        yield Spec("bn", "NCHW", 2, eps=eps)
        yield Spec("mbn", "NCHW", 2, eps=eps, lam=0.5)
    for lam in (0.0, 0.5, 0.9375, 1.0):
        yield Spec("mbn", "NCHW", 3, lam=lam, init="random")
        yield Spec("mbn", "NC", 3, lam=lam, init="random", estimator="unbiased")
    for est in ("biased", "unbiased"):
        yield Spec("mbn", "NCHW", 2, estimator=est, lam="eq11", tau="eq12")
        yield Spec("cumulative", "NCHW", 2, estimator=est, decay=None)
        yield Spec("bn", "NC", 64, estimator=est, affine=est == "biased")
        yield Spec("sync", "NCL", 5, estimator=est, shards=(1, 0, 4))
        yield Spec(
            "sync",
            "NC",
            7,
            estimator=est,
            shards=(0, 2, 0, 5),
            mbn_sync=True,
            lam=0.5,
            init="random",
        )
    yield Spec("mbn", "NC", 2, lam="eq11", tau="eq12")
    yield Spec("mbn", "NCHW", 2, lam=0.5, tau=None)
    yield Spec("dynamic_bn", "NCHW", 2, decay="linear")
    yield Spec("mbn", "NC", 64, lam=0.9375)
    yield Spec("bn", "NCHW", 1)  # N = 1, but 6 values per channel
    yield Spec("mbn", "NC", 1, lam=0.5, init="random")  # m = 1: history normalizes it
    yield Spec("bn", "NCHW", 0, init="random")  # N = 0: empty output, state unchanged
    yield Spec("mbn", "NC", 0, lam=0.5, init="random")
    yield Spec("bn", "NCHW", 2, data="zero_var_channel")
    yield Spec("mbn", "NCHW", 2, lam=0.5, data="zero_var_channel")
    yield Spec("bn", "NCHW", 2, decay=0.0)
    yield Spec("bn", "NCHW", 2, decay=1.0, init="random")
    yield Spec("sync", "NCHW", 6, shards=(3, 3))
    for dtype in ("float32", "float16"):
        yield Spec("bn", "NCHW", 3, dtype=dtype)
        yield Spec("bn", "NHWC", 2, dtype=dtype, estimator="unbiased")
        yield Spec("mbn", "NCHW", 3, dtype=dtype, lam=0.5, init="random")
        yield Spec("mbn", "NC", 2, dtype=dtype, lam="eq11", tau="eq12", estimator="unbiased")
        yield Spec("dynamic_bn", "NCL", 2, dtype=dtype, decay="linear")
    for dtype in ("float64", "float32"):
        yield Spec("bn", "NCHW", 3, dtype=dtype, data="offset")
        yield Spec("mbn", "NCHW", 3, dtype=dtype, lam=0.5, data="offset", estimator="unbiased")
    yield Spec("bn", "NCHW", 2, affine=False)
    yield Spec("mbn", "NHWC", 2, affine=False, lam=0.5)


def _step_params(spec: Spec, k: int) -> dict[str, Any]:
    """The decays of training step ``k`` (0-indexed)."""
    total = TRAIN_STEPS
    if spec.lam == "eq11":  # per-step use of Eq. 11 with T = the trajectory's length
        lam = schedules.mbn_lambda(
            k + 1, total_epochs=total, batch_size=spec.n, ideal_batch_size=32
        )
    else:
        lam = float(spec.lam)
    tau: float | None
    if spec.tau == "eq12":
        tau = schedules.mbn_tau(batch_size=spec.n, ideal_batch_size=32, tau0=0.85)
    else:
        tau = None if spec.tau is None else float(spec.tau)
    decay: float | None
    if spec.decay == "linear":
        decay = schedules.linear(0.5, 0.99, total - 1)(k)
    else:
        decay = None if spec.decay is None else float(spec.decay)
    return {"training": True, "decay": decay, "lam": lam, "tau": tau}


def _seed(spec: Spec) -> int:
    return zlib.crc32(spec.id.encode())


def _inputs(spec: Spec, rng: np.random.Generator, shape: tuple[int, ...], axis: int) -> np.ndarray:
    c = shape[axis]
    cs = [1] * len(shape)
    cs[axis] = c
    loc = rng.uniform(-2, 2, size=c).reshape(cs)
    scale = rng.uniform(0.5, 3, size=c).reshape(cs)
    if spec.data == "offset":
        loc = loc + 1e4
        scale = np.ones_like(scale)
    x = _quantize(loc + scale * rng.standard_normal(shape))
    if spec.data == "zero_var_channel":
        idx: list[slice | int] = [slice(None)] * len(shape)
        idx[axis] = 0
        x[tuple(idx)] = 1.25
    return x.astype(spec.dtype)


def _reference_namespace() -> Any:
    """The namespace the expected values are computed in: ``array-api-strict``.

    Its reductions are NumPy's own pairwise sums (no BLAS), so the bits do not depend on the
    machine's BLAS kernel, and it proves the vectors come from the portable core.
    """
    import array_api_strict

    return array_api_strict


def _quantize(a: np.ndarray) -> np.ndarray:
    """Round to multiples of 1/256: exact in float32 and float64, and compressible."""
    return np.round(a * 256) / 256


def build(spec: Spec) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One case's manifest entry and arrays, expected values from the core in float64."""
    rng = np.random.default_rng(_seed(spec))
    rest, axis = SHAPES[spec.layout]
    shape = (spec.n, *rest)
    c = shape[axis]
    arrays: dict[str, np.ndarray] = {}
    gamma = beta = None
    if spec.affine:
        gamma = rng.uniform(0.5, 1.5, size=c).astype(spec.dtype)
        beta = rng.uniform(-1, 1, size=c).astype(spec.dtype)
        arrays["gamma"], arrays["beta"] = gamma, beta
    xs = _reference_namespace()
    g64 = None if gamma is None else xs.asarray(gamma.astype(np.float64))
    b64 = None if beta is None else xs.asarray(beta.astype(np.float64))

    fields = (*vectors.FLOAT_FIELDS[spec.kind], vectors.COUNT_FIELD)
    init = {
        "running_mean": np.zeros(c),
        "running_var": np.ones(c),
        "moving_mean": np.zeros(c),
        "moving_var": np.ones(c),
    }
    if spec.init == "random":
        for f in ("running_mean", "moving_mean"):
            init[f] = rng.uniform(-1, 1, size=c)
        for f in ("running_var", "moving_var"):
            init[f] = rng.uniform(0.5, 2, size=c)
    for f in fields:
        arrays[f"init/{f}"] = (
            np.asarray(0, dtype=np.int64)
            if f == "num_batches_tracked"
            else init[f].astype(np.float64)
        )
    state: Any
    if spec.kind == "mbn":
        state = mr.MBNState(
            xs.asarray(init["moving_mean"]),
            xs.asarray(init["moving_var"]),
            xs.asarray(init["running_mean"]),
            xs.asarray(init["running_var"]),
            xs.asarray(0, dtype=xs.int64),
        )
    else:
        state = mr.BNState(
            xs.asarray(init["running_mean"]),
            xs.asarray(init["running_var"]),
            xs.asarray(0, dtype=xs.int64),
        )

    steps = [_step_params(spec, k) for k in range(TRAIN_STEPS)]
    steps.append({"training": False, "decay": None, "lam": 0.0, "tau": None})
    bounds = np.cumsum((0, *(spec.shards or (spec.n,))))
    rows: dict[str, list[np.ndarray]] = {}

    def put(name: str, full: np.ndarray) -> None:
        """Record a full-batch array, split per shard in sync cases."""
        if spec.shards is None:
            rows.setdefault(name, []).append(full)
            return
        for s, (a, b) in enumerate(itertools.pairwise(bounds)):
            rows.setdefault(f"{name}{s}", []).append(full[a:b])

    for step in steps:
        x = _inputs(spec, rng, shape, axis)
        dy = _quantize(rng.standard_normal(shape)).astype(spec.dtype)
        x64, dy64 = xs.asarray(x.astype(np.float64)), xs.asarray(dy.astype(np.float64))
        kw: dict[str, Any] = {"eps": spec.eps, "axis": axis, "estimator": spec.estimator}
        if spec.kind == "mbn":
            kw.update(lam=step["lam"], tau=step["tau"])
        else:
            kw.update(decay=step["decay"])
        forward = mr.mbn_forward if spec.kind == "mbn" else mr.bn_forward
        zeros = np.zeros(c)
        dg: Any
        db: Any
        if not step["training"]:
            y, state, _ = forward(x64, state, g64, b64, training=False, **kw)
            dy64 = xs.zeros(shape, dtype=xs.float64)
            dx, dg, db = dy64, zeros, zeros  # evaluation: no gradient rows
        elif spec.shards is None:
            y, state, ctx = forward(x64, state, g64, b64, **kw)
            dx, dg, db = mr.mbn_backward(dy64, ctx)
        else:
            sync: Any = (
                distributed.sync_mbn_forward
                if spec.kind == "mbn"
                else (distributed.sync_bn_forward)
            )
            split = [slice(a, b) for a, b in itertools.pairwise(bounds)]
            ys, states, ctxs = sync([x64[sl, ...] for sl in split], state, g64, b64, **kw)
            state = states[0]
            dxs, dg, db = distributed.sync_backward([dy64[sl, ...] for sl in split], ctxs)
            y, dx = xs.concat(ys), xs.concat(dxs)
        put("x", x)
        put("dy", np.asarray(dy64).astype(spec.dtype))
        put("y", np.asarray(y))
        put("dx", np.asarray(dx))
        rows.setdefault("dgamma", []).append(zeros if dg is None else np.asarray(dg))
        rows.setdefault("dbeta", []).append(zeros if db is None else np.asarray(db))
        for f, v in zip(type(state)._fields, state, strict=True):
            dt = np.int64 if f == "num_batches_tracked" else np.float64
            rows.setdefault(f"state/{f}", []).append(np.asarray(v, dtype=dt))
    for name, values in rows.items():
        arrays[name] = np.stack(values)
    arrays = vectors.pack(arrays, spec.kind)
    meta = {
        "id": spec.id,
        "algorithm": spec.algorithm if not spec.mbn_sync else "sync_mbn",
        "layout": spec.layout,
        "shape": list(shape),
        "axis": axis,
        "dtype": spec.dtype,
        "eps": spec.eps,
        "estimator": spec.estimator,
        "affine": spec.affine,
        "shards": None if spec.shards is None else list(spec.shards),
        "tags": sorted({spec.data, spec.init, *spec.tags}),
        "steps": steps,
    }
    return meta, {f"{spec.id}/{k}": v for k, v in arrays.items()}


def generate() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The whole golden set: manifest and arrays."""
    cases, arrays = [], {}
    for spec in specs():
        meta, arr = build(spec)
        cases.append(meta)
        arrays.update(arr)
    manifest = {
        "format": vectors.FORMAT,
        "version": vectors.VERSION,
        "generator": {
            "script": "python -m mbn_conformance.cases",
            "core": mr.__version__,
            "train_steps": TRAIN_STEPS,
        },
        "cases": cases,
    }
    return manifest, arrays


def main(argv: list[str] | None = None) -> int:
    """Regenerate the golden vector file (``--out``, default the packaged one); exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=vectors.DEFAULT_PATH)
    args = parser.parse_args(argv)
    manifest, arrays = generate()
    vectors.write(args.out, manifest, arrays)
    print(f"wrote {len(manifest['cases'])} cases to {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
