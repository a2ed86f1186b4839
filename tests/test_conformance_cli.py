"""Tests of ``mbn-ref conformance`` (mbn_conformance.cli, mbn_conformance.report)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mbn_ref
from mbn_conformance import builtin, report, vectors
from mbn_ref.cli import main

ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY = "examples.third_party_mbn.adapter:make"
CHECK_KEYS = [
    "id",
    "status",
    "kind",
    "max_abs",
    "max_rel",
    "rtol",
    "atol",
    "worst",
    "ratio",
    "reason",
    "failures",
    "diagnoses",
    "method",
    "step",
    "traceback",
]
STATUSES = {"pass", "fail", "error", "skip", "xfail", "xpass"}


def check_report_schema(doc: Any) -> None:
    """A small schema check of the JSON report (types, key order, consistency)."""
    assert isinstance(doc, dict)
    assert list(doc) == [
        "schema",
        "version",
        "protocol",
        "implementation",
        "capabilities",
        "vectors",
        "environment",
        "summary",
        "checks",
    ]
    assert doc["schema"] == "mbn-conformance-report" and doc["version"] == 2
    assert doc["protocol"] == 2
    assert list(doc["implementation"]) == ["name", "source", "version"]
    caps = doc["capabilities"]
    for key in ("algorithms", "dtypes", "layouts", "refuses"):
        assert caps[key] == sorted(caps[key]) and all(isinstance(v, str) for v in caps[key])
    assert caps["running_var"] in ("biased", "unbiased")
    assert caps["native_momentum"] in ("decay", "update_rate")
    assert caps["hyperparameter_dtype"] in ("float32", "float64")
    for key in ("backward", "affine_optional", "batch_counter", "cumulative_tau"):
        assert isinstance(caps[key], bool)
    assert isinstance(caps["known_failures"], dict)
    vec = doc["vectors"]
    assert vec["format"] == "mbn-conformance-vectors" and vec["version"] == vectors.VERSION
    golden = [c for c in doc["checks"] if c["kind"] == "golden"]
    assert vec["cases_selected"] == len(golden) <= vec["cases_total"]
    env = doc["environment"]
    assert {"python", "numpy", "mbn_ref", "frameworks"} <= set(env)
    assert env["mbn_ref"] == mbn_ref.__version__
    s = doc["summary"]
    assert list(s) == [
        "total",
        *("pass", "fail", "error", "skip", "xfail", "xpass"),
        "succeeded",
        "coverage",
        "verdict",
    ]
    assert s["total"] == len(doc["checks"]) == sum(s[k] for k in STATUSES)
    assert s["succeeded"] == (s["fail"] + s["error"] + s["xpass"] == 0)
    cov = s["coverage"]
    assert cov["total"] == s["total"] and cov["skipped"] == s["skip"]
    assert cov["run"] == s["total"] - s["skip"]
    assert sum(r["count"] for r in cov["skip_reasons"]) == s["skip"]
    assert s["verdict"].startswith("CONFORMS" if s["succeeded"] else "DOES NOT CONFORM")
    for c in doc["checks"]:
        assert list(c) == CHECK_KEYS
        assert c["status"] in STATUSES and isinstance(c["id"], str)
        assert c["kind"] in ("golden", "property", "refusal", "schedule")
        for key in ("max_abs", "max_rel", "rtol", "atol", "ratio"):
            assert c[key] is None or (isinstance(c[key], float) and math.isfinite(c[key]))
        if c["status"] == "skip" or c["kind"] != "golden":  # nothing measured: null, not 0.0
            assert all(c[k] is None for k in ("max_abs", "max_rel", "rtol", "atol", "worst"))
        assert isinstance(c["failures"], list) and isinstance(c["reason"], str)
        if c["status"] == "fail" or (c["status"] == "pass" and "forgiven" not in c["reason"]):
            assert (c["status"] == "fail") == bool(c["failures"])
        if c["status"] == "error":
            assert c["traceback"] and c["method"] is not None


def golden_rows(out: str, prefix: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(prefix)]


def test_backend_numpy_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--backend", "numpy", "--cases", "bn/NC/*", "--all"]) == 0
    out = capsys.readouterr().out
    assert "implementation: mbn_ref[numpy] version " in out and "protocol v2" in out
    assert f"format v{vectors.VERSION}" in out
    assert f"mbn_ref {mbn_ref.__version__}" in out and "capabilities:" in out
    assert "running var biased;" in out and "batch counter yes" in out
    for col in report.COLUMNS:
        assert col in out
    rows = golden_rows(out, "bn/NC/")
    assert len(rows) == 4 and all(" pass " in r for r in rows)
    assert out.rstrip().endswith("CONFORMS: 4 of 4 checks run (4 passed)")


def test_default_hides_passing_checks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--backend", "numpy", "--cases", "bn/NC/*"]) == 0
    out = capsys.readouterr().out
    assert "4 passing checks not listed" in out
    assert not golden_rows(out, "bn/NC/")


def test_json_stdout_validates(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "conformance",
        "--backend",
        "numpy",
        "--cases",
        "mbn/*",
        "--cases",
        "sync*",
        "--json",
        "-",
    ]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)  # the JSON only, no table
    check_report_schema(doc)
    assert doc["vectors"]["patterns"] == ["mbn/*", "sync*"]
    assert doc["summary"]["pass"] == doc["summary"]["total"] > 20


def test_json_file_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path in (a, b):
        assert main(["conformance", "--backend", "numpy", "--json", str(path)]) == 0
    assert "CONFORMS" in capsys.readouterr().out  # the table is still printed
    assert a.read_text() == b.read_text()
    doc = json.loads(a.read_text())
    check_report_schema(doc)
    assert doc["vectors"]["cases_total"] == len(vectors.read())


def test_failures_exit_1_and_are_listed_first(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "conformance",
        "--impl",
        "broken_impls:make_eps_outside_sqrt",
        "--cases",
        "bn/NCHW/*",
        "--all",
    ]
    assert main(argv) == 1
    out = capsys.readouterr().out
    table = [line.split()[:2] for line in golden_rows(out, "bn/NCHW/")]
    statuses = [s for _, s in table]
    assert "fail" in statuses and statuses == sorted(statuses, key=lambda s: s != "fail")
    assert "FAIL  bn/NCHW/" in out and "max abs err" in out
    assert out.rstrip().splitlines()[-1].startswith("DOES NOT CONFORM: ")


def test_coverage_beside_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    """Skips are counted by reason on the verdict line, in the table and in the JSON."""
    pytest.importorskip("array_api_strict")
    argv = ["conformance", "--backend", "array-api-strict", "--cases", "*float16*"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("dtype float16 not declared") == 5 + 1  # five rows and the verdict
    assert out.rstrip().splitlines()[-1] == (
        "CONFORMS: 0 of 5 checks run; 5 skipped: 5 dtype float16 not declared"
    )
    assert main([*argv, "--json", "-"]) == 0
    cov = json.loads(capsys.readouterr().out)["summary"]["coverage"]
    assert cov == {
        "total": 5,
        "run": 0,
        "skipped": 5,
        "skip_reasons": [{"reason": "dtype float16 not declared", "count": 5}],
    }


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--backend", "nope"], "invalid choice"),
        (["--impl", "no_colon"], "expected 'module:factory'"),
        (["--impl", "mod:"], "expected 'module:factory'"),
        (["--impl", "no_such_module_xyz:make"], "No module named 'no_such_module_xyz'"),
        (["--impl", "json:no_such_factory"], "no attribute"),
        (["--impl", "json:JSONDecodeError"], "raised"),
        (["--impl", "json:JSONEncoder"], "not an Adapter"),
        ([], "one of the arguments --backend --impl is required"),
        (["--backend", "numpy", "--impl", "a:b"], "not allowed"),
        (["--backend", "numpy", "--cases", "zzz*"], "no check id matches zzz*"),
        (
            ["--backend", "numpy", "--cases", "property/bn_*"],
            "(properties are checked with --properties)",
        ),
        (["--backend", "numpy", "--vectors", "/no/such.npz"], "cannot read vectors"),
        (["--backend", "numpy", "--json", "/no/such/dir/r.json"], "cannot write"),
        (["--backend", "numpy", "--xfails", "/no/such.txt"], "--xfails cannot read"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["conformance", *argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err
    assert lines[0].startswith("mbn-ref")


@pytest.mark.parametrize("name", ["README.md", "pyproject.toml", "text.npy"])
def test_a_file_that_is_not_a_vector_archive_is_named_so(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Never NumPy's "pickled data ... allow_pickle" text: the user gave the wrong file."""
    path = ROOT / name if (ROOT / name).exists() else tmp_path / name
    if not path.exists():
        np.save(path, np.array(["a", "b"]))  # a genuine .npy file, still not an archive
    assert main(["conformance", "--backend", "numpy", "--vectors", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} is not a golden-vector archive" in err
    assert "pickle" not in err.lower() and len(err.strip().splitlines()) == 1


def test_xfails_file_marks_known_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xfails = tmp_path / "xfails.txt"
    xfails.write_text("bn/NCHW/N2/float64/eps0.5  # eps outside the sqrt\n", encoding="utf-8")
    argv = ["conformance", "--impl", "broken_impls:make_eps_outside_sqrt"]
    argv += ["--cases", "bn/NCHW/N2/float64/eps0.5", "--xfails", str(xfails)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "xfail" in out and "eps outside the sqrt (xfails.txt:1)" in out
    xfails.write_text("bn/*\n", encoding="utf-8")
    assert main(argv) == 2
    assert "xfails.txt:1: 'bn/*' has no reason" in capsys.readouterr().err


def test_an_unwritable_report_fails_before_any_check_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mbn_conformance import cli as suite_cli

    def no_checks(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("checks ran although the report cannot be written")

    monkeypatch.setattr(suite_cli, "checks", no_checks)
    assert main(["conformance", "--backend", "numpy", "--json", "/no/such/dir/r.json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "cannot write /no/such/dir/r.json" in err


def test_core_does_not_import_the_suite() -> None:
    code = "import sys, mbn_ref, mbn_ref.cli; print('mbn_conformance' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


def test_suite_unavailable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "mbn_conformance.cli", None)  # import now fails
    assert main(["conformance", "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "not importable" in err and len(err.strip().splitlines()) == 1
    assert main(["schedule", "--batch-size", "2", "--epochs", "3"]) == 0  # the rest works


def _console_script(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "mbn-ref"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mbn_ref.cli"]
    env = {k: v for k, v in os.environ.items() if k != "HYPOTHESIS_STORAGE_DIRECTORY"}
    return subprocess.run(
        [*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False, env=env
    )


def test_third_party_example_through_the_console_script() -> None:
    """The worked example of docs/conformance.md conforms; its declaration of the unbiased
    running variance costs it no golden case (version 1 of the suite ran 9 of 71)."""
    out = _console_script("conformance", "--impl", THIRD_PARTY, "--json", "-")
    assert out.returncode == 0, out.stderr + out.stdout
    doc = json.loads(out.stdout)
    check_report_schema(doc)
    s = doc["summary"]
    assert s["fail"] == s["error"] == s["xpass"] == s["xfail"] == 0
    assert doc["capabilities"]["running_var"] == "unbiased"
    assert doc["capabilities"]["native_momentum"] == "update_rate"
    golden = [c for c in doc["checks"] if c["kind"] == "golden"]
    skipped = {c["id"]: c["reason"] for c in golden if c["status"] == "skip"}
    honest = {
        "algorithm sync not declared",  # TinyNorm has no synchronized statistics
        "dtype float16 not declared",  # nor float16
        "unbiased running variance undefined for one value per channel",  # spec §9
    }
    assert set(skipped.values()) == honest
    for case_id, reason in skipped.items():
        assert ("sync" in case_id) == (reason == "algorithm sync not declared")
        assert ("float16" in case_id) == (reason == "dtype float16 not declared")
    ran = len(golden) - len(skipped)
    assert ran == sum(
        "sync" not in c.id and "float16" not in c.id and "unbiased" in c.estimators
        for c in vectors.read()
    )
    assert ran >= 50
    page = (ROOT / "docs" / "conformance.md").read_text(encoding="utf-8")
    assert s["verdict"] in page, "docs/conformance.md quotes an older TinyNorm output"


def test_python_m_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    from mbn_conformance.cli import main as suite_main

    assert suite_main(["--backend", "numpy", "--cases", "cumulative/*"]) == 0
    assert "(1 passed)" in capsys.readouterr().out
    assert suite_main(["--impl", "x"]) == 2


def test_properties_join_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    """--properties adds one row per property (ids property/<name>); patterns select them."""
    argv = ["conformance", "--backend", "numpy", "--properties", "--json", "-"]
    assert main([*argv, "--cases", "property/bn_*"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ids = [c["id"] for c in doc["checks"]]
    assert ids and all(i.startswith("property/bn_") for i in ids)
    assert {c["status"] for c in doc["checks"]} == {"pass"}
    assert {c["kind"] for c in doc["checks"]} == {"property"}
    assert all(c["max_abs"] is None and c["worst"] is None for c in doc["checks"])
    assert main(["conformance", "--backend", "numpy", "--properties", "--cases", "property/x"]) == 2
    assert "no check id matches property/x" in capsys.readouterr().err


def test_properties_write_nothing_into_the_working_directory(tmp_path: Path) -> None:
    """Neither hypothesis' example database nor its constants cache (.hypothesis/constants)."""
    out = _console_script(
        "conformance",
        "--backend",
        "numpy",
        "--properties",
        "--cases",
        "property/*",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    assert "CONFORMS" in out.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("width", [200, 120, 100, 80, 60])
def test_rich_table_never_wraps_a_check_id(width: int) -> None:
    """In any terminal each id stays whole on one line (ids are pasted into --cases): the
    reason wraps, optional columns go, and below the width of an id the table is plain."""
    pytest.importorskip("rich")
    import io

    from mbn_conformance.results import CaseResult

    long_id = "sync-mbn/NCHW/N6/float32/eps1e-05/lam0.5/shards3-1-2/offset"
    results = [
        CaseResult(long_id, "skip", reason="algorithm sync not declared by this implementation"),
        CaseResult("bn/NC/N2/float64/eps1e-05", "fail", max_abs=1.0, worst="step 0 y"),
    ]
    doc = report.build(
        builtin.make("numpy"),
        results,
        report.vectors_info(vectors.DEFAULT_PATH, 66, 2, ()),
        source="test",
    )
    buf = io.StringIO()
    import rich.console

    real = rich.console.Console
    try:  # a terminal of this width
        rich.console.Console = lambda file=None: real(  # type: ignore[assignment,misc]
            file=buf, width=width, color_system=None
        )
        report.print_rich(doc, results, show_all=True)
    finally:
        rich.console.Console = real  # type: ignore[misc]
    lines = buf.getvalue().splitlines()
    for case_id in (long_id, "bn/NC/N2/float64/eps1e-05"):  # whole wherever it starts
        starts = [line for line in lines if case_id[:12] in line]
        assert starts and all(case_id in line for line in starts), "\n".join(lines)
    assert (report.rich_table(results, width) is None) == (width < 100)
    if width >= 100:  # the table fits the terminal
        table = [line for line in lines if "│" in line]
        assert table and all(len(line) <= width for line in table)


def test_cases_take_comma_separated_patterns(capsys: pytest.CaptureFixture[str]) -> None:
    """The project's list syntax; repeating --cases still adds patterns."""
    base = ["conformance", "--backend", "numpy", "--json", "-"]
    assert main([*base, "--cases", "bn/NC/*,cumulative/*"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ids = [c["id"] for c in doc["checks"]]
    assert doc["vectors"]["patterns"] == ["bn/NC/*", "cumulative/*"]
    assert any(i.startswith("bn/NC/") for i in ids) and any(
        i.startswith("cumulative/") for i in ids
    )
    assert main([*base, "--cases", "bn/NC/*", "--cases", "cumulative/*"]) == 0
    assert [c["id"] for c in json.loads(capsys.readouterr().out)["checks"]] == ids


def test_python_m_errors_are_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m mbn_conformance.cli`` is ``mbn-ref conformance``: one-line errors, exit 2."""
    from mbn_conformance.cli import main as suite_main

    assert suite_main(["--backend", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mbn-ref conformance: error: argument --backend")
    assert suite_main(["--help"]) == 0
    assert "\nexamples:\n" in capsys.readouterr().out
