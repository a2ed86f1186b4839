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

from mbn_conformance import builtin, properties, runner, vectors

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
N_GOLDEN = len(vectors.read())
N_PROPERTIES = len(properties.PROPERTIES)
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

    def train_step(self, algorithm, state, x, gamma, beta, *, eps, axis, **kw):
        y, state, ctx = super().train_step(
            algorithm, state, x, gamma, beta, eps=eps, axis=axis, **kw
        )
        xa = np.asarray(x, dtype=np.float64)
        if xa.size == 0:
            return y, state, ctx
        axes = tuple(i for i in range(xa.ndim) if i != axis % xa.ndim)
        shape = [1] * xa.ndim
        shape[axis] = -1
        y = (xa - xa.mean(axis=axes, keepdims=True)) / (
            np.sqrt(xa.var(axis=axes, keepdims=True)) + eps
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


def expected_golden_failures(adapter: Any) -> list[str]:
    return [r.case for r in runner.run(adapter) if r.status in ("fail", "error", "xfail")]


def output(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines + result.errlines)


# -- properties, in process -------------------------------------------------------------------
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
    results = properties.run(adapter, hypothesis_settings=FAST)
    assert [r.case for r in results] == [p.id for p in properties.PROPERTIES]
    bad = [(r.case, r.status, r.reason) for r in results if r.status not in ("pass", "skip")]
    assert not bad
    skipped = {r.case for r in results if r.status == "skip"}
    if only is None:
        assert not skipped
    else:  # finite differences need float64; every other property runs in any dtype
        assert skipped == {"property/backward_finite_differences"}


class _LamSwapped(builtin.CoreAdapter):
    """Passes ``1 - lam``: the decay/update-rate confusion of docs/spec.md §1."""

    def train_step(self, algorithm: str, state: Any, x: Any, g: Any, b: Any, **kw: Any) -> Any:
        kw["lam"] = 1 - kw["lam"]
        return super().train_step(algorithm, state, x, g, b, **kw)


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
    """Ignores the requested running-variance estimator."""

    def train_step(self, algorithm: str, state: Any, x: Any, g: Any, b: Any, **kw: Any) -> Any:
        kw["estimator"] = "biased"
        return super().train_step(algorithm, state, x, g, b, **kw)


class _ShardLocal(builtin.CoreAdapter):
    """'Synchronized' BN whose state comes from the last shard's statistics alone."""

    def sync_train_step(
        self, algorithm: str, state: Any, shards: Any, g: Any, b: Any, **kw: Any
    ) -> Any:
        ys, new_state, ctxs = super().sync_train_step(algorithm, state, shards, g, b, **kw)
        for x in shards:
            with contextlib.suppress(ValueError):  # a shard with one value per channel
                _, new_state, _ = self.train_step(algorithm, state, x, g, b, **kw)
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
    results = {
        r.case[len(properties.PREFIX) :]: r for r in properties.run(cls(), hypothesis_settings=FAST)
    }
    failed = {name for name, r in results.items() if r.status == "fail"}
    assert caught_by <= failed, {n: r.status for n, r in results.items()}
    for name in caught_by:  # the message names the quantity and the tolerance
        assert name in results[name].reason and ("allowed" in results[name].reason)


def test_property_failure_is_an_assertion_with_the_example() -> None:
    class EpsOutside(builtin.CoreAdapter):
        def train_step(self, algorithm: str, state: Any, x: Any, g: Any, b: Any, **kw: Any) -> Any:
            y, s, c = super().train_step(algorithm, state, x, g, b, **kw)
            return y * 1.001, s, c

    with pytest.raises(AssertionError, match="bn_normalized_moments: variance of y") as info:
        properties.check(EpsOutside(), "bn_normalized_moments", FAST)
    assert "bn_normalized_moments(" in "\n".join(getattr(info.value, "__notes__", []))
    with pytest.raises(KeyError, match="no property 'nope'"):
        properties.check(EpsOutside(), "nope")


def test_property_skips_follow_capabilities() -> None:
    a = builtin.make("numpy")
    a.capabilities = replace(a.capabilities, algorithms=frozenset({"bn"}), backward=False)
    reasons = {r.case: r.reason for r in properties.run(a, hypothesis_settings=FAST)}
    assert reasons["property/mbn_lam0_is_bn"] == "algorithm mbn not declared"
    assert reasons["property/backward_finite_differences"] == "backward not declared"
    assert reasons["property/sync_shard_equivalence"] == "algorithm sync not declared"
    assert reasons["property/bn_affine_invariance"] == ""  # ran and passed


# -- the plugin and the shipped suite ---------------------------------------------------------
def test_suite_passes_for_the_numpy_backend(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*SUITE, "--mbn-backend", "numpy", "-q")
    result.assert_outcomes(passed=N_GOLDEN + N_PROPERTIES)
    assert N_GOLDEN >= 60 and N_PROPERTIES == 7


def test_header_names_implementation_capabilities_versions(pytester: pytest.Pytester) -> None:
    import numpy as np

    import mbn_ref

    result = pytester.runpytest(*SUITE, "--mbn-backend", "numpy", "--co")
    assert result.ret == 0
    py = ".".join(map(str, sys.version_info[:3]))
    result.stdout.fnmatch_lines(
        [
            "mbn-conformance: implementation mbn_ref[[]numpy[]] = "
            "mbn_conformance.builtin:make(numpy) (from --mbn-backend)",
            "mbn-conformance: capabilities algorithms=bn,cumulative,dynamic_bn,mbn,sync "
            "dtypes=float16,float32,float64 layouts=NC,NCDHW,NCHW,NCL,NHWC *backward=True*",
            f"mbn-conformance: versions mbn_ref {mbn_ref.__version__}, numpy {np.__version__}, "
            f"python {py}*",
        ]
    )


def test_env_var_names_the_implementation(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MBN_IMPL", "mbn_conformance.builtin:make")
    result = pytester.runpytest(*SUITE, "--co", "-k", "golden")
    result.stdout.fnmatch_lines(
        ["mbn-conformance: implementation mbn_ref[[]numpy[]] = *(from MBN_IMPL)"]
    )
    assert f"{N_GOLDEN}/{N_GOLDEN + N_PROPERTIES} tests collected" in result.stdout.str()


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
    failing = expected_golden_failures(adapter)
    assert len(failing) >= 10  # float16 cases may hide it within their tolerance
    skipped_golden = sum(runner.skip_reason(adapter, c) is not None for c in vectors.read())
    result = pytester.runpytest(*SUITE, "--mbn-impl", "broken_eps:make", "-rs")
    # two properties fail (affine invariance, normalized moments); two run and pass (dx sums to
    # zero is skipped: no backward) ... counted from the adapter's declaration:
    prop_skips = sum(properties.skip_reason(adapter, p) is not None for p in properties.PROPERTIES)
    assert prop_skips == 5
    result.assert_outcomes(
        failed=len(failing) + 2,
        passed=N_GOLDEN - skipped_golden - len(failing),
        skipped=skipped_golden + prop_skips,
    )
    out = result.stdout.str()
    for case in failing[:3]:
        assert f"test_golden[{case}]" in out
    assert "comparison(s) out of tolerance" in out and "worst: step " in out and "rtol 1e-10" in out
    assert "bn_normalized_moments: variance of y" in out
    assert "bn_affine_invariance (a=" in out
    assert "eps-outside-sqrt: algorithm mbn not declared" in out  # skip reasons, from runner


def test_known_failures_become_strict_xfails(pytester: pytest.Pytester) -> None:
    probe = write_broken(pytester, "broken_probe", {})
    failing = expected_golden_failures(probe)
    known = {c: "eps is added outside the square root" for c in failing}
    known["property/bn_*"] = "eps is added outside the square root"
    passing = [r.case for r in runner.run(probe) if r.status == "pass"]
    assert passing  # float16 cases hide the bug within their tolerance
    known[passing[0]] = "declared but passes"
    adapter = write_broken(pytester, "broken_known", known)
    stale = [r.case for r in runner.run(adapter) if r.status == "xpass"]
    assert len(stale) == 1
    result = pytester.runpytest(*SUITE, "--mbn-impl", "broken_known:make", "-rfxX")
    outcomes = result.parseoutcomes()
    assert outcomes["xfailed"] == len(failing) + 2
    assert outcomes["failed"] == 1  # strict: the stale declaration fails the run
    assert "xpassed" not in outcomes
    for line in (
        "*XFAIL*property/bn_affine_invariance* - eps is added outside the square root "
        "(known_failures of eps-outside-sqrt)",
        f"FAILED*test_golden[[]{stale[0]}[]]*",
        "*[[]XPASS(strict)[]] declared but passes*",
    ):
        result.stdout.fnmatch_lines([line])


def test_xfails_file(pytester: pytest.Pytester) -> None:
    adapter = write_broken(pytester, "broken_file", {})
    failing = expected_golden_failures(adapter)
    lines = ["# known failures of the broken adapter", ""]
    lines += [f"{case}  # eps outside the sqrt" for case in failing]
    lines += [
        "property/bn_affine_invariance  # eps outside the sqrt",
        "property/bn_normalized_*  # same",
    ]
    xfails = pytester.makefile(".txt", xfails="\n".join(lines))
    result = pytester.runpytest(
        *SUITE, "--mbn-impl", "broken_file:make", "--mbn-xfails", str(xfails), "-rx"
    )
    assert result.ret == 0
    outcomes = result.parseoutcomes()
    assert outcomes["xfailed"] == len(failing) + 2
    assert "failed" not in outcomes
    result.stdout.fnmatch_lines(["*XFAIL*property/bn_normalized_moments* - same (xfails.txt:*)"])


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
        "mbn_conformance/properties.py",
        "mbn_conformance/pytest_plugin.py",
        "mbn_conformance/suite/__init__.py",
        "mbn_conformance/suite/test_golden.py",
        "mbn_conformance/suite/test_properties.py",
        "mbn_conformance/data/golden_v1.npz",
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
    assert re.match(rf"{N_GOLDEN + N_PROPERTIES} passed in ", summary), summary
    assert not (outside / ".hypothesis").exists()  # the suite writes nothing where it runs
    print(f"wheel test: {time.monotonic() - start:.1f}s ({summary})")
