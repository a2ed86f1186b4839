"""Properties every BN/MBN implementation must hold, checked with hypothesis through an Adapter.

The golden vectors check fixed points; these check laws over many small random inputs in the
shapes, layouts and dtypes the adapter declares (its :class:`Capabilities`), through the
adapter protocol version 2 (:class:`~mbn_conformance.protocol.Setup`,
:class:`~mbn_conformance.protocol.Step`):

``bn_affine_invariance``
    BN's training output is unchanged by ``x -> a*x + b`` (``a > 0``) when ``eps`` becomes
    ``a**2 * eps``; ``dx`` scales by ``1/a``, ``dgamma``/``dbeta`` are unchanged. Half the
    examples shift each channel by 1e3 to 1e4 of its standard deviations.
``bn_normalized_moments``
    BN without affine parameters outputs, per channel, mean 0 and biased variance
    ``var/(var + eps)`` (``var`` the batch's biased variance; a constant channel gives 0);
    half the examples on data 1e3 to 1e4 standard deviations from zero.
``mbn_lam0_is_bn``
    MBN with ``lam = 0`` (and ``tau`` equal to BN's decay) equals BN: outputs, gradients,
    inference statistics, count and evaluation output; its moving statistics become the
    batch's.
``mbn_lam1_uses_history``
    MBN with ``lam = 1`` normalizes with the previous moving statistics and leaves them
    unchanged (no gradient flows into the batch statistics); the inference statistics are
    still updated with ``tau``.
``backward_finite_differences``
    ``backward`` agrees with central finite differences of the adapter's own forward, along
    random directions, for the loss ``sum(dy * y)`` (float64 adapters only).
``bn_dx_sums_to_zero``
    BN's ``dx`` sums to zero over every channel (the output does not move when ``x`` shifts),
    relative to the magnitude of the terms that cancel; half the examples on offset data.
``sync_shard_equivalence``
    A synchronized step over a random partition along N (unequal sizes, empty shards) equals
    the adapter's own ``train_step`` on the concatenated batch: outputs, gradients, state;
    half the examples on offset data. Either sync shape of the protocol is used
    (``sync_train_step``/``sync_backward``, or the fused ``sync_step``).

Each property is an object of :data:`PROPERTIES` offering the check generator's interface
(:class:`mbn_conformance.checks.Law`): ``id`` (``property/<name>``), ``doc`` (one line),
``needs(adapter)`` (why it cannot run, e.g. ``"algorithm mbn not declared"``, or ``None``)
and ``check(adapter, settings=None)``, which raises ``AssertionError`` (with hypothesis'
falsifying example in its notes) when the law fails; an exception of the adapter's
propagates as itself. Skips and known failures are :mod:`mbn_conformance.checks`' business.

**Declarations.** The estimator is the one declared (``running_var``); without a batch
counter (``batch_counter=False``) no count is loaded or compared; with
``hyperparameter_dtype="float32"`` every decay and ``eps`` the adapter is given, and the
expectation is computed with, is rounded to float32 first (and ``a`` in the affine
invariance is a power of two, so that ``a**2 * eps`` stays exact); the cumulative average
(``decay=None``, ``tau=None``) is drawn only when ``cumulative``, ``batch_counter`` and
``cumulative_tau`` are all declared.

**Offsets.** Offset examples put each channel's mean 1e3 to 1e4 of its standard deviations
from zero (float64 and float32; float16 cannot hold such data). They are compared with the
tolerance of their conditioning (:func:`mbn_conformance.tolerances.conditioned`, ``kappa``
measured on the input as given): a stable implementation passes, and one whose variance is
``E[x^2] - E[x]^2`` fails by orders of magnitude (``tests/test_conformance_properties.py``).

Inputs are drawn in float64 when the adapter declares it, else float32 (else float16), and
compared with the suite's tolerance table (:mod:`mbn_conformance.tolerances`), widened only
where a property says why. Data come from a NumPy generator seeded by hypothesis, so a run
under a derandomized profile is reproducible.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import hypothesis
import numpy as np
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from . import tolerances
from .protocol import Adapter, FusedSyncAdapter, Kind, Setup, Step, SyncAdapter
from .refusals import preferred_dtype

__all__ = [
    "PREFIX",
    "PROFILE",
    "PROPERTIES",
    "Batch",
    "Property",
    "batches",
    "check",
    "default_settings",
    "property_dtype",
]

PROFILE = "mbn-conformance"
"""The hypothesis profile the properties run under unless given other settings."""

hypothesis.settings.register_profile(
    PROFILE,
    max_examples=25,
    deadline=None,
    database=None,  # never write a .hypothesis/ directory into the user's working directory
    print_blob=True,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def default_settings() -> hypothesis.settings:
    """The ``mbn-conformance`` profile, derandomized when the environment variable ``CI`` is set.

    ``CI`` is read at call time, so a CI job gets the same examples on every run.
    """
    return hypothesis.settings(
        hypothesis.settings.get_profile(PROFILE), derandomize=bool(os.environ.get("CI"))
    )


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
OFFSET_RANGE = (1e3, 1e4)
"""Offsets, in standard deviations of the channel, of offset examples (log-uniform)."""

FD_STEP = 1e-5
"""Central-difference step along a unit direction (inputs have per-channel std in [0.5, 3])."""
FD_RTOL = 1e-6
"""Finite differences pass when ``|fd - g.v| <= FD_RTOL * (1 + |g|) + 8 * 2**-52 * S / h``:
truncation ``O(h**2)`` is ~1e-9 for these inputs, and ``S = sum |dy * y|`` bounds the rounding
of the loss, which the quotient divides by ``h``."""


# -- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """Inputs of one example: a few steps of ``(x, dy)`` of one shape, and the parameters.

    ``scales`` are the per-channel spreads the data were drawn with; ``offset`` says whether
    the channels sit 1e3 to 1e4 of them from zero; ``eps`` is already as the implementation
    holds it (rounded to float32 with ``hyperparameter_dtype="float32"``).
    """

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
    scales: np.ndarray
    offset: bool = False

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

    def kappa(self, xs: Iterable[np.ndarray] | None = None) -> float:
        """The conditioning (:func:`~mbn_conformance.tolerances.conditioning`) of the inputs."""
        return max(
            (tolerances.conditioning(x, self.axis) for x in (self.xs if xs is None else xs)),
            default=0.0,
        )


def property_dtype(adapter: Adapter) -> str:
    """float64 if declared, else float32, else float16."""
    return preferred_dtype(adapter)


def _hp(adapter: Adapter, v: float | None) -> float | None:
    """A decay or eps as the implementation holds it: rounded to float32 if so declared."""
    if v is None or adapter.capabilities.hyperparameter_dtype != "float32":
        return v
    return float(np.float32(v))


def _hpf(adapter: Adapter, v: float) -> float:
    out = _hp(adapter, v)
    assert out is not None
    return out


def _quantize(a: np.ndarray) -> np.ndarray:
    """Multiples of 1/256: exact in float32 below 2**16, and in float16 below 8."""
    return np.round(a * 256) / 256


def _offsets_allowed(adapter: Adapter) -> bool:
    return property_dtype(adapter) != "float16"


def _offset_locs(rng: np.random.Generator, scale: np.ndarray) -> np.ndarray:
    """Per-channel locations 1e3 to 1e4 of ``scale`` from zero, either sign."""
    lo, hi = (math.log10(v) for v in OFFSET_RANGE)
    sign = np.where(rng.random(scale.shape) < 0.5, -1.0, 1.0)
    out: np.ndarray = sign * 10.0 ** rng.uniform(lo, hi, size=scale.shape) * scale
    return out


@st.composite
def batches(
    draw: st.DrawFn,
    adapter: Adapter,
    *,
    steps: int = 1,
    min_m: int = 2,
    affine: bool | None = None,
    constant_channel: bool = True,
    offset: bool | None = False,
) -> Batch:
    """Small batches in the adapter's declared layouts and dtype.

    ``affine=None`` draws it (when affine parameters are optional); ``affine=False`` gives
    unit scale and zero shift arrays if the adapter cannot omit them. ``min_m`` values per
    channel at least; ``constant_channel`` allows a zero-variance channel (never in offset
    data, where a constant channel has no scale to be offset by). ``offset=None`` draws
    whether the channels sit 1e3 to 1e4 standard deviations from zero (not in float16);
    ``True`` always, ``False`` never (means in ``[-2, 2]``).
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
    eps = _hpf(adapter, draw(st.sampled_from(_EPS)))
    if offset is None:
        offset = _offsets_allowed(adapter) and draw(st.booleans())
    if affine is None:
        affine = draw(st.booleans()) if caps.affine_optional else True
    constant = constant_channel and not offset and draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    bshape = [1] * len(shape)
    bshape[axis] = c
    scale = rng.uniform(0.5, 3, size=c)
    xs, dys = [], []
    for _ in range(steps):
        loc = _offset_locs(rng, scale) if offset else rng.uniform(-2, 2, size=c)
        x = _quantize(loc.reshape(bshape) + scale.reshape(bshape) * rng.standard_normal(shape))
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
        layout,
        shape,
        axis,
        dtype,
        eps,
        caps.running_var,
        tuple(xs),
        tuple(dys),
        gamma,
        beta,
        seed,
        scale,
        offset,
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
        self.counter = adapter.capabilities.batch_counter
        self.gamma = None if b.gamma is None else adapter.from_numpy(b.gamma)
        self.beta = None if b.beta is None else adapter.from_numpy(b.beta)

    def setup(self, kind: Kind) -> Setup:
        """The layer of this example (the whole batch's shape)."""
        b = self.b
        affine = b.gamma is not None
        return Setup(kind, b.layout, b.shape, b.axis, b.channels, b.dtype, affine)

    def state(self, kind: Kind, values: dict[str, np.ndarray]) -> Any:
        """A fresh state holding ``values`` (without the count when there is no counter)."""
        s = self.a.init_state(self.setup(kind))
        if not self.counter:
            values = {k: v for k, v in values.items() if k != "num_batches_tracked"}
        return self.a.load_state(s, values)

    def step(
        self,
        kind: Kind,
        *,
        index: int = 0,
        training: bool = True,
        decay: float | None = 0.9,
        lam: float = 0.0,
        tau: float | None = 0.9,
        eps: float | None = None,
    ) -> Step:
        """The :class:`Step`, every decay and ``eps`` as the implementation holds them."""
        return Step(
            kind=kind,
            index=index,
            training=training,
            eps=_hpf(self.a, self.b.eps if eps is None else eps),
            axis=self.b.axis,
            estimator=self.b.estimator,
            decay=_hp(self.a, decay),
            lam=_hpf(self.a, lam),
            tau=_hp(self.a, tau),
        )

    def train(
        self, step: Step, state: Any, x: np.ndarray, *, gamma: Any = None, beta: Any = None
    ) -> tuple[np.ndarray, Any, Any]:
        y, new_state, ctx = self.a.train_step(
            step,
            state,
            self.a.from_numpy(x),
            self.gamma if gamma is None else gamma,
            self.beta if beta is None else beta,
        )
        return self.host(y), new_state, ctx

    def evaluate(self, step: Step, state: Any, x: np.ndarray) -> np.ndarray:
        return self.host(self.a.eval_step(step, state, self.a.from_numpy(x), self.gamma, self.beta))

    def backward(self, ctx: Any, dy: np.ndarray) -> tuple[np.ndarray, Any, Any]:
        dx, dg, db = self.a.backward(ctx, self.a.from_numpy(dy))
        return self.host(dx), self.np_or_none(dg), self.np_or_none(db)

    def sync(
        self, step: Step, state: Any, xs: Sequence[np.ndarray], dys: Sequence[np.ndarray] | None
    ) -> tuple[list[np.ndarray], Any, list[np.ndarray] | None, Any, Any]:
        """One synchronized step through whichever sync shape the adapter has.

        ``(ys, new_state, dxs, dgamma, dbeta)``; the gradients are ``None`` without ``dys``.
        """
        a = self.a
        shards = [a.from_numpy(x) for x in xs]
        dxs: Any = None
        dg = db = None
        if isinstance(a, SyncAdapter):
            ys, state, ctx = a.sync_train_step(step, state, shards, self.gamma, self.beta)
            if dys is not None:
                dxs, dg, db = a.sync_backward(ctx, [a.from_numpy(d) for d in dys])
        else:
            assert isinstance(a, FusedSyncAdapter)
            on = None if dys is None else [a.from_numpy(d) for d in dys]
            ys, state, dxs, dg, db = a.sync_step(step, state, shards, self.gamma, self.beta, on)
        hosts = None if dxs is None else [self.host(v) for v in dxs]
        return [self.host(v) for v in ys], state, hosts, self.np_or_none(dg), self.np_or_none(db)

    def host(self, a: Any) -> np.ndarray:
        return np.asarray(self.a.to_numpy(a), dtype=np.float64)

    def np_or_none(self, a: Any) -> np.ndarray | None:
        return None if a is None else self.host(a)

    def state_np(self, state: Any) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.a.state_to_numpy(state).items()}


def _tol(
    b: Batch,
    quantity: str = "y",
    factor: float = 1.0,
    kappa: float | None = None,
) -> tolerances.Tolerance:
    """The dtype's tolerance (of the data's conditioning in offset examples), scaled."""
    scale = tolerances.trajectory_factor(0, b.m) * factor
    if b.offset:
        k = b.kappa() if kappa is None else kappa
        return tolerances.conditioned(b.dtype, k, quantity, b.m).scaled(scale)
    return tolerances.TOLERANCES[b.dtype].scaled(scale)


def _where(b: Batch) -> str:
    off = f" offset kappa {b.kappa():.3g}" if b.offset else ""
    return f" [{b.layout} shape {b.shape} {b.dtype} eps {b.eps:g}{off}]"


def _close(
    what: str, actual: Any, expected: Any, tol: tolerances.Tolerance, b: Batch | None = None
) -> None:
    """``AssertionError`` naming the quantity, its error and the tolerance."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    cmp = tolerances.compare(a, e, tol)
    if not cmp.ok:
        detail = (
            f"shape {a.shape} != expected {e.shape}"
            if a.shape != e.shape
            else f"max abs err {cmp.max_abs:.3g}, {cmp.ratio:.3g}x the allowed "
            f"(rtol {tol.rtol:.2g}, atol {tol.atol:.2g})"
        )
        raise AssertionError(f"{what}: {detail}{'' if b is None else _where(b)}")


def _same_state(
    what: str,
    run: _Run,
    actual: Any,
    expected: dict[str, np.ndarray],
    tol: Callable[[str], tolerances.Tolerance],
) -> None:
    """Compare the state's fields (the count only with a counter); ``tol`` per field."""
    got = run.state_np(actual)
    for key in expected:
        if key == "num_batches_tracked" and not run.counter:
            continue
        if key not in got:
            raise AssertionError(f"{what}: state_to_numpy() has no {key!r} (keys: {sorted(got)})")
        if key == "num_batches_tracked":
            if int(got[key]) != int(expected[key]):
                raise AssertionError(
                    f"{what}: {key} is {int(got[key])}, expected {int(expected[key])}"
                )
        else:
            _close(f"{what}: {key}", got[key], expected[key], tol(key), run.b)


def _bn_count(state: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(int(state["num_batches_tracked"]) + 1, dtype=np.int64)


def _unbiased(b: Batch, var: np.ndarray) -> np.ndarray:
    return var * b.m / (b.m - 1) if b.estimator == "unbiased" else var


def _given(
    name: str,
    strategy: st.SearchStrategy[Any],
    body: Callable[[Any], None],
    s: hypothesis.settings | None,
) -> None:
    """Run ``body`` over ``strategy`` under ``s`` (default: :func:`default_settings`).

    A failure is reported as ``name(example=...)``.
    """

    def test(example: Any) -> None:
        body(example)

    test.__name__ = test.__qualname__ = name
    (s if s is not None else default_settings())(given(strategy)(test))()


# -- the properties -----------------------------------------------------------------------------
def bn_affine_invariance(adapter: Adapter, s: hypothesis.settings | None = None) -> None:
    """BN(a*x + b; eps*a**2) == BN(x; eps) for a > 0; dx scales by 1/a.

    Float64 draws any ``a`` in [0.25, 8] and ``b`` in [-10, 10]. Lower precisions, and
    hyper-parameters held in float32, draw ``a = 2**k`` (so that ``eps*a**2`` and ``a*x`` are
    exact) and a dyadic ``b``, so that the transformed input is exact (else the comparison
    would measure the input's rounding), and allow 4x the table's tolerance: both runs round
    independently. Half the examples (float64 and float32) shift each channel instead by
    ``b_c`` of 1e3 to 1e4 of its standard deviations (times ``a``), and compare with the
    tolerance of the shifted input's conditioning.
    """
    low = property_dtype(adapter) != "float64"
    pow2 = low or adapter.capabilities.hyperparameter_dtype == "float32"

    @st.composite
    def examples(draw: st.DrawFn) -> tuple[Batch, float, np.ndarray, bool]:
        offset = _offsets_allowed(adapter) and draw(st.booleans())
        b = draw(batches(adapter, constant_channel=not offset))
        a = 2.0 ** draw(st.integers(-2, 3)) if pow2 else draw(st.floats(0.25, 8.0))
        if offset:
            rng = np.random.default_rng(b.seed + 4)
            shift = a * _quantize(_offset_locs(rng, b.scales))
        elif low:
            shift = np.full(b.channels, draw(st.integers(-64, 64)) / 16)
        else:
            shift = np.full(b.channels, draw(st.floats(-10.0, 10.0)))
        return b, a, shift, offset

    def body(ex: tuple[Batch, float, np.ndarray, bool]) -> None:
        b0, a, shift, offset = ex
        x = b0.xs[0]
        exact = a * x.astype(np.float64) + b0.per_channel(shift)
        x2 = exact.astype(b0.dtype)
        if low and not np.array_equal(x2.astype(np.float64), exact):
            shift = np.zeros_like(shift)  # keep the transformed input exact
            x2 = (a * x.astype(np.float64)).astype(b0.dtype)
        # the shifted input is the one an offset example's tolerance is conditioned on
        b = replace(b0, xs=(x2,), offset=True) if offset else b0
        run = _Run(adapter, b)
        init = random_state("bn", b)
        factor = 4.0 if low and not offset else 1.0  # offsets: conditioned already
        shown = f"{shift[0]:g}" if np.all(shift == shift[0]) else np.array2string(shift)
        what = f"bn_affine_invariance (a={a:g}, b={shown})"
        y1, _, ctx1 = run.train(run.step("bn"), run.state("bn", init), x)
        step2 = run.step("bn", eps=b.eps * a * a)
        y2, _, ctx2 = run.train(step2, run.state("bn", init), x2)
        _close(f"{what}: y", y2, y1, _tol(b, "y", factor), b)
        if adapter.capabilities.backward:
            dx1, dg1, db1 = run.backward(ctx1, b.dys[0])
            dx2, dg2, db2 = run.backward(ctx2, b.dys[0])
            _close(f"{what}: a*dx", a * dx2, dx1, _tol(b, "dx", factor), b)
            if b.gamma is not None and b.beta is not None:
                _close(f"{what}: dgamma", dg2, dg1, _tol(b, "dgamma", factor), b)
                _close(f"{what}: dbeta", db2, db1, _tol(b, "dbeta", factor), b)

    _given("bn_affine_invariance", examples(), body, s)


def bn_normalized_moments(adapter: Adapter, s: hypothesis.settings | None = None) -> None:
    """Affine-free BN output: per-channel mean 0 and biased variance var/(var + eps).

    Checked against the float64 moments of the input as the adapter received it, with the
    dtype's tolerance (that of the data's conditioning in offset examples, half of them).
    """

    def body(b: Batch) -> None:
        run = _Run(adapter, b)
        state = run.state("bn", random_state("bn", b))
        y, _, _ = run.train(run.step("bn"), state, b.xs[0])
        _, var = b.moments(b.xs[0])
        ymean, yvar = b.moments(y)
        tol = _tol(b)
        _close("bn_normalized_moments: mean of y", ymean, np.zeros_like(ymean), tol, b)
        _close("bn_normalized_moments: variance of y", yvar, var / (var + b.eps), tol, b)

    _given("bn_normalized_moments", batches(adapter, affine=False, offset=None), body, s)


def _cumulative_allowed(adapter: Adapter) -> bool:
    caps = adapter.capabilities
    return "cumulative" in caps.algorithms and caps.batch_counter and caps.cumulative_tau


def mbn_lam0_is_bn(adapter: Adapter, s: hypothesis.settings | None = None) -> None:
    """MBN(lam=0, tau=d) == BN(decay=d) over 1-3 steps, then in evaluation.

    Compared: y, dx, dgamma, dbeta, running statistics and count, and the evaluation output;
    MBN's moving statistics become the batch's own. ``d = None`` (the cumulative average)
    is drawn only where ``cumulative``, a batch counter and ``cumulative_tau`` are declared.
    """
    decays: st.SearchStrategy[float | None] = st.floats(0.0, 1.0)
    if _cumulative_allowed(adapter):
        decays = st.one_of(st.none(), decays)

    @st.composite
    def examples(draw: st.DrawFn) -> tuple[Batch, float | None]:
        return draw(batches(adapter, steps=draw(st.integers(1, 3)))), draw(decays)

    def body(ex: tuple[Batch, float | None]) -> None:
        b, d = ex
        d = _hp(adapter, d)
        run = _Run(adapter, b)
        init = random_state("mbn", b)
        bn_init = {k: init[k] for k in ("running_mean", "running_var", "num_batches_tracked")}
        bn_state = run.state("bn", bn_init)
        mbn_state = run.state("mbn", init)
        label = "None" if d is None else f"{d:g}"
        k = 0
        for k, (x, dy) in enumerate(zip(b.xs, b.dys, strict=True)):
            what = f"mbn_lam0_is_bn (tau=decay={label}) step {k}"

            def tol(q: str, k: int = k) -> tolerances.Tolerance:
                return _tol(b, q).scaled(math.sqrt(k + 1))

            yb, bn_state, cb = run.train(run.step("bn", index=k, decay=d), bn_state, x)
            ym, mbn_state, cm = run.train(run.step("mbn", index=k, lam=0.0, tau=d), mbn_state, x)
            _close(f"{what}: y", ym, yb, tol("y"), b)
            if adapter.capabilities.backward:
                for name, gm, gb in zip(
                    ("dx", "dgamma", "dbeta"),
                    run.backward(cm, dy),
                    run.backward(cb, dy),
                    strict=True,
                ):
                    if gm is not None or gb is not None:
                        _close(f"{what}: {name}", gm, gb, tol(name), b)
            expected = run.state_np(bn_state)
            mean, var = b.moments(x)
            expected["moving_mean"], expected["moving_var"] = mean, var
            _same_state(what, run, mbn_state, expected, tol)
        x = b.xs[-1]
        what = f"mbn_lam0_is_bn (tau=decay={label}) evaluation"
        ye_bn = run.evaluate(run.step("bn", index=k + 1, training=False, decay=d), bn_state, x)
        ye_mbn = run.evaluate(
            run.step("mbn", index=k + 1, training=False, lam=0.0, tau=d), mbn_state, x
        )
        _close(f"{what}: y", ye_mbn, ye_bn, _tol(b).scaled(math.sqrt(k + 2)), b)

    _given("mbn_lam0_is_bn", examples(), body, s)


def mbn_lam1_uses_history(adapter: Adapter, s: hypothesis.settings | None = None) -> None:
    """MBN(lam=1) normalizes with the previous moving statistics, which stay unchanged.

    y = gamma*(x - mu)/sqrt(var + eps) + beta with the previous moving statistics;
    dx = gamma*dy/sqrt(var + eps) (no gradient into the batch statistics); the inference
    statistics move with ``tau`` and the count (with a counter) by one.
    """

    @st.composite
    def examples(draw: st.DrawFn) -> tuple[Batch, float]:
        return draw(batches(adapter)), draw(st.floats(0.0, 1.0))

    def body(ex: tuple[Batch, float]) -> None:
        b, tau = ex
        tau = _hpf(adapter, tau)
        run = _Run(adapter, b)
        init = random_state("mbn", b)
        x, dy = b.xs[0], b.dys[0]
        step = run.step("mbn", lam=1.0, tau=tau)
        y, state, ctx = run.train(step, run.state("mbn", init), x)
        rstd = 1 / np.sqrt(b.per_channel(init["moving_var"]) + b.eps)
        xhat = (x.astype(np.float64) - b.per_channel(init["moving_mean"])) * rstd
        c = b.channels
        g = b.per_channel(np.ones(c) if b.gamma is None else b.gamma)
        beta = b.per_channel(np.zeros(c) if b.beta is None else b.beta)
        what = f"mbn_lam1_uses_history (tau={tau:g})"
        _close(f"{what}: y", y, g * xhat + beta, _tol(b), b)
        mean, var = b.moments(x)
        expected = {
            "moving_mean": init["moving_mean"],
            "moving_var": init["moving_var"],
            "running_mean": tau * init["running_mean"] + (1 - tau) * mean,
            "running_var": tau * init["running_var"] + (1 - tau) * _unbiased(b, var),
            "num_batches_tracked": _bn_count(init),
        }
        _same_state(what, run, state, expected, lambda q: _tol(b, q))
        if adapter.capabilities.backward:
            dx, dg, db = run.backward(ctx, dy)
            dy64 = dy.astype(np.float64)
            _close(f"{what}: dx", dx, g * dy64 * rstd, _tol(b, "dx"), b)
            if b.gamma is not None and b.beta is not None:
                dg_expected = (dy64 * xhat).sum(axis=b.reduce_axes)
                _close(f"{what}: dgamma", dg, dg_expected, _tol(b, "dgamma"), b)
                _close(f"{what}: dbeta", db, dy64.sum(axis=b.reduce_axes), _tol(b, "dbeta"), b)

    _given("mbn_lam1_uses_history", examples(), body, s)


def backward_finite_differences(adapter: Adapter, s: hypothesis.settings | None = None) -> None:
    """``backward`` == central differences of ``L = sum(dy * y)`` along random unit directions.

    The directions are in ``x``, ``gamma`` and ``beta`` (BN, and MBN with ``lam`` in
    [0, 0.95] and its previous moving statistics held constant). Step :data:`FD_STEP`,
    tolerance :data:`FD_RTOL`.
    """
    kinds: list[Kind] = [k for k in ("bn", "mbn") if k in adapter.capabilities.algorithms]

    @st.composite
    def examples(draw: st.DrawFn) -> tuple[Batch, Kind, float]:
        b = draw(batches(adapter, constant_channel=False))
        return b, draw(st.sampled_from(kinds)), draw(st.floats(0.0, 0.95))

    def body(ex: tuple[Batch, Kind, float]) -> None:
        b, kind, lam = ex
        run = _Run(adapter, b)
        init = random_state(kind, b)
        x, dy = b.xs[0].astype(np.float64), b.dys[0].astype(np.float64)
        gamma = None if b.gamma is None else b.gamma.astype(np.float64)
        beta = None if b.beta is None else b.beta.astype(np.float64)
        step = run.step(kind, lam=lam if kind == "mbn" else 0.0)

        def loss(
            xv: np.ndarray, gv: np.ndarray | None, bv: np.ndarray | None
        ) -> tuple[float, float]:
            y, _, _ = run.train(
                step,
                run.state(kind, init),
                xv,
                gamma=None if gv is None else adapter.from_numpy(gv),
                beta=None if bv is None else adapter.from_numpy(bv),
            )
            return float(np.sum(dy * y)), float(np.sum(np.abs(dy * y)))

        _, _, ctx = run.train(step, run.state(kind, init), x)
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
        label = f"{kind}, lam={step.lam:g}" if kind == "mbn" else kind
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


def bn_dx_sums_to_zero(adapter: Adapter, s: hypothesis.settings | None = None) -> None:
    """BN's ``dx`` sums to zero per channel, to the dtype's tolerance relative to what cancels.

    ``dx = gamma/sigma * (dy - mean(dy) - xhat * mean(dy * xhat))``: its sum cancels terms of
    total magnitude ``T = |gamma|/sigma * (sum|dy| + |sum dy| + sum|xhat| * |mean(dy*xhat)|)``
    (float64, from the inputs), which can be far larger than ``sum|dx|`` (few values per
    channel). Allowed: ``rtol * S + atol * max(1, S)``, ``S = max(sum|dx|, T)`` (``atol``
    relative to the magnitude, as in every comparison); on offset data (half the examples)
    the tolerance of their conditioning: the mean's rounding moves every ``x - mean`` alike,
    so that ``sum(x - mean)`` is off by ``m`` times it.
    """

    def body(b: Batch) -> None:
        run = _Run(adapter, b)
        state = run.state("bn", random_state("bn", b))
        _, _, ctx = run.train(run.step("bn"), state, b.xs[0])
        dx, _, _ = run.backward(ctx, b.dys[0])
        axes = b.reduce_axes
        total = dx.sum(axis=axes)
        mean, var = b.moments(b.xs[0])
        rstd = 1 / np.sqrt(var + b.eps)
        xhat = (b.xs[0].astype(np.float64) - b.per_channel(mean)) * b.per_channel(rstd)
        dy = b.dys[0].astype(np.float64)
        g = np.ones(b.channels) if b.gamma is None else np.abs(b.gamma.astype(np.float64))
        cancels = (
            g
            * rstd
            * (
                np.abs(dy).sum(axis=axes)
                + np.abs(dy.sum(axis=axes))
                + np.abs(xhat).sum(axis=axes) * np.abs((dy * xhat).mean(axis=axes))
            )
        )
        scale = np.maximum(np.abs(dx).sum(axis=axes), cancels)
        tol = _tol(b, "dx")
        allowed = tol.rtol * scale + tol.atol * np.maximum(1.0, scale)
        if np.any(~(np.abs(total) <= allowed)):
            c = int(np.argmax(np.abs(total) - allowed))
            raise AssertionError(
                f"bn_dx_sums_to_zero: channel {c}: sum(dx) = {total[c]:.3g}, allowed "
                f"{allowed[c]:.3g} (rtol {tol.rtol:.2g} * S + atol {tol.atol:.2g} * max(1, S), "
                f"S = {scale[c]:.3g} the magnitude of what cancels){_where(b)}"
            )

    _given("bn_dx_sums_to_zero", batches(adapter, offset=None), body, s)


def _partition(n: int, cuts: list[int]) -> list[int]:
    bounds = [0, *sorted(cuts), n]
    return [hi - lo for lo, hi in itertools.pairwise(bounds)]


def _is_sync(adapter: Adapter) -> bool:
    return isinstance(adapter, SyncAdapter | FusedSyncAdapter)


def sync_shard_equivalence(adapter: Adapter, s: hypothesis.settings | None = None) -> None:
    """A synchronized step over a random partition of N equals ``train_step`` on the whole.

    Unequal sizes and empty shards are allowed; compared over 1-2 steps: outputs, gradients,
    state. Half the examples (float64, float32) are offset data, compared with the tolerance
    of their conditioning, so that a merge by raw moments fails where the adapter's
    single-device step is stable. ``sync_train_step``/``sync_backward`` are used where the
    adapter has them, else the fused ``sync_step``.
    """
    kinds: list[Kind] = [k for k in ("bn", "mbn") if k in adapter.capabilities.algorithms]

    @st.composite
    def examples(draw: st.DrawFn) -> tuple[Batch, Kind, list[int], float, float]:
        b = draw(batches(adapter, steps=draw(st.integers(1, 2)), offset=None))
        # cut points uniform over [0, N] (from the batch's seed: hypothesis would favour all
        # cuts at 0, one shard holding everything), plus an empty shard somewhere, half the time
        rng = np.random.default_rng(b.seed + 3)
        n, k = b.shape[0], draw(st.integers(2, 4))
        sizes = _partition(n, [int(c) for c in rng.integers(0, n + 1, size=k - 1)])
        if draw(st.booleans()):
            sizes.insert(int(rng.integers(0, len(sizes) + 1)), 0)
        kind = draw(st.sampled_from(kinds))
        return b, kind, sizes, draw(st.floats(0, 1)), draw(st.floats(0, 1))

    def body(ex: tuple[Batch, Kind, list[int], float, float]) -> None:
        b, kind, sizes, lam, d = ex
        run = _Run(adapter, b)
        init = random_state(kind, b)
        one, many = run.state(kind, init), run.state(kind, init)
        bounds = np.cumsum([0, *sizes])
        parts = list(itertools.pairwise(bounds))
        backward = adapter.capabilities.backward
        for k, (x, dy) in enumerate(zip(b.xs, b.dys, strict=True)):
            what = f"sync_shard_equivalence ({kind}, shards {sizes}) step {k}"
            kappa = b.kappa([x])

            def tol(q: str, k: int = k, kappa: float = kappa) -> tolerances.Tolerance:
                return _tol(b, q, kappa=kappa).scaled(math.sqrt(k + 1))

            step = run.step(kind, index=k, decay=d, lam=lam if kind == "mbn" else 0.0, tau=d)
            y, one, ctx = run.train(step, one, x)
            dys = [dy[lo:hi] for lo, hi in parts] if backward else None
            ys, many, sdx, sdg, sdb = run.sync(step, many, [x[lo:hi] for lo, hi in parts], dys)
            if len(ys) != len(sizes):
                raise AssertionError(f"{what}: {len(ys)} outputs for {len(sizes)} shards")
            _close(f"{what}: concatenated y", np.concatenate(ys), y, tol("y"), b)
            if backward:
                dx, dg, db = run.backward(ctx, dy)
                if sdx is None or len(sdx) != len(sizes):
                    got = "none" if sdx is None else len(sdx)
                    raise AssertionError(f"{what}: {got} dx arrays for {len(sizes)} shards")
                _close(f"{what}: concatenated dx", np.concatenate(sdx), dx, tol("dx"), b)
                if dg is not None and db is not None:
                    _close(f"{what}: dgamma", sdg, dg, tol("dgamma"), b)
                    _close(f"{what}: dbeta", sdb, db, tol("dbeta"), b)
            _same_state(what, run, many, run.state_np(one), tol)

    _given("sync_shard_equivalence", examples(), body, s)


# -- registry -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Property:
    """A named law, the function that checks it, and what the adapter must declare for it.

    The check generator's interface (:class:`mbn_conformance.checks.Law`): :attr:`id`,
    :attr:`doc`, :meth:`needs`, :meth:`check`.
    """

    name: str
    law: Callable[[Adapter, hypothesis.settings | None], None]
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
        """The first line of the law's docstring."""
        return (self.law.__doc__ or "").strip().splitlines()[0]

    def needs(self, adapter: Adapter) -> str | None:
        """Why ``adapter`` cannot be checked for this law (``None`` if it can)."""
        caps = adapter.capabilities
        missing = [a for a in self.needs_algorithms if a not in caps.algorithms]
        if missing:
            return f"algorithm {'+'.join(missing)} not declared"
        if self.name == "backward_finite_differences" and not {"bn", "mbn"} & set(caps.algorithms):
            return "neither bn nor mbn declared"
        if self.needs_backward and not caps.backward:
            return "backward not declared"
        if self.needs_float64 and "float64" not in caps.dtypes:
            return "finite differences need float64, which is not declared"
        if self.needs_sync and not _is_sync(adapter):
            return "no sync_train_step/sync_backward or sync_step"
        return None

    def check(self, adapter: Adapter, settings: Any = None) -> None:
        """Check the law on ``adapter`` under hypothesis ``settings`` (default profile).

        Raises ``AssertionError`` (hypothesis' falsifying example in its notes) when it
        fails; an exception of the adapter's propagates as itself.
        """
        self.law(adapter, settings)


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
"""Every property, in report order."""


def check(adapter: Adapter, name: str, s: hypothesis.settings | None = None) -> None:
    """Run one property by name; ``AssertionError`` with the falsifying example if it fails."""
    for prop in PROPERTIES:
        if prop.name == name:
            prop.check(adapter, s)
            return
    raise KeyError(f"no property {name!r}; known: {[p.name for p in PROPERTIES]}")
