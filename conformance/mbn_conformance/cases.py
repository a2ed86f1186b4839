"""The golden cases (docs/spec.md §10) and the seeded script that computes them from the core.

Regenerate the committed file with ``python -m mbn_conformance.cases`` (it rewrites
``data/golden_v2.npz``); ``tests/test_conformance_vectors.py`` regenerates it in memory and
checks that it is byte-identical to the committed one.

A case is built in two parts: :func:`draw_inputs` draws its inputs (``x``, ``dy``, the
affine parameters and the initial state) from a seed derived from its id, and
:func:`expectations` computes everything expected from those inputs and the case's metadata
with the core, in float64, under both running-variance estimators. :func:`build` chains the
two; :func:`recompute` and :func:`with_float32_hyperparameters` run the second part again on
a stored case's inputs, with the same code.

**Estimators.** Every case carries its expectations under the biased and the unbiased
estimator (except where the unbiased one is undefined: one value per channel). Only
``running_var`` and the evaluation step's ``y`` differ, which :func:`expectations` asserts
while building: the estimator is a convention the suite translates, not a reason to skip.

**Draws.** The float32 offset cases (``bn``, ``mbn``, ``sync`` and ``sync-mbn`` with
``offset`` data) are judged over several independent draws: their 5 training steps each draw
``x`` and ``dy`` anew from the same distribution (per-channel mean ``1e4 + U(-2, 2)``, unit
spread), and every offset case starts from a state already at the data's scale (its means
at ``1e4``), so that each step is one draw of the same scenario. Their metadata lists those
steps in ``"draws"`` (tag ``draws``; see :mod:`mbn_conformance.vectors`).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import zlib
from collections.abc import Iterator, Mapping
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
OFFSET = 1e4
"""The mean of ``offset`` data (and of an offset case's initial running and moving means)."""
FLOAT32_HYPERPARAMETERS = "float32-hyperparameters"
"""The tag of a case recomputed by :func:`with_float32_hyperparameters`."""


@dataclass(frozen=True)
class Spec:
    """How to build one case: everything but the arrays."""

    algorithm: str  # bn | dynamic_bn | cumulative | mbn | sync
    layout: str = "NCHW"
    n: int = 2
    dtype: str = "float64"
    eps: float = 1e-5
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
    def draws(self) -> tuple[int, ...]:
        """The steps that are independent draws: the training steps of float32 offset cases."""
        if self.data == "offset" and self.dtype == "float32":
            return tuple(range(TRAIN_STEPS))
        return ()

    @property
    def id(self) -> str:
        """The case id: the settings, ``/``-separated.

        Algorithm, layout, N, dtype and eps always; then MBN's decays and the settings that
        differ from their defaults. The running-variance estimator is not part of it: every
        case carries both.
        """
        parts = [
            self.algorithm + ("-mbn" if self.mbn_sync else ""),
            self.layout,
            f"N{self.n}",
            self.dtype,
            f"eps{self.eps:g}",
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
    """The specs of docs/spec.md §10's grid of golden cases, each distinct scenario once.

    Layouts, N in {0, 1, 2, 3, 64}, eps in {1e-5, 1e-3, 0.5}, lam in {0, 0.5, 0.9375, 1},
    trajectories under schedules, a zero-variance channel, offset data, unequal and empty
    shards, float16/32/64. Every case carries both running-variance estimators.
    Synchronized statistics are checked on data near 0 with empty shards (1-0-4, 0-2-0-5),
    on equal shards (3-3), and on offset data in float32 and float64 over unequal non-empty
    shards (1-3-2, 3-1-2), so that an empty-shard bug and a raw-moments merge are each
    caught by a case of their own.
    """
    for layout in SHAPES:
        for n in (2, 3):
            yield Spec("bn", layout, n)
        yield Spec("mbn", layout, 2, lam=0.5, init="random")
    for eps in (1e-3, 0.5):
        yield Spec("bn", "NCHW", 2, eps=eps)
        yield Spec("mbn", "NCHW", 2, eps=eps, lam=0.5)
    for lam in (0.0, 0.5, 0.9375, 1.0):
        yield Spec("mbn", "NCHW", 3, lam=lam, init="random")
        yield Spec("mbn", "NC", 3, lam=lam, init="random")
    yield Spec("mbn", "NCHW", 2, lam="eq11", tau="eq12")
    yield Spec("cumulative", "NCHW", 2, decay=None)
    yield Spec("bn", "NC", 64)
    yield Spec("bn", "NC", 64, affine=False)
    yield Spec("sync", "NCL", 5, shards=(1, 0, 4))
    yield Spec("sync", "NC", 7, shards=(0, 2, 0, 5), mbn_sync=True, lam=0.5, init="random")
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
        yield Spec("bn", "NHWC", 2, dtype=dtype)
        yield Spec("mbn", "NCHW", 3, dtype=dtype, lam=0.5, init="random")
        yield Spec("mbn", "NC", 2, dtype=dtype, lam="eq11", tau="eq12")
        yield Spec("dynamic_bn", "NCL", 2, dtype=dtype, decay="linear")
    for dtype in ("float64", "float32"):
        yield Spec("bn", "NCHW", 3, dtype=dtype, data="offset")
        yield Spec("mbn", "NCHW", 3, dtype=dtype, lam=0.5, data="offset")
        yield Spec("sync", "NCHW", 6, dtype=dtype, shards=(1, 3, 2), data="offset")
        yield Spec(
            "sync", "NCHW", 6, dtype=dtype, shards=(3, 1, 2), mbn_sync=True, lam=0.5, data="offset"
        )
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


def _quantize(a: np.ndarray) -> np.ndarray:
    """Round to multiples of 1/256: exact in float32 and float64, and compressible."""
    return np.round(a * 256) / 256


def _reference_namespace() -> Any:
    """The namespace the expected values are computed in: ``array-api-strict``.

    Its reductions are NumPy's own pairwise sums (no BLAS), so the bits do not depend on the
    machine's BLAS kernel, and it proves the vectors come from the portable core. Where it
    is not installed (the ``conformance`` extra alone), :func:`recompute` and
    :func:`with_float32_hyperparameters` fall back to NumPy, whose results agree to within
    rounding (far inside every tolerance) but not bit for bit; :func:`generate` refuses to.
    """
    try:
        import array_api_strict
    except ImportError:
        return importlib.import_module("array_api_compat.numpy")
    return array_api_strict


@dataclass(frozen=True)
class Inputs:
    """What a case's expectations are computed from: exactly what the file stores as inputs.

    Attributes
    ----------
    gamma, beta : ndarray or None
        The affine parameters in the case's dtype (``None`` in affine-free cases).
    init : dict of str to ndarray
        The initial state's float fields (:data:`vectors.FLOAT_FIELDS`), float64; the
        counter starts at 0.
    x, dy : list of ndarray
        Each step's whole-batch input and output gradient in the case's dtype (``dy`` is
        zeros at evaluation steps).
    """

    gamma: np.ndarray | None
    beta: np.ndarray | None
    init: dict[str, np.ndarray]
    x: list[np.ndarray]
    dy: list[np.ndarray]


def _draw_x(spec: Spec, rng: np.random.Generator, shape: tuple[int, ...], axis: int) -> np.ndarray:
    c = shape[axis]
    cs = [1] * len(shape)
    cs[axis] = c
    loc = rng.uniform(-2, 2, size=c).reshape(cs)
    scale = rng.uniform(0.5, 3, size=c).reshape(cs)
    if spec.data == "offset":
        loc = loc + OFFSET
        scale = np.ones_like(scale)
    x = _quantize(loc + scale * rng.standard_normal(shape))
    if spec.data == "zero_var_channel":
        idx: list[slice | int] = [slice(None)] * len(shape)
        idx[axis] = 0
        x[tuple(idx)] = 1.25
    return x.astype(spec.dtype)


def draw_inputs(spec: Spec) -> Inputs:
    """The case's inputs, drawn from a generator seeded by its id.

    An ``offset`` case's initial running (and moving) means are :data:`OFFSET`, the scale of
    its data, so its steps are alike (see the module docstring).
    """
    rng = np.random.default_rng(_seed(spec))
    rest, axis = SHAPES[spec.layout]
    shape = (spec.n, *rest)
    c = shape[axis]
    gamma = beta = None
    if spec.affine:
        gamma = rng.uniform(0.5, 1.5, size=c).astype(spec.dtype)
        beta = rng.uniform(-1, 1, size=c).astype(spec.dtype)
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
    if spec.data == "offset":
        for f in ("running_mean", "moving_mean"):
            init[f] = init[f] + OFFSET
    xs, dys = [], []
    for k in range(TRAIN_STEPS + 1):
        xs.append(_draw_x(spec, rng, shape, axis))
        dy = _quantize(rng.standard_normal(shape)).astype(spec.dtype)
        dys.append(dy if k < TRAIN_STEPS else np.zeros_like(dy))
    fields = vectors.FLOAT_FIELDS[spec.kind]
    return Inputs(gamma, beta, {f: init[f].astype(np.float64) for f in fields}, xs, dys)


def stored_inputs(case: vectors.Case) -> Inputs:
    """The inputs a stored case holds (shards joined along the first axis)."""
    steps = range(len(case.steps))

    def whole(name: str, k: int) -> np.ndarray:
        n = case.num_shards
        if n is None:
            return case.array(name, k)
        return np.concatenate([case.array(name, k, s) for s in range(n)])

    gamma, beta = case.params()
    init = case.init_state()
    init.pop(vectors.COUNT_FIELD)
    return Inputs(
        gamma, beta, init, [whole("x", k) for k in steps], [whole("dy", k) for k in steps]
    )


def _estimators(shape: tuple[int, ...], axis: int) -> list[str]:
    """Both estimators, or only the biased one where it alone is defined.

    One value per channel leaves the unbiased variance undefined (docs/spec.md §9).
    """
    m = math.prod(shape) // shape[axis]
    return ["biased"] if m == 1 else ["biased", "unbiased"]


def _trajectory(meta: Mapping[str, Any], inputs: Inputs, estimator: str) -> dict[str, list[Any]]:
    """Run the core over the case's steps under ``estimator``: per-step float64 results.

    Returns rows ``y``, ``dx`` (whole batch, or a list of per-shard arrays in sync cases),
    ``dgamma``, ``dbeta`` and ``state/<field>``.
    """
    xs = _reference_namespace()
    kind = vectors.kind_of(meta["algorithm"])
    axis = meta["axis"]
    shards = meta["shards"]
    c = meta["shape"][axis]
    f64 = np.float64
    g64 = None if inputs.gamma is None else xs.asarray(inputs.gamma.astype(f64))
    b64 = None if inputs.beta is None else xs.asarray(inputs.beta.astype(f64))
    state: Any
    init = {f: xs.asarray(v) for f, v in inputs.init.items()}
    count = xs.asarray(0, dtype=xs.int64)
    if kind == "mbn":
        moving = (init["moving_mean"], init["moving_var"])
        state = mr.MBNState(*moving, init["running_mean"], init["running_var"], count)
    else:
        state = mr.BNState(init["running_mean"], init["running_var"], count)
    forward = mr.mbn_forward if kind == "mbn" else mr.bn_forward
    sync: Any = distributed.sync_mbn_forward if kind == "mbn" else distributed.sync_bn_forward
    bounds = None if shards is None else np.cumsum((0, *shards))
    rows: dict[str, list[Any]] = {}
    zeros = np.zeros(c)
    for step, x, dy in zip(meta["steps"], inputs.x, inputs.dy, strict=True):
        x64, dy64 = xs.asarray(x.astype(f64)), xs.asarray(dy.astype(f64))
        kw: dict[str, Any] = {"eps": meta["eps"], "axis": axis, "estimator": estimator}
        if kind == "mbn":
            kw.update(lam=step["lam"], tau=step["tau"])
        else:
            kw.update(decay=step["decay"])
        dg: Any
        db: Any
        if not step["training"]:
            y, state, _ = forward(x64, state, g64, b64, training=False, **kw)
            dx, dg, db = np.zeros(x.shape), zeros, zeros  # evaluation: no gradient rows
        elif bounds is None:
            y, state, ctx = forward(x64, state, g64, b64, **kw)
            dx, dg, db = mr.mbn_backward(dy64, ctx)
        else:
            split = [slice(a, b) for a, b in itertools.pairwise(bounds)]
            ys, states, ctxs = sync([x64[sl, ...] for sl in split], state, g64, b64, **kw)
            state = states[0]
            dxs, dg, db = distributed.sync_backward([dy64[sl, ...] for sl in split], ctxs)
            y, dx = xs.concat(ys), xs.concat(dxs)
        rows.setdefault("y", []).append(np.asarray(y, dtype=f64))
        rows.setdefault("dx", []).append(np.asarray(dx, dtype=f64))
        rows.setdefault("dgamma", []).append(zeros if dg is None else np.asarray(dg, dtype=f64))
        rows.setdefault("dbeta", []).append(zeros if db is None else np.asarray(db, dtype=f64))
        for name, v in zip(type(state)._fields, state, strict=True):
            dt = np.int64 if name == vectors.COUNT_FIELD else f64
            rows.setdefault(f"state/{name}", []).append(np.asarray(v, dtype=dt))
    return rows


def _check_estimator_claim(
    meta: Mapping[str, Any], biased: Mapping[str, list[Any]], other: Mapping[str, list[Any]]
) -> None:
    """``AssertionError`` unless the estimator changes only ``running_var`` and eval ``y``.

    Training outputs and gradients never depend on the running-variance estimator (BN
    normalizes with the batch, MBN with its moving statistics, which are always biased):
    that is what lets every case carry both estimators with one stored trajectory. An
    explicit raise, not ``assert``, so that it holds under ``python -O`` too.
    """
    for name, rows in biased.items():
        if name == "state/running_var":
            continue
        for k, (a, b) in enumerate(zip(rows, other[name], strict=True)):
            if name == "y" and not meta["steps"][k]["training"]:
                continue
            if not np.array_equal(a, b):
                raise AssertionError(
                    f"{meta['id']}: step {k} {name} depends on the running-variance estimator"
                )


def expectations(meta: Mapping[str, Any], inputs: Inputs) -> dict[str, np.ndarray]:
    """Every stored array of a case (unprefixed names), computed by the core from ``inputs``.

    The trajectory is run under each estimator of ``meta["estimators"]``; the biased one
    gives the stored expectations and the unbiased one its ``running_var@unbiased`` and
    ``y@unbiased`` rows, after :func:`_check_estimator_claim` has shown the rest identical.
    """
    kind = vectors.kind_of(meta["algorithm"])
    runs = {est: _trajectory(meta, inputs, est) for est in meta["estimators"]}
    biased = runs["biased"]
    shards = meta["shards"]
    bounds = None if shards is None else np.cumsum((0, *shards))
    evaluations = [k for k, s in enumerate(meta["steps"]) if not s["training"]]
    arrays: dict[str, np.ndarray] = {}

    def put(name: str, rows: list[np.ndarray], dtype: Any, suffix: str = "") -> None:
        """Stack whole-batch rows, split per shard in sync cases."""
        full = np.stack(rows).astype(dtype)
        if bounds is None:
            arrays[name + suffix] = full
            return
        for s, (a, b) in enumerate(itertools.pairwise(bounds)):
            arrays[f"{name}{s}{suffix}"] = full[:, a:b]

    dtype = np.dtype(meta["dtype"])
    put("x", inputs.x, dtype)
    put("dy", inputs.dy, dtype)
    put("y", biased["y"], np.float64)
    put("dx", biased["dx"], np.float64)
    for est, run in runs.items():
        if est == "biased":
            continue
        _check_estimator_claim(meta, biased, run)
        put("y", [run["y"][k] for k in evaluations], np.float64, f"@{est}")
        arrays[f"running_var@{est}"] = np.stack(run["state/running_var"])
    arrays["dgamma"] = np.stack(biased["dgamma"])
    arrays["dbeta"] = np.stack(biased["dbeta"])
    for name, rows in biased.items():
        if name.startswith("state/"):
            arrays[name] = np.stack(rows)
    for f, v in inputs.init.items():
        arrays[f"init/{f}"] = np.asarray(v, dtype=np.float64)
    arrays[f"init/{vectors.COUNT_FIELD}"] = np.asarray(0, dtype=np.int64)
    if inputs.gamma is not None and inputs.beta is not None:
        arrays["gamma"], arrays["beta"] = inputs.gamma, inputs.beta
    return vectors.pack(arrays, kind)


def _meta(spec: Spec) -> dict[str, Any]:
    rest, axis = SHAPES[spec.layout]
    shape = (spec.n, *rest)
    steps = [_step_params(spec, k) for k in range(TRAIN_STEPS)]
    steps.append({"training": False, "decay": None, "lam": 0.0, "tau": None})
    draws = list(spec.draws)
    return {
        "id": spec.id,
        "algorithm": spec.algorithm if not spec.mbn_sync else "sync_mbn",
        "layout": spec.layout,
        "shape": list(shape),
        "axis": axis,
        "dtype": spec.dtype,
        "eps": spec.eps,
        "estimators": _estimators(shape, axis),
        "affine": spec.affine,
        "shards": None if spec.shards is None else list(spec.shards),
        "tags": sorted({spec.data, spec.init, *spec.tags, *(["draws"] if draws else [])}),
        "draws": draws,
        "steps": steps,
    }


def build(spec: Spec) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One case's manifest entry and arrays (prefixed by its id), expected values in float64."""
    meta = _meta(spec)
    arrays = expectations(meta, draw_inputs(spec))
    return meta, {f"{spec.id}/{k}": v for k, v in arrays.items()}


def recompute(case: vectors.Case, meta: Mapping[str, Any] | None = None) -> vectors.Case:
    """The case with every expectation recomputed from its stored inputs.

    Parameters
    ----------
    case : Case
        A stored case.
    meta : mapping, optional
        The metadata to recompute under (default: the case's own, which gives back the
        stored arrays bit for bit).

    Returns
    -------
    Case
        A validated case holding ``case``'s inputs and the recomputed expectations.
    """
    new_meta = json.loads(json.dumps(case.meta if meta is None else meta))
    out = vectors.Case(new_meta, expectations(new_meta, stored_inputs(case)))
    vectors.validate_case_arrays(out)
    return out


def _float32(value: float) -> float:
    return float(np.float32(value))


def with_float32_hyperparameters(case: vectors.Case) -> vectors.Case:
    """The same case with its decays and ``eps`` rounded to float32, expectations recomputed.

    An implementation that holds its hyper-parameters in 32 bits (ONNX's ``momentum`` and
    ``epsilon`` attributes) is compared with this case: its steps carry the float32-rounded
    ``decay``, ``lam``, ``tau`` and ``eps`` (as Python floats), and every expectation is
    computed by the core from the case's stored inputs with those values, in float64
    otherwise, by the same code as :func:`build`. The id is unchanged (known-failure
    patterns still apply); the tag :data:`FLOAT32_HYPERPARAMETERS` is added.

    Parameters
    ----------
    case : Case
        A stored case.

    Returns
    -------
    Case
        The recomputed case.

    Examples
    --------
    >>> case = next(c for c in vectors.read() if c.id == "bn/NC/N2/float64/eps1e-05")
    >>> c32 = with_float32_hyperparameters(case)
    >>> c32.id == case.id, c32.step(0, "biased").decay, c32.step(0, "biased").eps
    (True, 0.8999999761581421, 9.999999747378752e-06)
    >>> a = case.expected_state(4, estimator="biased")["running_mean"]
    >>> b = c32.expected_state(4, estimator="biased")["running_mean"]
    >>> float(abs(a - b).max())          # the decays differ by 2.4e-8
    1.047720389335538e-07
    """
    meta = json.loads(json.dumps(case.meta))
    meta["eps"] = _float32(meta["eps"])
    for step in meta["steps"]:
        for key in ("decay", "lam", "tau"):
            if step[key] is not None:
                step[key] = _float32(step[key])
    meta["tags"] = sorted({*meta["tags"], FLOAT32_HYPERPARAMETERS})
    return recompute(case, meta)


def generate() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The whole golden set: manifest and arrays.

    Raises
    ------
    ImportError
        ``array-api-strict`` is not installed: without it the bits would depend on the
        machine's BLAS (see :func:`_reference_namespace`).
    """
    try:
        import array_api_strict  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "regenerating the golden vectors needs array-api-strict, whose reductions make "
            "the bits machine-independent: pip install -e '.[test]'"
        ) from exc
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
