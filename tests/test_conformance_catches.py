"""The conformance suite catches real bugs: every broken implementation of
``tests/broken_impls.py`` fails at least one golden case, and its correct control passes.

A test that cannot fail is a defect: the controls prove the failures are the bugs' doing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from broken_impls import BUGS, CAUGHT_BY_GOLDEN, HandWrittenBN, catch_table, caught, run_bug

from mbn_conformance import run, summary, vectors

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "conformance_catch_table.md"

# bug -> case-id patterns, at least one of which must be among the failing cases: the cases
# designed to expose it (docs/spec.md §10's grid), not just any case that happens to fail
EXPECTED_CATCHERS: dict[str, tuple[str, ...]] = {
    "decay_as_rate": ("bn/*/N2/float64/eps1e-05", "mbn/*lam0.9375*"),
    "eps_outside_sqrt": ("*/eps0.5*", "*zero_var_channel"),
    "unbiased_normalize": ("bn/NC/N3/float64/eps1e-05",),
    "biased_running_var": ("bn/*/N2/float64/eps1e-05", "mbn/*lam0.5*"),
    "eq13_typo": ("bn/NCHW/N2/float64/eps1e-05", "mbn/*lam0.5*"),
    "tau_complemented": ("mbn/*lameq11-taueq12", "mbn/*lam0.5/*"),
    "eq11_zero_indexed": ("mbn/*lameq11-taueq12",),
    "mean_of_means": ("sync/NCL/N5/*shards1-0-4", "sync/NCHW/N6/*shards3-3"),
    "raw_moments": ("bn/NCHW/N3/float32/eps1e-05/offset",),
    "empty_shard_nan": ("sync/NCL/N5/*shards1-0-4", "sync-mbn/*shards0-2-0-5*"),
    "empty_batch_update": ("bn/NCHW/N0/*", "mbn/NC/N0/*"),
}
# bug -> what the diagnosis of a failed running statistic says (the implied decay)
EXPECTED_DIAGNOSES: dict[str, str] = {
    "decay_as_rate": "running_mean: history weight 0.1, expected 0.9 (its complement",
    "biased_running_var": "running_var: updated with the biased batch statistic, not the "
    "unbiased one (history weight 0.9 as expected)",
    "unbiased_normalize": "moving_var: updated with the unbiased batch statistic, not the "
    "biased one",
    "tau_complemented": "running_mean: history weight 0.1, expected 0.9",
    "eq11_zero_indexed": "step 1 moving_mean: history weight 0, expected 0.0625",
    "empty_batch_update": "step 0 running_mean: changed by an empty batch (expected unchanged)",
}
# bugs that only the cases built for them can see: nothing else may fail
ONLY_THERE = {
    "raw_moments": "*offset*",
    "empty_shard_nan": "sync*",
    "mean_of_means": "sync*",
    "eq11_zero_indexed": "*lameq11*",
    "empty_batch_update": "*/N0/*",
}


@pytest.fixture(scope="module")
def cases() -> list[vectors.Case]:
    return vectors.read()


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_control_passes_everything(cases: list[vectors.Case], estimator: str) -> None:
    results = run(HandWrittenBN(None, running_var=estimator), cases)
    undefined = sum(estimator not in c.estimators for c in cases)  # one value per channel
    assert summary(results)["pass"] == len(cases) - undefined, [
        (r.id, r.status, r.failures[:1], r.reason) for r in results if r.status != "pass"
    ]


@pytest.mark.parametrize("key", CAUGHT_BY_GOLDEN)
def test_bug_is_caught(key: str, cases: list[vectors.Case]) -> None:
    import fnmatch

    bug = BUGS[key]
    control = run_bug(bug, cases, broken=False)
    assert all(r.status in ("pass", "skip") for r in control), key
    results = run_bug(bug, cases)
    hits = {r.id for r in caught(results)}
    assert hits, f"{key} is not caught by any golden case"
    patterns = EXPECTED_CATCHERS[key]
    assert any(fnmatch.fnmatchcase(c, p) for c in hits for p in patterns), (key, sorted(hits))
    if key in ONLY_THERE:
        assert all(fnmatch.fnmatchcase(c, ONLY_THERE[key]) for c in hits), sorted(hits)
    if key in EXPECTED_DIAGNOSES:
        said = [d for r in caught(results) for d in r.diagnoses]
        assert any(EXPECTED_DIAGNOSES[key] in d for d in said), said[:5]


def test_diagnoses_are_silent_for_correct_statistics(cases: list[vectors.Case]) -> None:
    """A bug outside the running statistics gets no decay diagnosis: nothing is invented."""
    results = run_bug(BUGS["eq13_typo"], cases)  # a backward bug
    assert caught(results) and not any(r.diagnoses for r in results)


def test_eq11_cases_carry_one_indexed_lambda(cases: list[vectors.Case]) -> None:
    """Why (g) is caught: step k of an Eq. 11 case carries lam(k + 1), so lam = 0 only once."""
    from mbn_ref.schedules import mbn_lambda

    eq11 = [c for c in cases if "lameq11" in c.id]
    assert eq11
    for c in eq11:
        lams = [s["lam"] for s in c.steps if s["training"]]
        n = c.shape[0]
        assert lams == [mbn_lambda(k + 1, total_epochs=5, batch_size=n) for k in range(5)]
        assert lams.count(0.0) == 1 and lams[-1] == 1 - n / 32


def test_catch_table_is_current(cases: list[vectors.Case]) -> None:
    expected = catch_table(cases)
    assert TABLE.exists(), (
        "run: python tests/broken_impls.py --write docs/conformance_catch_table.md "
        "--docs docs/conformance.md"
    )
    assert TABLE.read_text(encoding="utf-8") == expected, (
        "docs/conformance_catch_table.md is stale; regenerate it with python "
        "tests/broken_impls.py --write docs/conformance_catch_table.md --docs docs/conformance.md"
    )
    doc = (ROOT / "docs" / "conformance.md").read_text(encoding="utf-8")
    assert expected.split("\n", 3)[3] in doc, "docs/conformance.md holds an older catch table"
