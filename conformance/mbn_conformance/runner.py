"""Run golden cases against an adapter and collect a report."""

from __future__ import annotations

import fnmatch
import math
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from . import tolerances, vectors
from .protocol import Adapter, SyncAdapter

Status = Literal["pass", "fail", "error", "skip", "xfail", "xpass"]


@dataclass
class CaseResult:
    """One case's outcome; ``worst`` names the quantity closest to (or past) its tolerance."""

    case: str
    status: Status
    max_abs: float = 0.0
    max_rel: float = 0.0
    rtol: float = math.nan
    atol: float = math.nan
    worst: str = ""
    ratio: float = 0.0
    reason: str = ""
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The result as a plain dictionary of its fields (a row of the JSON report)."""
        return asdict(self)


def skip_reason(adapter: Adapter, case: vectors.Case) -> str | None:
    """Why ``adapter`` cannot run ``case`` (``None`` if it can)."""
    caps = adapter.capabilities
    meta = case.meta
    algorithm = meta["algorithm"]
    needed = {"sync_mbn": ("sync", "mbn")}.get(algorithm, (algorithm,))
    missing = [a for a in needed if a not in caps.algorithms]
    if missing:
        return f"algorithm {'+'.join(missing)} not declared"
    if meta["dtype"] not in caps.dtypes:
        return f"dtype {meta['dtype']} not declared"
    if meta["layout"] not in caps.layouts:
        return f"layout {meta['layout']} not declared"
    if meta["estimator"] not in caps.running_var:
        return f"{meta['estimator']} running variance not declared"
    if not meta["affine"] and not caps.affine_optional:
        return "affine parameters are not optional in this implementation"
    if meta["shards"] is not None and not isinstance(adapter, SyncAdapter):
        return "the adapter has no sync_train_step/sync_backward"
    return None


def known_failure(adapter: Adapter, case_id: str) -> str | None:
    """The reason the adapter declares ``case_id`` a known failure, or ``None``."""
    for pattern, reason in adapter.capabilities.known_failures.items():
        if fnmatch.fnmatchcase(case_id, pattern):
            return reason
    return None


class _Checker:
    """Accumulates comparisons for one case."""

    def __init__(self, case: vectors.Case) -> None:
        self.case = case
        self.result = CaseResult(case.id, "pass")
        shape = case.shape
        self.m = math.prod(shape) // case.channels

    def check(self, step: int, quantity: str, actual: Any, expected: np.ndarray) -> None:
        tol, _ = tolerances.tolerance_for(
            self.case.id, quantity, self.case.meta["dtype"], step, self.m
        )
        cmp = tolerances.compare(actual, expected, tol)
        r = self.result
        r.max_abs = max(r.max_abs, cmp.max_abs)
        r.max_rel = max(r.max_rel, cmp.max_rel)
        if cmp.ratio > r.ratio or not r.worst:  # the first worst: where it started
            r.ratio, r.worst, r.rtol, r.atol = (
                cmp.ratio,
                f"step {step} {quantity}",
                tol.rtol,
                tol.atol,
            )
        if not cmp.ok:
            r.status = "fail"
            r.failures.append(
                f"step {step} {quantity}: max abs err {cmp.max_abs:.3g} > allowed "
                f"(rtol {tol.rtol:.2g}, atol {tol.atol:.2g})"
                if np.shape(actual) == np.shape(expected)
                else f"step {step} {quantity}: shape {np.shape(actual)} != {np.shape(expected)}"
            )


def run_case(adapter: Adapter, case: vectors.Case) -> CaseResult:
    """Run every step of ``case``, comparing outputs, gradients and state after each."""
    reason = skip_reason(adapter, case)
    if reason is not None:
        return CaseResult(case.id, "skip", reason=reason)
    xfail = known_failure(adapter, case.id)
    try:
        result = _run(adapter, case)
    except Exception as exc:  # an implementation's error is a result, not a crash
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        result = CaseResult(case.id, "error", reason=tb)
    if xfail is not None:
        result.status = "xpass" if result.status == "pass" else "xfail"
        result.reason = xfail
    return result


def _run(adapter: Adapter, case: vectors.Case) -> CaseResult:
    meta = case.meta
    kind = case.kind
    chk = _Checker(case)
    to_np = adapter.to_numpy
    gamma, beta = (None if p is None else adapter.from_numpy(p) for p in case.params())
    state = adapter.init_state(kind, case.channels, meta["dtype"])
    state = adapter.load_state(state, case.init_state())
    shards = meta["shards"]
    backward = adapter.capabilities.backward
    for k, step in enumerate(case.steps):
        common = {"eps": meta["eps"], "axis": meta["axis"]}
        if not step["training"]:
            if shards is None:
                y = adapter.eval_step(
                    kind, state, adapter.from_numpy(case.array("x", k)), gamma, beta, **common
                )
                chk.check(k, "y", to_np(y), case.array("y", k))
            else:
                for s in range(len(shards)):
                    y = adapter.eval_step(
                        kind,
                        state,
                        adapter.from_numpy(case.array("x", k, s)),
                        gamma,
                        beta,
                        **common,
                    )
                    chk.check(k, f"y[{s}]", to_np(y), case.array("y", k, s))
        else:
            decays = {
                "decay": step["decay"],
                "lam": step["lam"],
                "tau": step["tau"],
                "estimator": meta["estimator"],
            }
            if shards is None:
                y, state, ctx = adapter.train_step(
                    kind,
                    state,
                    adapter.from_numpy(case.array("x", k)),
                    gamma,
                    beta,
                    **common,
                    **decays,
                )
                chk.check(k, "y", to_np(y), case.array("y", k))
                if backward:
                    dx, dg, db = adapter.backward(ctx, adapter.from_numpy(case.array("dy", k)))
                    chk.check(k, "dx", to_np(dx), case.array("dx", k))
                    _check_dparams(chk, k, case, dg, db, to_np)
            else:
                assert isinstance(adapter, SyncAdapter)
                xs = [adapter.from_numpy(case.array("x", k, s)) for s in range(len(shards))]
                ys, state, ctx = adapter.sync_train_step(
                    kind, state, xs, gamma, beta, **common, **decays
                )
                for s, y in enumerate(ys):
                    chk.check(k, f"y[{s}]", to_np(y), case.array("y", k, s))
                if backward:
                    dys = [adapter.from_numpy(case.array("dy", k, s)) for s in range(len(shards))]
                    dxs, dg, db = adapter.sync_backward(ctx, dys)
                    for s, dx in enumerate(dxs):
                        chk.check(k, f"dx[{s}]", to_np(dx), case.array("dx", k, s))
                    _check_dparams(chk, k, case, dg, db, to_np)
        got = adapter.state_to_numpy(state)
        for name, expected in case.expected_state(k).items():
            if name not in got:
                raise KeyError(f"state_to_numpy() has no {name!r} (keys: {sorted(got)})")
            chk.check(k, name, got[name], expected)
    return chk.result


def _check_dparams(chk: _Checker, k: int, case: vectors.Case, dg: Any, db: Any, to_np: Any) -> None:
    edg, edb = case.dparams(k)
    if case.meta["affine"]:
        chk.check(k, "dgamma", to_np(dg), edg)
        chk.check(k, "dbeta", to_np(db), edb)


def run(
    adapter: Adapter,
    cases: Iterable[vectors.Case] | None = None,
    *,
    select: Sequence[str] = (),
) -> list[CaseResult]:
    """Run ``cases`` (default: the committed golden set), filtered by id glob patterns."""
    if cases is None:
        cases = vectors.read()
    chosen = [c for c in cases if not select or any(fnmatch.fnmatchcase(c.id, p) for p in select)]
    return [run_case(adapter, c) for c in chosen]


def summary(results: Sequence[CaseResult]) -> dict[str, int]:
    """The number of results of each status (every status present, zeros included)."""
    counts = {s: 0 for s in ("pass", "fail", "error", "skip", "xfail", "xpass")}
    for r in results:
        counts[r.status] += 1
    return counts


def succeeded(results: Sequence[CaseResult]) -> bool:
    """No failures or errors (expected failures and skips are fine; an xpass is not)."""
    return not any(r.status in ("fail", "error", "xpass") for r in results)
