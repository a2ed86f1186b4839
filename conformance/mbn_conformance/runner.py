"""Run golden cases against an adapter (protocol version 2) and collect the results.

:func:`run_case` plays one case: it tells the adapter the layer (:class:`~.protocol.Setup`),
loads the initial state, and for every step hands it a :class:`~.protocol.Step` and the
inputs, comparing ``y``, ``dx``, ``dgamma``, ``dbeta`` and the whole state after each step
with the expectations under the adapter's declared conventions (its running-variance
estimator; decays and ``eps`` rounded to float32 when it holds hyper-parameters in 32 bits;
no counter when it has none). Synchronized cases go through
:class:`~.protocol.SyncAdapter` when the adapter is one, else through
:class:`~.protocol.FusedSyncAdapter`.

Skips and known failures are decided by :func:`mbn_conformance.checks.checks`; :func:`run`
renders its checks.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from . import diagnosis, tolerances, vectors
from .protocol import Adapter, FusedSyncAdapter, Step, SyncAdapter
from .results import CaseResult, Kind, Status, succeeded, summary

if TYPE_CHECKING:
    from .checks import XfailEntry

__all__ = [
    "AdapterError",
    "CaseResult",
    "Status",
    "run",
    "run_case",
    "succeeded",
    "summary",
]


class AdapterError(Exception):
    """An adapter method raised, or returned something malformed, at a step.

    Attributes
    ----------
    method : str
        The adapter method (``"train_step"``...).
    step : int or None
        The 0-indexed step, ``None`` before the first.
    cause : BaseException
        What it raised.
    """

    def __init__(self, method: str, step: int | None, cause: BaseException) -> None:
        super().__init__(f"{method}() at step {step}: {cause}")
        self.method = method
        self.step = step
        self.cause = cause


def error_result(
    check_id: str,
    kind: Kind,
    method: str | None,
    step: int | None,
    exc: BaseException,
    base: CaseResult | None = None,
) -> CaseResult:
    """An ``error`` result naming the method, the step and the exception, with its traceback.

    ``reason`` is short (for a table row); ``traceback`` is the whole one. ``base`` keeps what
    was measured before the error.
    """
    first = (str(exc).strip().splitlines() or [""])[0]
    where = f"{method}()" if method else "the check"
    if step is not None:
        where += f" at step {step}"
    frames = traceback.extract_tb(exc.__traceback__)
    location = f" [{_short(frames[-1])}]" if frames else ""
    result = base if base is not None else CaseResult(check_id, "error", kind=kind)
    result.status = "error"
    result.reason = f"{where} raised {type(exc).__name__}: {first}{location}"
    result.method, result.step = method, step
    result.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return result


def _short(frame: traceback.FrameSummary) -> str:
    name = frame.filename.replace("\\", "/").rsplit("/", 1)[-1]
    return f"{name}:{frame.lineno} in {frame.name}"


def adapter_method_in(exc: BaseException, adapter: Adapter) -> str | None:
    """The adapter method through which ``exc`` was raised (the outermost such frame)."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_locals.get("self") is adapter:
            return tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    return None


class _Golden:
    """One golden case played against one adapter: the comparisons and their diagnoses."""

    def __init__(self, adapter: Adapter, case: vectors.Case) -> None:
        caps = adapter.capabilities
        self.adapter = adapter
        self.case = case
        self.estimator = caps.running_var
        self.counter = caps.batch_counter
        self.backward = caps.backward
        self.result = CaseResult(case.id, "pass")
        self.m = math.prod(case.shape) // max(case.channels, 1)
        self.diagnosed: set[str] = set()
        self.kappa: float | None = None  # the conditioning of the current step's input
        self.criterion = tolerances.draw_criterion(case.meta)
        self.draw_ok: dict[int, bool] = {}  # draw step -> every draw quantity within tolerance

    # -- calling the adapter ------------------------------------------------------------
    def call(
        self, method: str, k: int | None, fn: Callable[..., Any], *args: Any, returns: int = 0
    ) -> Any:
        """``fn(*args)``, anything it raises turned into an :class:`AdapterError`.

        The error names ``method`` and the step; so does a result that is not a tuple of
        ``returns`` items (when ``returns`` is given).
        """
        try:
            out = fn(*args)
        except Exception as exc:
            raise AdapterError(method, k, exc) from exc
        if returns and (not isinstance(out, tuple | list) or len(out) != returns):
            sized = isinstance(out, tuple | list)
            got = f"a {type(out).__name__} of {len(out)}" if sized else type(out).__name__
            raise AdapterError(method, k, TypeError(f"returned {got}, expected {returns} items"))
        return out

    def put(self, a: np.ndarray, k: int | None) -> Any:
        return self.call("from_numpy", k, self.adapter.from_numpy, a)

    def host(self, a: Any, k: int) -> np.ndarray:
        return np.asarray(self.call("to_numpy", k, self.adapter.to_numpy, a))

    # -- comparing ----------------------------------------------------------------------
    def check(self, k: int, quantity: str, actual: Any, expected: np.ndarray) -> bool:
        """Compare one array; record the worst quantity and any failure. ``True`` if it passes."""
        tol, _ = tolerances.tolerance_for(
            self.case.id, quantity, self.case.meta["dtype"], k, self.m, kappa=self.kappa
        )
        cmp = tolerances.compare(actual, expected, tol)
        r = self.result
        r.max_abs = cmp.max_abs if r.max_abs is None else max(r.max_abs, cmp.max_abs)
        r.max_rel = cmp.max_rel if r.max_rel is None else max(r.max_rel, cmp.max_rel)
        if r.ratio is None or cmp.ratio > r.ratio:  # the first worst: where it started
            r.ratio, r.worst, r.rtol, r.atol = cmp.ratio, f"step {k} {quantity}", tol.rtol, tol.atol
        if not cmp.ok:
            draw = self.is_draw(k, quantity) and np.shape(actual) == np.shape(expected)
            if draw:  # judged over the draws at the end (tolerances.draw_criterion)
                self.draw_ok[k] = False
            else:
                r.status = "fail"
            r.failures.append(
                f"step {k} {quantity}: max abs err {cmp.max_abs:.3g} > allowed "
                f"(rtol {tol.rtol:.2g}, atol {tol.atol:.2g})" + (" [draw]" if draw else "")
                if np.shape(actual) == np.shape(expected)
                else f"step {k} {quantity}: shape {np.shape(actual)} != {np.shape(expected)}"
            )
        return cmp.ok

    def is_draw(self, k: int, quantity: str) -> bool:
        """Whether this comparison is one draw of the case's independent draws."""
        return (
            self.criterion is not None
            and k in self.criterion.steps
            and tolerances.is_draw_quantity(quantity)
        )

    def judge_draws(self) -> None:
        """Apply the case's draw criterion: at least ``k`` of ``n`` draws within tolerance."""
        c = self.criterion
        if c is None:
            return
        within = [self.draw_ok.get(k, True) for k in c.steps]
        bad = within.count(False)
        if not c.passes(within):
            self.result.status = "fail"
            self.result.failures.append(
                f"{bad} of {c.n} independent draws out of tolerance: at least {c.k} must pass"
            )
        elif bad:
            self.result.reason = (
                f"{bad} of {c.n} independent draws out of tolerance, forgiven (at least {c.k} "
                "must pass)"
            )

    def check_dparams(self, k: int, dg: Any, db: Any) -> None:
        if self.case.meta["affine"]:
            edg, edb = self.case.dparams(k)
            self.check(k, "dgamma", self.host(dg, k), edg)
            self.check(k, "dbeta", self.host(db, k), edb)

    def expected(self, name: str, k: int, shard: int | None) -> np.ndarray:
        return self.case.expected(name, k, shard, estimator=self.estimator)

    # -- the steps ----------------------------------------------------------------------
    def shards(self) -> list[int | None]:
        n = self.case.num_shards
        return [None] if n is None else list(range(n))

    def run(self) -> None:
        case, a = self.case, self.adapter
        gamma, beta = (None if p is None else self.put(p, None) for p in case.params())
        state = self.call("init_state", None, a.init_state, case.setup)
        init = case.init_state()
        if not self.counter:
            del init[vectors.COUNT_FIELD]
        state = self.call("load_state", None, a.load_state, state, init)
        before, expected_before = init, case.init_state()
        for k in range(len(case.steps)):
            step = case.step(k, self.estimator)
            xs = [case.array("x", k, s) for s in self.shards()]
            self.kappa = tolerances.conditioning(np.concatenate(xs), step.axis)
            if not step.training:
                self.evaluate(step, state, xs, gamma, beta)
            elif case.num_shards is None:
                state = self.train(step, state, xs[0], gamma, beta)
            else:
                state = self.train_sync(step, state, xs, gamma, beta)
            got = self.call("state_to_numpy", k, a.state_to_numpy, state)
            expected = case.expected_state(k, estimator=self.estimator)
            self.compare_state(step, xs, before, got, expected_before, expected)
            before, expected_before = got, expected
        self.judge_draws()

    def evaluate(self, step: Step, state: Any, xs: list[np.ndarray], gamma: Any, beta: Any) -> None:
        k = step.index
        for s, x in zip(self.shards(), xs, strict=True):
            y = self.call(
                "eval_step", k, self.adapter.eval_step, step, state, self.put(x, k), gamma, beta
            )
            quantity = "y" if s is None else f"y[{s}]"
            self.check(k, quantity, self.host(y, k), self.expected("y", k, s))

    def train(self, step: Step, state: Any, x: np.ndarray, gamma: Any, beta: Any) -> Any:
        k, a = step.index, self.adapter
        y, state, ctx = self.call(
            "train_step", k, a.train_step, step, state, self.put(x, k), gamma, beta, returns=3
        )
        self.check(k, "y", self.host(y, k), self.expected("y", k, None))
        if self.backward:
            dy = self.put(self.case.array("dy", k), k)
            dx, dg, db = self.call("backward", k, a.backward, ctx, dy, returns=3)
            self.check(k, "dx", self.host(dx, k), self.expected("dx", k, None))
            self.check_dparams(k, dg, db)
        return state

    def train_sync(
        self, step: Step, state: Any, xs: list[np.ndarray], gamma: Any, beta: Any
    ) -> Any:
        k, a = step.index, self.adapter
        shards = [self.put(x, k) for x in xs]
        dys = (
            [self.put(self.case.array("dy", k, s), k) for s in range(len(xs))]
            if self.backward
            else None
        )
        if isinstance(a, SyncAdapter):
            method = "sync_train_step"
            ys, state, ctx = self.call(
                method, k, a.sync_train_step, step, state, shards, gamma, beta, returns=3
            )
            dxs = dg = db = None
            if dys is not None:
                dxs, dg, db = self.call("sync_backward", k, a.sync_backward, ctx, dys, returns=3)
        elif isinstance(a, FusedSyncAdapter):
            method = "sync_step"
            ys, state, dxs, dg, db = self.call(
                method, k, a.sync_step, step, state, shards, gamma, beta, dys, returns=5
            )
        else:  # the check generator skips these cases
            raise TypeError(f"{a.name} has no synchronized step (SyncAdapter, FusedSyncAdapter)")
        if dys is not None and dxs is None:
            raise AdapterError(method, k, TypeError("returned no dxs, though given dys"))
        for name, outs in (("y", ys), ("dx", dxs)):
            if outs is None:  # no backward declared
                continue
            if len(outs) != len(xs):
                raise AdapterError(
                    method, k, ValueError(f"{len(outs)} {name} arrays for {len(xs)} shards")
                )
            for s, out in enumerate(outs):
                self.check(k, f"{name}[{s}]", self.host(out, k), self.expected(name, k, s))
        if dys is not None:
            self.check_dparams(k, dg, db)
        return state

    def compare_state(
        self,
        step: Step,
        xs: list[np.ndarray],
        before: dict[str, np.ndarray],
        got: dict[str, np.ndarray],
        expected_before: dict[str, np.ndarray],
        expected: dict[str, np.ndarray],
    ) -> None:
        k = step.index
        for name, value in expected.items():
            if name == vectors.COUNT_FIELD and not self.counter:
                continue
            if name not in got:
                raise AdapterError(
                    "state_to_numpy", k, KeyError(f"no {name!r} (keys: {sorted(got)})")
                )
            ok = self.check(k, name, got[name], value)
            if not ok and name in diagnosis.STATISTICS and name not in self.diagnosed:
                line = self.diagnose(step, name, xs, before, got, expected_before)
                if line is not None:
                    self.diagnosed.add(name)
                    self.result.diagnoses.append(line)

    def diagnose(
        self,
        step: Step,
        name: str,
        xs: list[np.ndarray],
        before: dict[str, np.ndarray],
        got: dict[str, np.ndarray],
        expected_before: dict[str, np.ndarray],
    ) -> str | None:
        """The implied decay of a failed statistic (:mod:`.diagnosis`)."""
        what = f"step {step.index} {name}"
        old, new = before.get(name), got[name]
        if old is None:
            return None
        if not step.training:
            return diagnosis.unchanged_diagnosis(what, old, new, "an evaluation step")
        m, mean, var = diagnosis.batch_moments(xs, step.axis)
        if m == 0:
            return diagnosis.unchanged_diagnosis(what, old, new, "an empty batch")
        if name.startswith("moving"):
            weight: float | None = step.lam
        else:
            weight = step.inference_decay
        if weight is None:  # the cumulative average: the n-th update keeps (n-1)/n
            n = int(expected_before[vectors.COUNT_FIELD]) + 1
            weight = (n - 1) / n
        if name.endswith("mean"):
            return diagnosis.decay_diagnosis(what, old, new, mean, weight)
        if m < 2:
            return diagnosis.decay_diagnosis(what, old, new, var, weight)
        stats = {"biased": var, "unbiased": var * m / (m - 1)}
        # MBN's moving variance is always the biased one; running_var is the declared one
        expected = "biased" if name == "moving_var" else self.estimator
        other = "unbiased" if expected == "biased" else "biased"
        return diagnosis.decay_diagnosis(
            what, old, new, stats[expected], weight, (other, stats[other]), expected
        )


def run_case(adapter: Adapter, case: vectors.Case) -> CaseResult:
    """Play every step of ``case``, comparing outputs, gradients and state after each.

    The result is ``pass``, ``fail`` or ``error``: skips and known failures are
    :func:`mbn_conformance.checks.checks`' business. Expectations follow the adapter's
    declared estimator and, with ``hyperparameter_dtype="float32"``, the case recomputed with
    decays and ``eps`` rounded to float32.
    """
    if adapter.capabilities.hyperparameter_dtype == "float32":
        from .cases import with_float32_hyperparameters

        case = with_float32_hyperparameters(case)
    golden = _Golden(adapter, case)
    try:
        golden.run()
    except AdapterError as err:
        return error_result(case.id, "golden", err.method, err.step, err.cause, golden.result)
    except Exception as exc:  # the suite's own failure: still a row, with its traceback
        return error_result(case.id, "golden", None, None, exc, golden.result)
    return golden.result


def run(
    adapter: Adapter,
    cases: Iterable[vectors.Case] | None = None,
    *,
    select: Sequence[str] = (),
    properties: bool = False,
    xfails: Iterable[XfailEntry] = (),
) -> list[CaseResult]:
    """The outcome of every check of ``adapter`` (:func:`mbn_conformance.checks.checks`).

    Golden cases (default: the committed set) and refusals, and the hypothesis properties
    with ``properties=True``, filtered by id glob patterns; skips and known failures
    applied.
    """
    from .checks import checks

    return [
        c.outcome()
        for c in checks(adapter, cases=cases, select=select, properties=properties, xfails=xfails)
    ]
