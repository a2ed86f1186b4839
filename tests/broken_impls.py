"""Deliberately broken BN/MBN implementations: the conformance suite must catch every one.

:class:`HandWrittenBN` is a small, self-contained NumPy implementation of BN, dynamic BN,
MBN and synchronized statistics (it does not call :mod:`mbn_ref`), written the way a port
would be, with the adapter protocol of :mod:`mbn_conformance.protocol`. With ``bug=None`` it
is correct and passes every golden case (the *control*: it proves that a failure below is
the bug's doing, not the hand-written code's). Each entry of :data:`BUGS` switches on one
realistic mistake, the kind seen in public BN code:

====  ======================  =====================================================
(a)   ``decay_as_rate``       momentum convention swapped: every decay used as an
                              update rate (``s <- (1-d)*s + d*batch``)
(b)   ``eps_outside_sqrt``    ``(x - mu) / (sqrt(var) + eps)``
(c)   ``unbiased_normalize``  normalizing with the unbiased variance ``var*m/(m-1)``
(d)   ``biased_running_var``  declares the unbiased running variance, stores the biased
(e)   ``eq13_typo``           the printed Eq. 13: ``(xhat_i - mu_M)`` in ``dL/dvar_B``
(f)   ``tau_complemented``    inference decay complemented twice (``tau -> 1 - tau``)
(g)   ``eq11_zero_indexed``   Eq. 11 evaluated at the 0-indexed step count
(h)   ``mean_of_means``       sync: global mean/var = plain average of shard means/vars
(i)   ``raw_moments``         variance as ``E[x^2] - E[x]^2`` in the input's precision
(j)   ``empty_shard_nan``     an empty shard's ``0/0`` statistics poison the merge
(j2)  ``empty_batch_update``  an empty (N = 0) batch still updates the state
====  ======================  =====================================================

Regenerate the catch table in the docs with
``python tests/broken_impls.py --write docs/conformance_catch_table.md --docs
docs/conformance.md``;
``tests/test_conformance_catches.py`` checks that the committed table is current.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mbn_conformance import Capabilities, CaseResult, Setup, Step, checks
from mbn_conformance.vectors import Case

State = dict[str, np.ndarray]

FLOAT_KEYS = {
    "bn": ("running_mean", "running_var"),
    "mbn": ("running_mean", "running_var", "moving_mean", "moving_var"),
}


@dataclass
class _Ctx:
    """What the backward pass needs from a training step (one shard or all of them)."""

    xs: list[np.ndarray]  # the shards' inputs, channel axis moved to 1, compute dtype
    dtypes: list[np.dtype[Any]]
    axis: int
    gamma: np.ndarray | None  # (C,), compute dtype
    mean: np.ndarray  # the mean that normalized the batch
    rstd: np.ndarray  # 1/sqrt(var + eps) that normalized it
    batch_mean: np.ndarray  # mu_B (global in sync mode)
    weight: float  # 1 - lam (1 for BN): how much the batch's statistics carry gradient
    m: int  # values per channel (global in sync mode)


def _to_nc(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` with the channel axis at 1, flattened to ``(N, C, rest)``."""
    x = np.moveaxis(x, axis % x.ndim, 1)
    return x.reshape(x.shape[0], x.shape[1], int(np.prod(x.shape[2:])))


def _from_nc(y: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray:
    ax = axis % like.ndim
    moved = np.moveaxis(np.empty(like.shape, dtype=np.uint8), ax, 1).shape
    return np.moveaxis(y.reshape(moved), 1, ax)


def _channel(v: np.ndarray) -> np.ndarray:
    return v[None, :, None]


def _compute_dtype(dtype: np.dtype[Any]) -> type[np.floating[Any]]:
    """Statistics accumulate in at least float32 (docs/spec.md §7)."""
    return np.float64 if dtype == np.float64 else np.float32


class HandWrittenBN:
    """A hand-written NumPy BN/MBN; ``bug`` (a key of :data:`BUGS`) switches on one mistake.

    The state is a dict under the suite's canonical keys, kept in float64; inputs are
    computed in float32 (float16, float32) or float64 and outputs returned in their dtype.
    """

    def __init__(self, bug: str | None = None, *, running_var: str = "biased") -> None:
        if bug is not None and bug not in BUGS:
            raise ValueError(f"unknown bug {bug!r}; choose from {sorted(BUGS)}")
        self.bug = bug
        self.name = f"hand-written numpy BN/MBN ({bug or 'correct'})"
        self.capabilities = Capabilities(running_var=running_var)

    # -- arrays and state ---------------------------------------------------------------
    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)

    def to_numpy(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)

    def init_state(self, setup: Setup) -> State:
        num_features = setup.num_features
        state = {k: np.zeros(num_features) for k in FLOAT_KEYS[setup.kind]}
        state["running_var"] = np.ones(num_features)
        if "moving_var" in state:
            state["moving_var"] = np.ones(num_features)
        state["num_batches_tracked"] = np.asarray(0, dtype=np.int64)
        return state

    def load_state(self, state: State, values: Mapping[str, np.ndarray]) -> State:
        return {k: np.array(values[k], dtype=v.dtype, copy=True) for k, v in state.items()}

    def state_to_numpy(self, state: State) -> dict[str, np.ndarray]:
        return dict(state)

    # -- the math -----------------------------------------------------------------------
    def _has(self, bug: str) -> bool:
        return self.bug == bug

    def _moments(self, shards: list[np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
        """Global ``(m, mean, biased var)`` over shards of shape ``(N_k, C, rest)``."""
        counts = [s.shape[0] * s.shape[2] for s in shards]
        m = sum(counts)
        if self._has("mean_of_means") and len(shards) > 1:  # (h): each non-empty shard weighs 1
            parts = [s for s in shards if s.size]
            means = [s.mean(axis=(0, 2)) for s in parts]
            vars_ = [s.var(axis=(0, 2)) for s in parts]
            return m, np.mean(means, axis=0), np.mean(vars_, axis=0)
        if self._has("empty_shard_nan") and len(shards) > 1:
            # (j): per-shard mean sum/n (0/0 = NaN for an empty shard), merged count-weighted:
            # 0 * NaN is NaN, so one empty shard makes the global statistics NaN
            with np.errstate(invalid="ignore", divide="ignore"):
                means = [s.sum(axis=(0, 2)) / n for s, n in zip(shards, counts, strict=True)]
                mean = sum(n * mk for n, mk in zip(counts, means, strict=True)) / m
                m2 = [
                    ((s - _channel(mk)) ** 2).sum(axis=(0, 2))
                    for s, mk in zip(shards, means, strict=True)
                ]
                var = (
                    sum(
                        q + n * (mk - mean) ** 2 for q, n, mk in zip(m2, counts, means, strict=True)
                    )
                    / m
                )
            return m, np.asarray(mean), np.asarray(var)
        total = sum(s.sum(axis=(0, 2)) for s in shards)
        if m == 0:
            with np.errstate(invalid="ignore"):
                nan = np.asarray(total) / 0.0
            return 0, nan, nan
        mean = np.asarray(total / m)
        if self._has("raw_moments"):  # (i): E[x^2] - E[x]^2 in the compute dtype
            sq = sum((s * s).sum(axis=(0, 2)) for s in shards)
            return m, mean, np.asarray(sq / m - mean * mean)
        var = sum(((s - _channel(mean)) ** 2).sum(axis=(0, 2)) for s in shards) / m
        return m, mean, np.asarray(var)

    def _decay(self, d: float | None, n: int) -> float:
        """A decay (weight on history); ``None``: the cumulative average's ``n/(n+1)``."""
        if d is None:
            return n / (n + 1)
        return 1.0 - d if self._has("decay_as_rate") else d

    def _running_var(self, var: np.ndarray, m: int, estimator: str) -> np.ndarray:
        if estimator == "unbiased" and not self._has("biased_running_var"):
            return var * (m / (m - 1))
        return var

    def _lam(self, lam: float, state: State, batch_size: int) -> float:
        """The training decay; :class:`OwnScheduleMBN` computes its own."""
        return lam

    def _forward(
        self,
        step: Step,
        state: State,
        xs: Sequence[np.ndarray],
        gamma: np.ndarray | None,
        beta: np.ndarray | None,
    ) -> tuple[list[np.ndarray], State, _Ctx]:
        algorithm, decay, lam, tau = step.kind, step.decay, step.lam, step.tau
        eps, axis, estimator = step.eps, step.axis, step.estimator
        dtypes = [x.dtype for x in xs]
        cdt = _compute_dtype(dtypes[0])
        shards = [_to_nc(x, axis).astype(cdt) for x in xs]
        m, mean, var = self._moments(shards)
        g = None if gamma is None else gamma.astype(cdt)
        b = None if beta is None else beta.astype(cdt)
        n = int(state["num_batches_tracked"])
        if algorithm == "mbn":
            lam = self._lam(lam, state, sum(x.shape[0] for x in xs))
        if m == 0 and not self._has("empty_batch_update"):  # docs/spec.md §9: state unchanged
            ctx = _Ctx(shards, dtypes, axis, g, mean, mean, mean, 0.0, 0)
            return [x.copy() for x in xs], state, ctx
        bn_alone = algorithm == "bn" or lam == 0.0
        if m == 1 and bn_alone:
            raise ValueError("expected more than 1 value per channel when training")
        norm_var = var * (m / (m - 1)) if self._has("unbiased_normalize") else var
        new = dict(state)
        new["num_batches_tracked"] = np.asarray(n + 1, dtype=np.int64)
        if algorithm == "bn":
            d = self._decay(decay, n)
            new["running_mean"] = d * state["running_mean"] + (1 - d) * mean
            new["running_var"] = d * state["running_var"] + (1 - d) * self._running_var(
                var, m, estimator
            )
            mu, v, weight = mean, norm_var, 1.0
        else:
            lam_d = self._decay(lam, n)
            new["moving_mean"] = lam_d * state["moving_mean"] + (1 - lam_d) * mean
            new["moving_var"] = lam_d * state["moving_var"] + (1 - lam_d) * norm_var
            t = self._decay(tau, n)
            if self._has("tau_complemented") and tau is not None:
                t = 1.0 - t  # (f): the adapter passes 1 - tau, the layer complements again
            new["running_mean"] = t * state["running_mean"] + (1 - t) * mean
            new["running_var"] = t * state["running_var"] + (1 - t) * self._running_var(
                var, m, estimator
            )
            mu = new["moving_mean"].astype(cdt)
            v = new["moving_var"].astype(cdt)
            weight = 1.0 - lam
        rstd = self._rstd(np.asarray(v, dtype=cdt), eps)
        mu = np.asarray(mu, dtype=cdt)
        ys = [self._affine((s - _channel(mu)) * _channel(rstd), g, b) for s in shards]
        ctx = _Ctx(shards, dtypes, axis, g, mu, rstd, np.asarray(mean, dtype=cdt), weight, m)
        outs = [_from_nc(y, x, axis).astype(x.dtype) for y, x in zip(ys, xs, strict=True)]
        return outs, new, ctx

    def _rstd(self, var: np.ndarray, eps: float) -> np.ndarray:
        if self._has("eps_outside_sqrt"):  # (b)
            with np.errstate(invalid="ignore"):
                return np.asarray(1.0 / (np.sqrt(var) + eps))
        with np.errstate(invalid="ignore"):
            return np.asarray(1.0 / np.sqrt(var + eps))

    @staticmethod
    def _affine(xhat: np.ndarray, g: np.ndarray | None, b: np.ndarray | None) -> np.ndarray:
        if g is not None:
            xhat = xhat * _channel(g)
        if b is not None:
            xhat = xhat + _channel(b)
        return xhat

    def _backward(
        self, ctx: _Ctx, dys: Sequence[np.ndarray]
    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        cdt = _compute_dtype(ctx.dtypes[0])
        dyn = [_to_nc(dy, ctx.axis).astype(cdt) for dy in dys]
        c = ctx.mean.shape[0]
        if ctx.m == 0:
            zeros = np.zeros(c)
            return list(dys), zeros, zeros
        mu, rstd = _channel(ctx.mean), _channel(ctx.rstd)
        gs = [dy if ctx.gamma is None else dy * _channel(ctx.gamma) for dy in dyn]
        sum_g = sum(g.sum(axis=(0, 2)) for g in gs)
        if self._has("eq13_typo"):  # (e): (xhat_i - mu_M) where (x_i - mu_M) belongs
            sum_gx = sum(
                (g * ((x - mu) * rstd - mu)).sum(axis=(0, 2))
                for g, x in zip(gs, ctx.xs, strict=True)
            )
        else:
            sum_gx = sum((g * (x - mu)).sum(axis=(0, 2)) for g, x in zip(gs, ctx.xs, strict=True))
        k = ctx.weight / ctx.m
        mu_b = _channel(ctx.batch_mean)
        dxs = []
        for g, x, dy, dt in zip(gs, ctx.xs, dys, ctx.dtypes, strict=True):
            dx = rstd * g - k * rstd * _channel(sum_g) - k * (x - mu_b) * rstd**3 * _channel(sum_gx)
            dxs.append(_from_nc(dx, dy, ctx.axis).astype(dt))
        dgamma = sum(
            (dy * (x - mu) * rstd).sum(axis=(0, 2)) for dy, x in zip(dyn, ctx.xs, strict=True)
        )
        dbeta = sum(dy.sum(axis=(0, 2)) for dy in dyn)
        return dxs, np.asarray(dgamma), np.asarray(dbeta)

    # -- the adapter protocol -----------------------------------------------------------
    def train_step(
        self,
        step: Step,
        state: State,
        x: np.ndarray,
        gamma: np.ndarray | None,
        beta: np.ndarray | None,
    ) -> tuple[np.ndarray, State, _Ctx]:
        ys, new, ctx = self._forward(step, state, [x], gamma, beta)
        return ys[0], new, ctx

    def eval_step(
        self,
        step: Step,
        state: State,
        x: np.ndarray,
        gamma: np.ndarray | None,
        beta: np.ndarray | None,
    ) -> np.ndarray:
        cdt = _compute_dtype(x.dtype)
        xn = _to_nc(x, step.axis).astype(cdt)
        mu = state["running_mean"].astype(cdt)
        rstd = self._rstd(state["running_var"].astype(cdt), step.eps)
        g = None if gamma is None else gamma.astype(cdt)
        b = None if beta is None else beta.astype(cdt)
        y = self._affine((xn - _channel(mu)) * _channel(rstd), g, b)
        return _from_nc(y, x, step.axis).astype(x.dtype)

    def backward(self, ctx: _Ctx, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dxs, dgamma, dbeta = self._backward(ctx, [dy])
        return dxs[0], dgamma, dbeta

    def sync_train_step(
        self,
        step: Step,
        state: State,
        shards: Sequence[np.ndarray],
        gamma: np.ndarray | None,
        beta: np.ndarray | None,
    ) -> tuple[list[np.ndarray], State, _Ctx]:
        return self._forward(step, state, list(shards), gamma, beta)

    def sync_backward(
        self, ctx: _Ctx, dys: Sequence[np.ndarray]
    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        return self._backward(ctx, dys)


class OwnScheduleMBN(HandWrittenBN):
    """(g) A port whose MBN layer drives ``lam`` itself: Eq. 11 per step, from its own step
    counter, configured with the golden trajectories' ``T = 5`` and ``m0 = 32`` (``m`` = the
    batch size N). It ignores the ``lam`` the suite passes, so it can only be run on the
    Eq. 11 cases (``--cases '*lameq11*'``), which carry ``lam = Eq11(k + 1)`` at step ``k``.

    Correct: the paper's 1-indexed epoch ``t = count + 1``. The bug: ``t = count`` (the
    0-indexed count), clamped to ``t >= 1`` because the printed formula is meaningless for
    ``t = 0`` (it gives a negative decay). The schedule then lags one step: ``lam = 0`` twice,
    and the last step gets ``lam(T-1)`` instead of ``lam(T) = 1 - m/m0``.
    """

    TOTAL = 5
    IDEAL = 32

    def _lam(self, lam: float, state: State, batch_size: int) -> float:
        count = int(state["num_batches_tracked"])
        t = max(count, 1) if self._has("eq11_zero_indexed") else count + 1
        r = min(batch_size / self.IDEAL, 1.0)
        return float(r ** ((self.TOTAL - min(t, self.TOTAL)) / (self.TOTAL - 1)) - r)


@dataclass(frozen=True)
class Bug:
    """One deliberately broken implementation and the cases it is run on."""

    key: str
    label: str
    summary: str
    make: Callable[[str | None], HandWrittenBN]
    select: tuple[str, ...] = ()


def _plain(bug: str | None) -> HandWrittenBN:
    return HandWrittenBN(bug)


def _unbiased_only(bug: str | None) -> HandWrittenBN:
    return HandWrittenBN(bug, running_var="unbiased")


def _own_schedule(bug: str | None) -> HandWrittenBN:
    return OwnScheduleMBN(bug)


_BUG_LIST = (
    Bug("decay_as_rate", "a", "momentum convention swapped (decay used as update rate)", _plain),
    Bug("eps_outside_sqrt", "b", "eps outside the square root: (x-mu)/(sqrt(var)+eps)", _plain),
    Bug("unbiased_normalize", "c", "unbiased variance used to normalize", _plain),
    Bug(
        "biased_running_var",
        "d",
        "declares running_var='unbiased' but stores the biased variance",
        _unbiased_only,
    ),
    Bug("eq13_typo", "e", "printed Eq. 13 typo in the backward: (xhat_i - mu_M)", _plain),
    Bug("tau_complemented", "f", "inference decay complemented twice (tau -> 1 - tau)", _plain),
    Bug(
        "eq11_zero_indexed",
        "g",
        "Eq. 11 at the 0-indexed step (own schedule, t = max(count, 1))",
        _own_schedule,
        ("*lameq11*",),
    ),
    Bug("mean_of_means", "h", "sync: average of shard means and shard variances", _plain),
    Bug("raw_moments", "i", "variance as E[x^2] - E[x]^2 in the input's precision", _plain),
    Bug("empty_shard_nan", "j", "an empty shard's 0/0 statistics poison the merge", _plain),
    Bug("empty_batch_update", "j2", "an empty (N = 0) batch updates the state", _plain),
)
BUGS: dict[str, Bug] = {b.key: b for b in _BUG_LIST}
CAUGHT_BY_GOLDEN = tuple(b.key for b in _BUG_LIST)


def run_bug(bug: Bug, cases: Sequence[Case], *, broken: bool = True) -> list[CaseResult]:
    """Run ``bug``'s implementation (or its correct control) on its selected cases."""
    chosen = [
        c for c in cases if not bug.select or any(fnmatch.fnmatch(c.id, p) for p in bug.select)
    ]
    adapter = bug.make(bug.key if broken else None)
    return [c.outcome() for c in checks(adapter, cases=chosen, refusals=False, schedules=False)]


def caught(results: Sequence[CaseResult]) -> list[CaseResult]:
    return [r for r in results if r.status in ("fail", "error")]


TABLE_HEAD = (
    "| bug | broken implementation | cases run | caught by | example case | worst quantity "
    "| diagnosis |"
)


def catch_table(cases: Sequence[Case]) -> str:
    """The Markdown catch table of the bugs the committed golden set catches."""
    lines = [
        "<!-- generated by `python tests/broken_impls.py --write docs/conformance_catch_table.md"
        " --docs docs/conformance.md`;",
        "     tests/test_conformance_catches.py checks that it is current -->",
        "",
        TABLE_HEAD,
        "| --- | --- | ---: | ---: | --- | --- | --- |",
    ]
    for key in CAUGHT_BY_GOLDEN:
        bug = BUGS[key]
        results = [r for r in run_bug(bug, cases) if r.status != "skip"]
        hits = caught(results)
        example = hits[0] if hits else None
        worst = "" if example is None else (example.worst or example.reason)
        said = next((r.diagnoses[0] for r in hits if r.diagnoses), "")
        lines.append(
            f"| ({bug.label}) `{bug.key}` | {bug.summary} | {len(results)} | {len(hits)} | "
            f"`{example.id if example else '-'}` | {worst} | {said} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from mbn_conformance import vectors

    parser = argparse.ArgumentParser(description="Print or write the conformance catch table.")
    parser.add_argument("--write", type=Path, default=None, help="write the table to this file")
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="also replace the copy of the table in this page (docs/conformance.md)",
    )
    args = parser.parse_args(argv)
    table = catch_table(vectors.read())
    if args.write is None:
        sys.stdout.write(table)
    else:
        args.write.write_text(table, encoding="utf-8")
        print(f"wrote {args.write}")
    if args.docs is not None:
        page = args.docs.read_text(encoding="utf-8")
        start = page.index(TABLE_HEAD)
        end = page.index("\n\n", start)
        body = table.split("\n", 3)[3].rstrip("\n")
        args.docs.write_text(page[:start] + body + page[end:], encoding="utf-8")
        print(f"updated the table in {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def make_eps_outside_sqrt() -> HandWrittenBN:
    """An ``--impl`` factory (``broken_impls:make_eps_outside_sqrt``) for the CLI tests."""
    return HandWrittenBN("eps_outside_sqrt")
