"""Properties every BN/MBN implementation must hold, checked with hypothesis through an Adapter.

The golden vectors check fixed points; these check laws over many small random inputs in the
shapes, layouts, dtypes and estimators the adapter declares (its :class:`Capabilities`):

``bn_affine_invariance``
    BN's training output is unchanged by ``x -> a*x + b`` (``a > 0``) when ``eps`` becomes
    ``a**2 * eps``; ``dx`` scales by ``1/a``, ``dgamma``/``dbeta`` are unchanged.
``bn_normalized_moments``
    BN without affine parameters outputs, per channel, mean 0 and biased variance
    ``var/(var + eps)`` (``var`` the batch's biased variance; a constant channel gives 0).
``mbn_lam0_is_bn``
    MBN with ``lam = 0`` (and ``tau`` equal to BN's decay) equals BN: outputs, gradients,
    inference statistics and count; its moving statistics become the batch's.
``mbn_lam1_uses_history``
    MBN with ``lam = 1`` normalizes with the previous moving statistics and leaves them
    unchanged (no gradient flows into the batch statistics); the inference statistics are
    still updated with ``tau``.
``backward_finite_differences``
    ``backward`` agrees with central finite differences of the adapter's own forward, along
    random directions, for the loss ``sum(dy * y)`` (float64 adapters only).
``bn_dx_sums_to_zero``
    BN's ``dx`` sums to zero over every channel (the output does not move when ``x`` shifts).
``sync_shard_equivalence``
    ``sync_train_step`` over a random partition along N (unequal sizes, empty shards) equals
    the adapter's own ``train_step`` on the concatenated batch: outputs, gradients, state.

Each property is a function ``check(adapter, settings=None)`` that raises ``AssertionError``
(with hypothesis' falsifying example) when the law fails; :func:`run` turns them into
:class:`~mbn_conformance.runner.CaseResult` rows with ids ``property/<name>``, for the CLI.

Inputs are drawn in float64 when the adapter declares it, else float32 (else float16), and
compared with the suite's tolerance table (:mod:`mbn_conformance.tolerances`), widened only
where a property says why. Data come from a NumPy generator seeded by hypothesis, so a run
under a derandomized profile is reproducible.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import tolerances
from .protocol import Adapter, SyncAdapter
from .runner import CaseResult

PROFILE = "mbn-conformance"
"""The hypothesis profile the properties run under unless given other settings."""

settings.register_profile(
    PROFILE,
    max_examples=25,
    deadline=None,
    database=None,  # never write a .hypothesis/ directory into the user's working directory
    print_blob=True,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def default_settings() -> settings:
    """The ``mbn-conformance`` profile, derandomized when the environment variable ``CI`` is set.

    ``CI`` is read at call time, so a CI job gets the same examples on every run.
    """
    return settings(settings.get_profile(PROFILE), derandomize=bool(os.environ.get("CI")))


PREFIX = "property/"

# layout -> (number of spatial axes, channel axis); N is always axis 0
_LAYOUTS: dict[str, tuple[int, int]] = {
    "NC": (0, 1),
    "NCL": (1, 1),
    "NCHW": (2, 1),
    "NCDHW": (3, 1),
    "NHWC": (2, -1),
}
_EPS = (1e-5, 1e-3, 0.1, 0.5)

FD_STEP = 1e-5
"""Central-difference step along a unit direction (inputs have per-channel std in [0.5, 3])."""
FD_RTOL = 1e-6
"""Finite differences pass when ``|fd - g.v| <= FD_RTOL * (1 + |g|) + 8 * 2**-52 * S / h``:
truncation ``O(h**2)`` is ~1e-9 for these inputs, and ``S = sum |dy * y|`` bounds the rounding
of the loss, which the quotient divides by ``h``."""


# -- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """Inputs of one example: a few steps of ``(x, dy)`` of one shape, and the parameters."""

    layout: str
    shape: tuple[int, ...]
    axis: int
    dtype: str
    eps: float
    estimator: str
    xs: tuple[np.ndarray, ...]
    dys: tuple[np.ndarray, ...]
    gamma: np.ndarray | None
    beta: np.ndarray | None
    seed: int

    @property
    def channels(self) -> int:
        """The number of channels C (the size along ``axis``)."""
        return self.shape[self.axis]

    @property
    def m(self) -> int:
        """Values per channel."""
        return math.prod(self.shape) // self.channels

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        """Every axis but the channel axis: the axes statistics are reduced over."""
        ax = self.axis % len(self.shape)
        return tuple(i for i in range(len(self.shape)) if i != ax)

    def per_channel(self, a: np.ndarray) -> np.ndarray:
        """Broadcast a ``(C,)`` vector against the batch."""
        shape = [1] * len(self.shape)
        shape[self.axis] = self.channels
        return np.asarray(a, dtype=np.float64).reshape(shape)

    def moments(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and biased variance, in float64."""
        x64 = np.asarray(x, dtype=np.float64)
        return x64.mean(axis=self.reduce_axes), x64.var(axis=self.reduce_axes)


def property_dtype(adapter: Adapter) -> str:
    """float64 if declared, else float32, else float16."""
    for dt in ("float64", "float32", "float16"):
        if dt in adapter.capabilities.dtypes:
            return dt
    raise ValueError(f"{adapter.name} declares no floating dtype")


def _quantize(a: np.ndarray) -> np.ndarray:
    return np.round(a * 256) / 256


@st.composite
def batches(
    draw: st.DrawFn,
    adapter: Adapter,
    *,
    steps: int = 1,
    min_m: int = 2,
    affine: bool | None = None,
    constant_channel: bool = True,
) -> Batch:
    """Small batches in the adapter's declared layouts and estimators.

    ``affine=None`` draws it (when affine parameters are optional); ``affine=False`` gives
    unit scale and zero shift arrays if the adapter cannot omit them. ``min_m`` values per
    channel at least; ``constant_channel`` allows a zero-variance channel.
    """
    caps = adapter.capabilities
    layout = draw(st.sampled_from(sorted(caps.layouts)))
    n_spatial, axis = _LAYOUTS[layout]
    c = draw(st.integers(1, 3))
    n = draw(st.integers(1, 4))
    spatial = tuple(draw(st.integers(1, 3)) for _ in range(n_spatial))
    size = math.prod(spatial)
    n = max(n, -(-min_m // size))
    shape = (n, c, *spatial) if axis == 1 else (n, *spatial, c)
    dtype = property_dtype(adapter)
    eps = draw(st.sampled_from(_EPS))
    estimator = draw(st.sampled_from(sorted(caps.running_var)))
    if affine is None:
        affine = draw(st.booleans()) if caps.affine_optional else True
    constant = constant_channel and draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    bshape = [1] * len(shape)
    bshape[axis] = c
    xs, dys = [], []
    for _ in range(steps):
        loc = rng.uniform(-2, 2, size=c).reshape(bshape)
        scale = rng.uniform(0.5, 3, size=c).reshape(bshape)
        x = _quantize(loc + scale * rng.standard_normal(shape))
        if constant:
            idx: list[Any] = [slice(None)] * len(shape)
            idx[axis] = 0
            x[tuple(idx)] = 1.25
        xs.append(x.astype(dtype))
        dys.append(_quantize(rng.standard_normal(shape)).astype(dtype))
    gamma = beta = None
    if affine or not caps.affine_optional:
        if affine:
            gamma = rng.uniform(0.5, 1.5, size=c).astype(dtype)
            beta = rng.uniform(-1, 1, size=c).astype(dtype)
        else:
            gamma, beta = np.ones(c, dtype=dtype), np.zeros(c, dtype=dtype)
    return Batch(
        layout, shape, axis, dtype, eps, estimator, tuple(xs), tuple(dys), gamma, beta, seed
    )


def random_state(kind: str, b: Batch) -> dict[str, np.ndarray]:
    """A random initial state under canonical keys (seeded from the batch)."""
    rng = np.random.default_rng(b.seed + 1)
    c = b.channels
    state = {
        "running_mean": rng.uniform(-1, 1, size=c),
        "running_var": rng.uniform(0.5, 2, size=c),
        "num_batches_tracked": np.asarray(rng.integers(0, 5), dtype=np.int64),
    }
    if kind == "mbn":
        state["moving_mean"] = rng.uniform(-1, 1, size=c)
        state["moving_var"] = rng.uniform(0.5, 2, size=c)
    return state


# -- adapter plumbing ---------------------------------------------------------------------------
class _Run:
    """One example's calls into the adapter, in canonical terms."""

    def __init__(self, adapter: Adapter, b: Batch) -> None:
        self.a = adapter
        self.b = b
        self.gamma = None if b.gamma is None else adapter.from_numpy(b.gamma)
        self.beta = None if b.beta is None else adapter.from_numpy(b.beta)

    def state(self, kind: str, values: dict[str, np.ndarray]) -> Any:
        s = self.a.init_state(kind, self.b.channels, self.b.dtype)
        return self.a.load_state(s, values)

    def train(
        self,
        kind: str,
        state: Any,
        x: np.ndarray,
        *,
        decay: float | None = 0.9,
        lam: float = 0.0,
        tau: float | None = 0.9,
        eps: float | None = None,
        gamma: Any = None,
        beta: Any = None,
    ) -> tuple[np.ndarray, Any, Any]:
        y, new_state, ctx = self.a.train_step(
            kind,
            state,
            self.a.from_numpy(x),
            self.gamma if gamma is None else gamma,
            self.beta if beta is None else beta,
            decay=decay,
            lam=lam,
            tau=tau,
            eps=self.b.eps if eps is None else eps,
            axis=self.b.axis,
            estimator=self.b.estimator,
        )
        return self.host(y), new_state, ctx

    def backward(self, ctx: Any, dy: np.ndarray) -> tuple[np.ndarray, Any, Any]:
        dx, dg, db = self.a.backward(ctx, self.a.from_numpy(dy))
        return self.host(dx), self.np_or_none(dg), self.np_or_none(db)

    def host(self, a: Any) -> np.ndarray:
        return np.asarray(self.a.to_numpy(a), dtype=np.float64)

    def np_or_none(self, a: Any) -> np.ndarray | None:
        return None if a is None else self.host(a)

    def state_np(self, state: Any) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.a.state_to_numpy(state).items()}


def _tol(b: Batch, factor: float = 1.0) -> tolerances.Tolerance:
    return tolerances.TOLERANCES[b.dtype].scaled(tolerances.trajectory_factor(0, b.m) * factor)


def _close(
    what: str, actual: Any, expected: Any, tol: tolerances.Tolerance, b: Batch | None = None
) -> None:
    """``AssertionError`` naming the quantity, its error and the tolerance."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    cmp = tolerances.compare(a, e, tol)
    if not cmp.ok:
        where = "" if b is None else f" [{b.layout} shape {b.shape} {b.dtype} eps {b.eps:g}]"
        detail = (
            f"shape {a.shape} != expected {e.shape}"
            if a.shape != e.shape
            else f"max abs err {cmp.max_abs:.3g}, {cmp.ratio:.3g}x the allowed "
            f"(rtol {tol.rtol:.2g}, atol {tol.atol:.2g})"
        )
        raise AssertionError(f"{what}: {detail}{where}")


def _same_state(
    what: str,
    run: _Run,
    actual: Any,
    expected: dict[str, np.ndarray],
    tol: tolerances.Tolerance,
    keys: Iterable[str] | None = None,
) -> None:
    got = run.state_np(actual)
    for key in expected if keys is None else keys:
        if key not in got:
            raise AssertionError(f"{what}: state_to_numpy() has no {key!r} (keys: {sorted(got)})")
        if key == "num_batches_tracked":
            if int(got[key]) != int(expected[key]):
                raise AssertionError(
                    f"{what}: {key} is {int(got[key])}, expected {int(expected[key])}"
                )
        else:
            _close(f"{what}: {key}", got[key], expected[key], tol, run.b)


def _bn_count(state: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(int(state["num_batches_tracked"]) + 1, dtype=np.int64)


def _unbiased(b: Batch, var: np.ndarray) -> np.ndarray:
    return var * b.m / (b.m - 1) if b.estimator == "unbiased" else var


def _given(
    name: str, strategy: st.SearchStrategy[Any], body: Callable[[Any], None], s: settings | None
) -> None:
    """Run ``body`` over ``strategy`` under ``s`` (default: :func:`default_settings`).

    A failure is reported as ``name(example=...)``.
    """

    def test(example: Any) -> None:
        body(example)

    test.__name__ = test.__qualname__ = name
    (s if s is not None else default_settings())(given(strategy)(test))()


# -- the properties -----------------------------------------------------------------------------
def bn_affine_invariance(adapter: Adapter, s: settings | None = None) -> None:
    """BN(a*x + b; eps*a**2) == BN(x; eps) for a > 0; dx scales by 1/a.

    Float64 draws any ``a`` in [0.25, 8] and ``b`` in [-10, 10]. Lower precisions draw
    ``a = 2**k`` and a dyadic ``b`` so that the transformed input is exact (else the comparison
    would measure the input's rounding), and allow 4x the table's tolerance: both runs round
    independently, and the shifted run's mean carries ``ulp(|b|)/(a*std)``.
    """
    low = property_dtype(adapter) != "float64"

    @st.composite
    def examples(draw: st.DrawFn) -> tuple[Batch, float, float]:
        b = draw(batches(adapter))
        if low:
            a = 2.0 ** draw(st.integers(-2, 3))
            shift = draw(st.integers(-64, 64)) / 16
        else:
            a = draw(st.floats(0.25, 8.0))
            shift = draw(st.floats(-10.0, 10.0))
        return b, a, shift

    def body(ex: tuple[Batch, float, float]) -> None:
        b, a, shift = ex
        run = _Run(adapter, b)
        x = b.xs[0]
        x2 = (a * x.astype(np.float64) + shift).astype(b.dtype)
        if low and not np.array_equal(x2.astype(np.float64), a * x.astype(np.float64) + shift):
            shift = 0.0  # keep the transformed input exact
            x2 = (a * x.astype(np.float64)).astype(b.dtype)
        init = random_state("bn", b)
        tol = _tol(b, 4.0 if low else 1.0)
        what = f"bn_affine_invariance (a={a:g}, b={shift:g})"
        y1, _, ctx1 = run.train("bn", run.state("bn", init), x)
        y2, _, ctx2 = run.train("bn", run.state("bn", init), x2, eps=b.eps * a * a)
        _close(f"{what}: y", y2, y1, tol, b)
        if adapter.capabilities.backward:
            dx1, dg1, db1 = run.backward(ctx1, b.dys[0])
            dx2, dg2, db2 = run.backward(ctx2, b.dys[0])
            _close(f"{what}: a*dx", a * dx2, dx1, tol, b)
            if b.gamma is not None and b.beta is not None:
                _close(f"{what}: dgamma", dg2, dg1, tol, b)
                _close(f"{what}: dbeta", db2, db1, tol, b)

    _given("bn_affine_invariance", examples(), body, s)


def bn_normalized_moments(adapter: Adapter, s: settings | None = None) -> None:
    """Affine-free BN output: per-channel mean 0 and biased variance var/(var + eps).

    Checked against the float64 moments of the input as the adapter received it, with the
    dtype's tolerance.
    """

    def body(b: Batch) -> None:
        run = _Run(adapter, b)
        y, _, _ = run.train("bn", run.state("bn", random_state("bn", b)), b.xs[0])
        _, var = b.moments(b.xs[0])
        ymean, yvar = b.moments(y)
        tol = _tol(b)
        _close("bn_normalized_moments: mean of y", ymean, np.zeros_like(ymean), tol, b)
        _close("bn_normalized_moments: variance of y", yvar, var / (var + b.eps), tol, b)

    _given("bn_normalized_moments", batches(adapter, affine=False), body, s)


def mbn_lam0_is_bn(adapter: Adapter, s: settings | None = None) -> None:
    """MBN(lam=0, tau=d) == BN(decay=d) over 1-3 steps.

    Compared: y, dx, dgamma, dbeta, running statistics and count; MBN's moving statistics
    become the batch's own.
    """

    @st.composite
    def examples(draw: st.DrawFn) -> tuple[Batch, float]:
        return draw(batches(adapter, steps=draw(st.integers(1, 3)))), draw(st.floats(0.0, 1.0))

    def body(ex: tuple[Batch, float]) -> None:
        b, d = ex
        run = _Run(adapter, b)
        init = random_state("mbn", b)
        bn_state = run.state(
            "bn", {k: init[k] for k in ("running_mean", "running_var", "num_batches_tracked")}
        )
        mbn_state = run.state("mbn", init)
        tol = _tol(b)
        for k, (x, dy) in enumerate(zip(b.xs, b.dys, strict=True)):
            what = f"mbn_lam0_is_bn (tau=decay={d:g}) step {k}"
            tol = _tol(b).scaled(math.sqrt(k + 1))
            yb, bn_state, cb = run.train("bn", bn_state, x, decay=d)
            ym, mbn_state, cm = run.train("mbn", mbn_state, x, lam=0.0, tau=d)
            _close(f"{what}: y", ym, yb, tol, b)
            if adapter.capabilities.backward:
                for name, gm, gb in zip(
                    ("dx", "dgamma", "dbeta"),
                    run.backward(cm, dy),
                    run.backward(cb, dy),
                    strict=True,
                ):
                    if gm is not None or gb is not None:
                        _close(f"{what}: {name}", gm, gb, tol, b)
            expected = run.state_np(bn_state)
            mean, var = b.moments(x)
            expected["moving_mean"], expected["moving_var"] = mean, var
            _same_state(what, run, mbn_state, expected, tol)

    _given("mbn_lam0_is_bn", examples(), body, s)


def mbn_lam1_uses_history(adapter: Adapter, s: settings | None = None) -> None:
    """MBN(lam=1) normalizes with the previous moving statistics, which stay unchanged.

    y = gamma*(x - mu)/sqrt(var + eps) + beta with the previous moving statistics;
    dx = gamma*dy/sqrt(var + eps) (no gradient into the batch statistics); the inference
    statistics move with ``tau`` and the count by one.
    """

    @st.composite
    def examples(draw: st.DrawFn) -> tuple[Batch, float]:
        return draw(batches(adapter)), draw(st.floats(0.0, 1.0))

    def body(ex: tuple[Batch, float]) -> None:
        b, tau = ex
        run = _Run(adapter, b)
        init = random_state("mbn", b)
        x, dy = b.xs[0], b.dys[0]
        y, state, ctx = run.train("mbn", run.state("mbn", init), x, lam=1.0, tau=tau)
        rstd = 1 / np.sqrt(b.per_channel(init["moving_var"]) + b.eps)
        xhat = (x.astype(np.float64) - b.per_channel(init["moving_mean"])) * rstd
        c = b.channels
        g = b.per_channel(np.ones(c) if b.gamma is None else b.gamma)
        beta = b.per_channel(np.zeros(c) if b.beta is None else b.beta)
        tol = _tol(b)
        what = f"mbn_lam1_uses_history (tau={tau:g})"
        _close(f"{what}: y", y, g * xhat + beta, tol, b)
        mean, var = b.moments(x)
        expected = {
            "moving_mean": init["moving_mean"],
            "moving_var": init["moving_var"],
            "running_mean": tau * init["running_mean"] + (1 - tau) * mean,
            "running_var": tau * init["running_var"] + (1 - tau) * _unbiased(b, var),
            "num_batches_tracked": _bn_count(init),
        }
        _same_state(what, run, state, expected, tol)
        if adapter.capabilities.backward:
            dx, dg, db = run.backward(ctx, dy)
            dy64 = dy.astype(np.float64)
            _close(f"{what}: dx", dx, g * dy64 * rstd, tol, b)
            if b.gamma is not None and b.beta is not None:
                _close(f"{what}: dgamma", dg, (dy64 * xhat).sum(axis=b.reduce_axes), tol, b)
                _close(f"{what}: dbeta", db, dy64.sum(axis=b.reduce_axes), tol, b)

    _given("mbn_lam1_uses_history", examples(), body, s)


def backward_finite_differences(adapter: Adapter, s: settings | None = None) -> None:
    """``backward`` == central differences of ``L = sum(dy * y)`` along random unit directions.

    The directions are in ``x``, ``gamma`` and ``beta`` (BN, and MBN with ``lam`` in
    [0, 0.95] and its previous moving statistics held constant). Step :data:`FD_STEP`,
    tolerance :data:`FD_RTOL`.
    """
    kinds = sorted({"bn", "mbn"} & set(adapter.capabilities.algorithms))

    @st.composite
    def examples(draw: st.DrawFn) -> tuple[Batch, str, float]:
        b = draw(batches(adapter, constant_channel=False))
        return b, draw(st.sampled_from(kinds)), draw(st.floats(0.0, 0.95))

    def body(ex: tuple[Batch, str, float]) -> None:
        b, kind, lam = ex
        run = _Run(adapter, b)
        init = random_state(kind, b)
        x, dy = b.xs[0].astype(np.float64), b.dys[0].astype(np.float64)
        gamma = None if b.gamma is None else b.gamma.astype(np.float64)
        beta = None if b.beta is None else b.beta.astype(np.float64)
        kw: dict[str, Any] = {"lam": lam} if kind == "mbn" else {}

        def loss(
            xv: np.ndarray, gv: np.ndarray | None, bv: np.ndarray | None
        ) -> tuple[float, float]:
            y, _, _ = run.train(
                kind,
                run.state(kind, init),
                xv,
                gamma=None if gv is None else adapter.from_numpy(gv),
                beta=None if bv is None else adapter.from_numpy(bv),
                **kw,
            )
            return float(np.sum(dy * y)), float(np.sum(np.abs(dy * y)))

        _, _, ctx = run.train(kind, run.state(kind, init), x, **kw)
        dx, dg, db = run.backward(ctx, b.dys[0])
        rng = np.random.default_rng(b.seed + 2)
        h = FD_STEP
        checks: list[tuple[str, np.ndarray, np.ndarray]] = [
            ("dx", dx, rng.standard_normal(x.shape)),
            ("dx", dx, rng.standard_normal(x.shape)),
        ]
        if gamma is not None and beta is not None and dg is not None and db is not None:
            checks += [
                ("dgamma", dg, rng.standard_normal(gamma.shape)),
                ("dbeta", db, rng.standard_normal(beta.shape)),
            ]
        label = f"{kind}, lam={lam:g}" if kind == "mbn" else kind
        for name, grad, v in checks:
            v = v / np.linalg.norm(v)
            args_p: list[Any] = [x, gamma, beta]
            args_m: list[Any] = [x, gamma, beta]
            i = ("dx", "dgamma", "dbeta").index(name)
            args_p[i] = args_p[i] + h * v
            args_m[i] = args_m[i] - h * v
            (lp, sp), (lm, sm) = loss(*args_p), loss(*args_m)
            fd = (lp - lm) / (2 * h)
            an = float(np.sum(grad * v))
            allowed = FD_RTOL * (1 + float(np.linalg.norm(grad))) + 8 * 2.0**-52 * max(sp, sm) / h
            if not abs(fd - an) <= allowed:
                raise AssertionError(
                    f"backward_finite_differences ({label}): "
                    f"{name} along a random unit direction: backward gives {an:.10g}, central "
                    f"differences (h={h:g}) {fd:.10g}; |difference| {abs(fd - an):.3g} > allowed "
                    f"{allowed:.3g} [{b.layout} shape {b.shape} eps {b.eps:g}]"
                )

    _given("backward_finite_differences", examples(), body, s)


def bn_dx_sums_to_zero(adapter: Adapter, s: settings | None = None) -> None:
    """BN's ``dx`` sums to zero per channel, to the dtype's rtol times ``sum |dx|``."""

    def body(b: Batch) -> None:
        run = _Run(adapter, b)
        _, _, ctx = run.train("bn", run.state("bn", random_state("bn", b)), b.xs[0])
        dx, _, _ = run.backward(ctx, b.dys[0])
        total = dx.sum(axis=b.reduce_axes)
        scale = np.abs(dx).sum(axis=b.reduce_axes)
        tol = _tol(b)
        allowed = tol.rtol * scale + tol.atol
        if np.any(~(np.abs(total) <= allowed)):
            c = int(np.argmax(np.abs(total) - allowed))
            raise AssertionError(
                f"bn_dx_sums_to_zero: channel {c}: sum(dx) = {total[c]:.3g}, allowed "
                f"{allowed[c]:.3g} (rtol {tol.rtol:.2g} * sum|dx| + atol {tol.atol:.2g}) "
                f"[{b.layout} shape {b.shape} {b.dtype} eps {b.eps:g}]"
            )

    _given("bn_dx_sums_to_zero", batches(adapter), body, s)


def _partition(n: int, cuts: list[int]) -> list[int]:
    bounds = [0, *sorted(cuts), n]
    return [hi - lo for lo, hi in itertools.pairwise(bounds)]


def sync_shard_equivalence(adapter: Adapter, s: settings | None = None) -> None:
    """``sync_train_step`` over a random partition of N equals ``train_step`` on the whole batch.

    Unequal sizes and empty shards are allowed; compared over 1-2 steps: outputs, gradients,
    state.
    """
    assert isinstance(adapter, SyncAdapter)
    kinds = ["bn"] + (["mbn"] if "mbn" in adapter.capabilities.algorithms else [])

    @st.composite
    def examples(draw: st.DrawFn) -> tuple[Batch, str, list[int], float, float]:
        b = draw(batches(adapter, steps=draw(st.integers(1, 2))))
        # cut points uniform over [0, N] (from the batch's seed: hypothesis would favour all
        # cuts at 0, one shard holding everything), plus an empty shard somewhere, half the time
        rng = np.random.default_rng(b.seed + 3)
        n, k = b.shape[0], draw(st.integers(2, 4))
        sizes = _partition(n, [int(c) for c in rng.integers(0, n + 1, size=k - 1)])
        if draw(st.booleans()):
            sizes.insert(int(rng.integers(0, len(sizes) + 1)), 0)
        kind = draw(st.sampled_from(kinds))
        return b, kind, sizes, draw(st.floats(0, 1)), draw(st.floats(0, 1))

    def body(ex: tuple[Batch, str, list[int], float, float]) -> None:
        b, kind, sizes, lam, d = ex
        assert isinstance(adapter, SyncAdapter)
        run = _Run(adapter, b)
        init = random_state(kind, b)
        one, many = run.state(kind, init), run.state(kind, init)
        kw: dict[str, Any] = {"decay": d, "lam": lam if kind == "mbn" else 0.0, "tau": d}
        bounds = np.cumsum([0, *sizes])
        for k, (x, dy) in enumerate(zip(b.xs, b.dys, strict=True)):
            what = f"sync_shard_equivalence ({kind}, shards {sizes}) step {k}"
            tol = _tol(b).scaled(math.sqrt(k + 1))
            y, one, ctx = run.train(kind, one, x, **kw)
            ys, many, sctx = adapter.sync_train_step(
                kind,
                many,
                [adapter.from_numpy(x[lo:hi]) for lo, hi in itertools.pairwise(bounds)],
                run.gamma,
                run.beta,
                eps=b.eps,
                axis=b.axis,
                estimator=b.estimator,
                **kw,
            )
            if len(ys) != len(sizes):
                raise AssertionError(f"{what}: {len(ys)} outputs for {len(sizes)} shards")
            _close(f"{what}: concatenated y", np.concatenate([run.host(v) for v in ys]), y, tol, b)
            if adapter.capabilities.backward:
                dx, dg, db = run.backward(ctx, dy)
                dys = [adapter.from_numpy(dy[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
                sdx, sdg, sdb = adapter.sync_backward(sctx, dys)
                _close(
                    f"{what}: concatenated dx",
                    np.concatenate([run.host(v) for v in sdx]),
                    dx,
                    tol,
                    b,
                )
                if dg is not None and db is not None:
                    _close(f"{what}: dgamma", run.host(sdg), dg, tol, b)
                    _close(f"{what}: dbeta", run.host(sdb), db, tol, b)
            _same_state(what, run, many, run.state_np(one), tol)

    _given("sync_shard_equivalence", examples(), body, s)


# -- registry -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Property:
    """A named law, the check that runs it, and what the adapter must declare for it."""

    name: str
    check: Callable[[Adapter, settings | None], None]
    needs_algorithms: tuple[str, ...] = ()
    needs_backward: bool = False
    needs_float64: bool = False
    needs_sync: bool = False

    @property
    def id(self) -> str:
        """The conformance id, ``property/<name>`` (what known-failure patterns match)."""
        return PREFIX + self.name

    @property
    def doc(self) -> str:
        """The first line of the check's docstring."""
        return (self.check.__doc__ or "").strip().splitlines()[0]


PROPERTIES: tuple[Property, ...] = (
    Property("bn_affine_invariance", bn_affine_invariance, ("bn",)),
    Property("bn_normalized_moments", bn_normalized_moments, ("bn",)),
    Property("mbn_lam0_is_bn", mbn_lam0_is_bn, ("bn", "mbn")),
    Property("mbn_lam1_uses_history", mbn_lam1_uses_history, ("mbn",)),
    Property(
        "backward_finite_differences",
        backward_finite_differences,
        needs_backward=True,
        needs_float64=True,
    ),
    Property("bn_dx_sums_to_zero", bn_dx_sums_to_zero, ("bn",), needs_backward=True),
    Property("sync_shard_equivalence", sync_shard_equivalence, ("bn", "sync"), needs_sync=True),
)


def skip_reason(adapter: Adapter, prop: Property) -> str | None:
    """Why ``adapter`` cannot run ``prop`` (``None`` if it can)."""
    caps = adapter.capabilities
    missing = [a for a in prop.needs_algorithms if a not in caps.algorithms]
    if missing:
        return f"algorithm {'+'.join(missing)} not declared"
    if prop.name == "backward_finite_differences" and not {"bn", "mbn"} & set(caps.algorithms):
        return "neither bn nor mbn declared"
    if prop.needs_backward and not caps.backward:
        return "backward not declared"
    if prop.needs_float64 and "float64" not in caps.dtypes:
        return "finite differences need float64, which is not declared"
    if prop.needs_sync and not isinstance(adapter, SyncAdapter):
        return "the adapter has no sync_train_step/sync_backward"
    return None


def known_failure(adapter: Adapter, prop: Property) -> str | None:
    """The adapter's declared reason if ``prop.id`` matches one of its known failures."""
    for pattern, reason in adapter.capabilities.known_failures.items():
        if fnmatch.fnmatchcase(prop.id, pattern):
            return reason
    return None


def check(adapter: Adapter, name: str, s: settings | None = None) -> None:
    """Run one property by name; ``AssertionError`` with the falsifying example if it fails."""
    for prop in PROPERTIES:
        if prop.name == name:
            prop.check(adapter, s)
            return
    raise KeyError(f"no property {name!r}; known: {[p.name for p in PROPERTIES]}")


def run(
    adapter: Adapter, *, select: Sequence[str] = (), hypothesis_settings: settings | None = None
) -> list[CaseResult]:
    """Run every property (or those whose id matches a ``select`` glob) as result rows.

    Statuses: ``pass``/``fail`` (an assertion)/``error`` (any other exception)/``skip``, and
    ``xfail``/``xpass`` for the adapter's known failures.
    """
    results = []
    for prop in PROPERTIES:
        if select and not any(fnmatch.fnmatchcase(prop.id, p) for p in select):
            continue
        reason = skip_reason(adapter, prop)
        if reason is not None:
            results.append(CaseResult(prop.id, "skip", reason=reason))
            continue
        try:
            prop.check(adapter, hypothesis_settings)
            result = CaseResult(prop.id, "pass")
        except AssertionError as exc:
            result = CaseResult(
                prop.id, "fail", reason=str(exc).splitlines()[0], failures=[str(exc)]
            )
        except Exception as exc:  # an implementation's error is a result, not a crash
            first = (str(exc).strip().splitlines() or [""])[0]
            result = CaseResult(prop.id, "error", reason=f"{type(exc).__name__}: {first}")
        xfail = known_failure(adapter, prop)
        if xfail is not None:
            result.status = "xpass" if result.status == "pass" else "xfail"
            result.reason = xfail
        results.append(result)
    return results
