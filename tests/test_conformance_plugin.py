"""Tests of the conformance properties, the pytest plugin and the shipped suite.

The plugin and suite are exercised the way a third party uses them: ``pytester`` runs
``pytest --pyargs mbn_conformance.suite`` with the built-in NumPy adapter and with broken
adapters written into the test's directory; the wheel test installs the built wheel into a
fresh virtual environment and runs the suite there, from outside the repository.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from mbn_conformance import builtin, properties, pytest_plugin, vectors
from mbn_conformance.checks import Check, checks
from mbn_conformance.properties import PROPERTIES
from mbn_conformance.protocol import Step

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
N_GOLDEN = len(vectors.read())
N_PROPERTIES = len(PROPERTIES)
SUITE = ("--pyargs", "mbn_conformance.suite", "-p", "no:cacheprovider")
# deterministic and quick for the in-process checks of the properties
FAST = settings(properties.default_settings(), max_examples=25, derandomize=True)

# A BN whose eps sits outside the square root: y = (x - mean) / (sqrt(var) + eps). Only the
# BN algorithms are declared and backward is off, so exactly the golden BN cases and the two
# output properties can fail.
BROKEN_SOURCE = """
import numpy as np
from dataclasses import replace
from mbn_conformance.builtin import CoreAdapter

KNOWN = {}


class EpsOutsideSqrt(CoreAdapter):
    def __init__(self):
        super().__init__("numpy")
        self.name = "eps-outside-sqrt"
        self.capabilities = replace(
            self.capabilities,
            algorithms=frozenset({"bn", "dynamic_bn", "cumulative"}),
            backward=False,
            known_failures=dict(KNOWN),
        )

    def train_step(self, step, state, x, gamma, beta):
        y, state, ctx = super().train_step(step, state, x, gamma, beta)
        xa = np.asarray(x, dtype=np.float64)
        if xa.size == 0:
            return y, state, ctx
        axes = tuple(i for i in range(xa.ndim) if i != step.axis % xa.ndim)
        shape = [1] * xa.ndim
        shape[step.axis] = -1
        y = (xa - xa.mean(axis=axes, keepdims=True)) / (
            np.sqrt(xa.var(axis=axes, keepdims=True)) + step.eps
        )
        if gamma is not None:
            y = y * np.asarray(gamma).reshape(shape) + np.asarray(beta).reshape(shape)
        return y.astype(np.asarray(x).dtype), state, ctx


def make():
    return EpsOutsideSqrt()
"""


@pytest.fixture(autouse=True)
def _no_ambient_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    """An MBN_IMPL in the developer's environment must not change these tests."""
    monkeypatch.delenv("MBN_IMPL", raising=False)


def write_broken(pytester: pytest.Pytester, module: str, known: dict[str, str]) -> Any:
    """Write the broken adapter as ``module`` (importable) and return an instance of it."""
    source = BROKEN_SOURCE.replace("KNOWN = {}", f"KNOWN = {known!r}")
    pytester.makepyfile(**{module: source})
    pytester.syspathinsert()
    namespace: dict[str, Any] = {}
    exec(compile(source, module, "exec"), namespace)
    return namespace["make"]()


def planned(adapter: Any, **kw: Any) -> list[Check]:
    """The checks the plugin renders for ``adapter`` (properties with FAST settings)."""
    return checks(adapter, properties=True, hypothesis_settings=FAST, **kw)


def outcomes(adapter: Any) -> dict[str, tuple[str, str]]:
    """Check id -> (kind, the generator's verdict: ``pass``, ``fail``, ``skip``...)."""
    return {c.id: (c.kind, c.outcome().status) for c in planned(adapter)}


def expected_pytest_outcomes(verdicts: dict[str, tuple[str, str]]) -> dict[str, int]:
    """What pytest must report: the generator's verdicts, rendered."""
    statuses = [status for _, status in verdicts.values()]
    rendered = {
        "passed": statuses.count("pass"),
        "failed": statuses.count("fail") + statuses.count("error") + statuses.count("xpass"),
        "skipped": statuses.count("skip"),
        "xfailed": statuses.count("xfail"),
    }
    return rendered


def output(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines + result.errlines)


# -- properties, through the generator --------------------------------------------------------
def property_results(adapter: Any) -> dict[str, Any]:
    found = checks(adapter, cases=[], properties=True, hypothesis_settings=FAST, refusals=False)
    return {c.id: c.outcome() for c in found if c.kind == "property"}


@pytest.mark.parametrize(
    ("backend", "only"),
    [
        ("numpy", None),
        ("array-api-strict", None),
        ("torch-xp", None),
        ("numpy", "float32"),
        ("numpy", "float16"),
        ("torch-xp", "float32"),
    ],
)
def test_builtin_adapters_hold_every_property(backend: str, only: str | None) -> None:
    pytest.importorskip(
        {"torch-xp": "torch", "array-api-strict": "array_api_strict"}.get(backend, "numpy")
    )
    adapter = builtin.make(backend)
    if only is not None:  # an adapter declaring one dtype: the properties run in it
        adapter.capabilities = replace(adapter.capabilities, dtypes=frozenset({only}))
    results = property_results(adapter)
    assert list(results) == [p.id for p in PROPERTIES]
    bad = [(i, r.status, r.reason) for i, r in results.items() if r.status not in ("pass", "skip")]
    assert not bad
    skipped = {i for i, r in results.items() if r.status == "skip"}
    if only is None:
        assert not skipped
    else:  # finite differences need float64; every other property runs in any dtype
        assert skipped == {"property/backward_finite_differences"}


class _LamSwapped(builtin.CoreAdapter):
    """Passes ``1 - lam``: the decay/update-rate confusion of docs/spec.md §1."""

    def train_step(self, step: Step, state: Any, x: Any, g: Any, b: Any) -> Any:
        return super().train_step(replace(step, lam=1 - step.lam), state, x, g, b)


class _DxShifted(builtin.CoreAdapter):
    """A gradient with a small constant added (it no longer sums to zero)."""

    def backward(self, ctx: Any, dy: Any) -> Any:
        dx, dg, db = super().backward(ctx, dy)
        return dx + 1e-3 * float(dy.mean()), dg, db


class _MBNFullGradient(builtin.CoreAdapter):
    """MBN gradient as if the batch statistics had weight 1 (the missing ``1 - lam``)."""

    def backward(self, ctx: Any, dy: Any) -> Any:
        if ctx.batch_mean is not None:  # training: weight 1 instead of 1 - lam
            ctx = ctx.replace(stats_weight=ctx.stats_weight * 0 + 1)
        return super().backward(ctx, dy)


class _BiasedOnly(builtin.CoreAdapter):
    """Declares the unbiased running variance, stores the biased one."""

    def __init__(self) -> None:
        super().__init__("numpy", running_var="unbiased")

    def train_step(self, step: Step, state: Any, x: Any, g: Any, b: Any) -> Any:
        return super().train_step(replace(step, estimator="biased"), state, x, g, b)


class _ShardLocal(builtin.CoreAdapter):
    """'Synchronized' BN whose state comes from the last shard's statistics alone."""

    def sync_train_step(self, step: Step, state: Any, shards: Any, g: Any, b: Any) -> Any:
        ys, new_state, ctxs = super().sync_train_step(step, state, shards, g, b)
        for x in shards:
            with contextlib.suppress(ValueError):  # a shard with one value per channel
                _, new_state, _ = self.train_step(step, state, x, g, b)
        return ys, new_state, ctxs


@pytest.mark.parametrize(
    ("cls", "caught_by"),
    [
        (_LamSwapped, {"mbn_lam0_is_bn", "mbn_lam1_uses_history"}),
        (_DxShifted, {"bn_dx_sums_to_zero", "backward_finite_differences"}),
        (_MBNFullGradient, {"backward_finite_differences"}),
        (_BiasedOnly, {"mbn_lam1_uses_history"}),
        (_ShardLocal, {"sync_shard_equivalence"}),
    ],
)
def test_properties_catch_broken_adapters(cls: type, caught_by: set[str]) -> None:
    results = {i.removeprefix("property/"): r for i, r in property_results(cls()).items()}
    failed = {name for name, r in results.items() if r.status == "fail"}
    assert caught_by <= failed, {n: r.status for n, r in results.items()}
    for name in caught_by:  # the message names the property, the quantity and the tolerance
        assert name in results[name].reason and "allowed" in results[name].failures[0]
        assert results[name].max_abs is None  # nothing the table could show: "—", not 0.0


def test_property_failure_carries_the_falsifying_example() -> None:
    """The assertion and hypothesis' notes (the example) both reach the result."""

    class Scaled(builtin.CoreAdapter):
        def train_step(self, step: Step, state: Any, x: Any, g: Any, b: Any) -> Any:
            y, s, c = super().train_step(step, state, x, g, b)
            return y * 1.001, s, c

    results = property_results(Scaled())
    r = results["property/bn_normalized_moments"]
    assert r.status == "fail" and r.kind == "property"
    assert r.reason.startswith("bn_normalized_moments: variance of y")
    assert "bn_normalized_moments(" in r.failures[0]  # hypothesis' "Falsifying example"


def test_property_skips_follow_capabilities() -> None:
    a = builtin.make("numpy")
    a.capabilities = replace(a.capabilities, algorithms=frozenset({"bn"}), backward=False)
    found = {c.id: c for c in checks(a, cases=[], properties=True, refusals=False)}
    for name, word in (
        ("mbn_lam0_is_bn", "mbn"),
        ("backward_finite_differences", "backward"),
        ("sync_shard_equivalence", "sync"),
    ):
        skip = found[f"property/{name}"].skip
        assert skip is not None and word in skip
    assert found["property/bn_affine_invariance"].skip is None


# -- the plugin and the shipped suite ---------------------------------------------------------
def test_backends_are_one_list() -> None:
    assert pytest_plugin.BACKENDS == builtin.BACKENDS


def test_suite_passes_for_the_numpy_backend(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*SUITE, "--mbn-backend", "numpy", "-q")
    found = planned(builtin.make("numpy"))
    skipped = sum(c.skip is not None for c in found)
    result.assert_outcomes(passed=len(found) - skipped, skipped=skipped)
    assert N_GOLDEN >= 60 and N_PROPERTIES >= 7
    assert sum(c.kind == "refusal" for c in found) == 3  # the core refuses every bad input
    result.stdout.fnmatch_lines(
        [
            "*- mbn-conformance -*",
            f"CONFORMS: {len(found) - skipped} of {len(found)} checks run "
            f"({len(found) - skipped} passed)*",
        ]
    )


def test_header_names_implementation_capabilities_versions_coverage(
    pytester: pytest.Pytester,
) -> None:
    import numpy as np

    import mbn_ref

    result = pytester.runpytest(*SUITE, "--mbn-backend", "numpy", "--co")
    assert result.ret == 0
    py = ".".join(map(str, sys.version_info[:3]))
    found = planned(builtin.make("numpy"))
    skipped = sum(c.skip is not None for c in found)
    result.stdout.fnmatch_lines(
        [
            f"mbn-conformance: implementation mbn_ref[[]numpy[]] version {mbn_ref.__version__} "
            "= mbn_conformance.builtin:make(numpy) (from --mbn-backend)",
            "mbn-conformance: capabilities algorithms bn,cumulative,dynamic_bn,mbn,sync; "
            "dtypes float16,float32,float64; layouts NC,NCDHW,NCHW,NCL,NHWC; running var "
            "biased;*backward yes;*refuses decay_out_of_range,eps_not_positive,"
            "one_value_per_channel*",
            f"mbn-conformance: versions python {py}, numpy {np.__version__}, "
            f"mbn_ref {mbn_ref.__version__}*",
            f"mbn-conformance: {len(found)} checks, {len(found) - skipped} to run"
            + (f"; {skipped} skipped: *" if skipped else ""),
        ]
    )


def test_env_var_names_the_implementation(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MBN_IMPL", "mbn_conformance.builtin:make")
    result = pytester.runpytest(*SUITE, "--co", "-k", "golden")
    result.stdout.fnmatch_lines(
        ["mbn-conformance: implementation mbn_ref[[]numpy[]] * = *(from MBN_IMPL)"]
    )
    assert f"{N_GOLDEN}/" in result.stdout.str() and " tests collected" in result.stdout.str()


def test_plugin_is_silent_in_other_sessions(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_ok():\n    assert True\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "mbn-conformance" not in output(result)
    assert (
        "plugins: mbn-ref-" in result.stdout.str() or ", mbn-ref-" in result.stdout.str()
    )  # loaded, yet silent


def test_broken_adapter_fails_golden_and_properties(pytester: pytest.Pytester) -> None:
    adapter = write_broken(pytester, "broken_eps", {})
    verdicts = outcomes(adapter)
    failing_golden = [i for i, (k, s) in verdicts.items() if k == "golden" and s == "fail"]
    assert len(failing_golden) >= 10  # float16 cases may hide it within their tolerance
    assert verdicts["property/bn_normalized_moments"] == ("property", "fail")
    assert verdicts["property/bn_affine_invariance"] == ("property", "fail")
    result = pytester.runpytest(*SUITE, "--mbn-impl", "broken_eps:make", "-rs")
    result.assert_outcomes(**expected_pytest_outcomes(verdicts))
    out = result.stdout.str()
    for case in failing_golden[:3]:
        assert f"test_golden[{case}]" in out
    assert "comparison(s) out of tolerance" in out and "worst: step " in out and "rtol 1e-10" in out
    assert "bn_normalized_moments: variance of y" in out
    assert "bn_affine_invariance (a=" in out
    assert "eps-outside-sqrt: algorithm mbn not declared" in out  # skip reasons, rendered
    result.stdout.fnmatch_lines(["DOES NOT CONFORM: * checks run (*failed*); * skipped: *"])


def test_errors_name_the_method_the_step_and_the_traceback(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        raising="""
from mbn_conformance.builtin import CoreAdapter


class Raising(CoreAdapter):
    def backward(self, ctx, dy):
        if self.calls == 2:
            helper_that_fails()
        self.calls += 1
        return super().backward(ctx, dy)


def helper_that_fails():
    raise RuntimeError("the gradient tape is gone")


def make():
    adapter = Raising("numpy")
    adapter.calls = 0
    return adapter
"""
    )
    pytester.syspathinsert()
    result = pytester.runpytest(
        *SUITE, "--mbn-impl", "raising:make", "-k", "golden and bn/NC/N2/float64/eps1e-05"
    )
    result.stdout.fnmatch_lines(
        [
            "*bn/NC/N2/float64/eps1e-05: backward() at step 2 raised RuntimeError: the "
            "gradient tape is gone [[]raising.py:* in helper_that_fails[]]",
            "*Traceback (most recent call last):",
            "*in helper_that_fails",
            "*RuntimeError: the gradient tape is gone",
        ]
    )


def test_known_failures_become_strict_xfails(pytester: pytest.Pytester) -> None:
    probe = write_broken(pytester, "broken_probe", {})
    verdicts = outcomes(probe)
    failing = [i for i, (k, s) in verdicts.items() if s == "fail" and k == "golden"]
    known = dict.fromkeys(failing, "eps is added outside the square root")
    known["property/bn_*"] = "eps is added outside the square root"
    passing = [i for i, (_, s) in verdicts.items() if s == "pass" and "float16" in i]
    assert passing  # float16 cases hide the bug within their tolerance
    known[passing[0]] = "declared but passes"
    adapter = write_broken(pytester, "broken_known", known)
    stale = [i for i, (_, s) in outcomes(adapter).items() if s == "xpass"]
    assert stale == [passing[0]]
    result = pytester.runpytest(*SUITE, "--mbn-impl", "broken_known:make", "-rfxX")
    parsed = result.parseoutcomes()
    assert parsed["xfailed"] == len(failing) + 2
    assert parsed["failed"] == 1  # strict: the stale declaration fails the run
    assert "xpassed" not in parsed
    for line in (
        "*XFAIL*property/bn_affine_invariance* - eps is added outside the square root "
        "(known_failures of eps-outside-sqrt)",
        f"FAILED*test_golden[[]{stale[0]}[]]*",
        "*[[]XPASS(strict)[]] declared but passes*",
        "DOES NOT CONFORM: * (* expected failures, 1 unexpected pass)*",
    ):
        result.stdout.fnmatch_lines([line])


def test_xfails_file(pytester: pytest.Pytester) -> None:
    adapter = write_broken(pytester, "broken_file", {})
    failing = [i for i, (_, s) in outcomes(adapter).items() if s == "fail"]
    lines = ["# known failures of the broken adapter", ""]
    lines += [f"{i}  # eps outside the sqrt" for i in failing if not i.startswith("property/")]
    lines += [
        "property/bn_affine_invariance  # eps outside the sqrt",
        "property/bn_normalized_*  # same",
    ]
    xfails = pytester.makefile(".txt", xfails="\n".join(lines))
    result = pytester.runpytest(
        *SUITE, "--mbn-impl", "broken_file:make", "--mbn-xfails", str(xfails), "-rx"
    )
    assert result.ret == 0
    parsed = result.parseoutcomes()
    assert parsed["xfailed"] == len(failing)
    assert "failed" not in parsed
    result.stdout.fnmatch_lines(["*XFAIL*property/bn_normalized_moments* - same (xfails.txt:*)"])
    result.stdout.fnmatch_lines(["CONFORMS: * (* passed, * expected failures); * skipped: *"])


def test_xfails_line_without_reason_is_an_error(pytester: pytest.Pytester) -> None:
    xfails = pytester.makefile(".txt", xfails="bn/*  # fine\nmbn/NC/*\n")
    result = pytester.runpytest(*SUITE, "--mbn-backend", "numpy", "--mbn-xfails", str(xfails))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "xfails.txt:2: 'mbn/NC/*' has no reason" in output(result)
    empty_reason = pytester.makefile(".txt", other="bn/*  #   \n")
    result = pytester.runpytest(*SUITE, "--mbn-backend", "numpy", "--mbn-xfails", str(empty_reason))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "other.txt:1: 'bn/*' has no reason" in output(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "the suite needs an implementation: --mbn-impl module:factory, MBN_IMPL="),
        (("--mbn-impl", "no_colon"), "'no_colon' is malformed: expected 'module:factory'"),
        (("--mbn-impl", "no_such_module_xyz:make"), "cannot import module 'no_such_module_xyz'"),
        (("--mbn-impl", "mbn_conformance.builtin:nope"), "has no attribute 'nope'"),
        (("--mbn-impl", "mbn_conformance.builtin:BACKENDS"), "returned tuple, not an Adapter"),
    ],
)
def test_bad_implementation_spec(
    pytester: pytest.Pytester, args: tuple[str, ...], message: str
) -> None:
    result = pytester.runpytest(*SUITE, *args)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert message in output(result)
    assert "Traceback" not in output(result)


def test_impl_and_backend_together_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*SUITE, "--mbn-impl", "a:b", "--mbn-backend", "numpy")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "either --mbn-impl or --mbn-backend" in output(result)


# -- the wheel ----------------------------------------------------------------------------------
_NETWORK_ERRORS = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ProxyError",
)


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MBN_IMPL", "VIRTUAL_ENV")
    }
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_wheel_ships_a_runnable_suite(tmp_path: Path) -> None:
    """Build the wheel from a clean copy of the sources, install it with its dependencies into
    a fresh venv, and run the shipped suite there from a directory outside the repository."""
    start = time.monotonic()
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.pyc")
    for name in ("mbn_ref", "adapters", "conformance"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    dist = tmp_path / "dist"
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
        tmp_path,
        180,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("mbn_ref-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in (
        "mbn_conformance/checks.py",
        "mbn_conformance/properties.py",
        "mbn_conformance/refusals.py",
        "mbn_conformance/pytest_plugin.py",
        "mbn_conformance/suite/__init__.py",
        "mbn_conformance/suite/test_golden.py",
        "mbn_conformance/suite/test_checks.py",
        "mbn_conformance/suite/test_properties.py",
        f"mbn_conformance/data/{vectors.DEFAULT_PATH.name}",
        "mbn_conformance/py.typed",
    ):
        assert member in names, member
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    ep_text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[pytest11]" in ep_text and "mbn_conformance.pytest_plugin" in ep_text

    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], tmp_path, 120)
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    install = _run(
        [str(py), "-m", "pip", "install", "-q", str(wheel), "pytest>=8", "hypothesis>=6.100"],
        tmp_path,
        240,
    )
    if install.returncode != 0 and any(e in install.stderr for e in _NETWORK_ERRORS):
        pytest.skip(f"no package index reachable and no cache: {install.stderr.strip()[-300:]}")
    assert install.returncode == 0, install.stdout + install.stderr

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = _run(
        [str(py), "-c", "import mbn_conformance; print(mbn_conformance.__file__)"], outside, 60
    )
    assert str(venv) in where.stdout, where.stdout + where.stderr
    suite = _run(
        [str(py), "-m", "pytest", *SUITE, "--mbn-backend", "numpy", "-q"],
        outside,
        240,
    )
    assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-2000:]
    summary = suite.stdout.strip().splitlines()[-1]
    found = planned(builtin.make("numpy"))
    skipped = sum(c.skip is not None for c in found)
    counts = f"{len(found) - skipped} passed" + (f", {skipped} skipped" if skipped else "")
    assert re.match(rf"{counts} in ", summary), summary
    assert "CONFORMS: " in suite.stdout
    assert not (outside / ".hypothesis").exists()  # the suite writes nothing where it runs
    print(f"wheel test: {time.monotonic() - start:.1f}s ({summary})")
