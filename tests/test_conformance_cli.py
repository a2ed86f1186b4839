"""Tests of ``mbn-ref conformance`` (mbn_conformance.cli, mbn_conformance.report)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mbn_ref
from mbn_conformance import report, vectors
from mbn_ref.cli import main

ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY = "examples.third_party_mbn.adapter:make"
CASE_KEYS = [
    "case",
    "status",
    "max_abs",
    "max_rel",
    "rtol",
    "atol",
    "worst",
    "ratio",
    "reason",
    "failures",
]
STATUSES = {"pass", "fail", "error", "skip", "xfail", "xpass"}


def check_report_schema(doc: Any) -> None:
    """A small schema check of the JSON report (types, key order, consistency)."""
    assert isinstance(doc, dict)
    assert list(doc) == [
        "schema",
        "version",
        "implementation",
        "capabilities",
        "vectors",
        "environment",
        "summary",
        "cases",
    ]
    assert doc["schema"] == "mbn-conformance-report" and doc["version"] == 1
    assert set(doc["implementation"]) == {"name", "source"}
    assert all(isinstance(v, str) for v in doc["implementation"].values())
    caps = doc["capabilities"]
    for key in ("algorithms", "dtypes", "layouts", "running_var"):
        assert caps[key] == sorted(caps[key]) and all(isinstance(v, str) for v in caps[key])
    assert caps["native_momentum"] in ("decay", "update_rate")
    assert isinstance(caps["backward"], bool) and isinstance(caps["known_failures"], dict)
    vec = doc["vectors"]
    assert vec["format"] == "mbn-conformance-vectors" and isinstance(vec["version"], int)
    assert vec["cases_selected"] == len(doc["cases"]) <= vec["cases_total"]
    env = doc["environment"]
    assert {"python", "numpy", "mbn_ref", "frameworks"} <= set(env)
    assert env["mbn_ref"] == mbn_ref.__version__
    s = doc["summary"]
    assert list(s) == ["total", "pass", "fail", "error", "skip", "xfail", "xpass", "succeeded"]
    assert s["total"] == len(doc["cases"]) == sum(s[k] for k in STATUSES)
    assert s["succeeded"] == (s["fail"] + s["error"] + s["xpass"] == 0)
    for c in doc["cases"]:
        assert list(c) == CASE_KEYS
        assert c["status"] in STATUSES and isinstance(c["case"], str)
        for key in ("max_abs", "max_rel", "rtol", "atol", "ratio"):
            assert c[key] is None or (isinstance(c[key], float) and math.isfinite(c[key]))
        assert isinstance(c["failures"], list) and isinstance(c["reason"], str)
        assert (c["status"] == "fail") == bool(c["failures"])


def test_backend_numpy_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--backend", "numpy", "--cases", "bn/NC/*", "--all"]) == 0
    out = capsys.readouterr().out
    assert "implementation: mbn_ref[numpy]" in out and "format v1" in out
    assert f"mbn_ref {mbn_ref.__version__}" in out and "capabilities:" in out
    for col in report.COLUMNS:
        assert col in out
    rows = [line for line in out.splitlines() if line.startswith("bn/NC/")]
    assert len(rows) == 5 and all(" pass " in r for r in rows)
    assert "5 passed, 0 failed" in out and "CONFORMS" in out


def test_default_hides_passing_cases(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--backend", "numpy", "--cases", "bn/NC/*"]) == 0
    out = capsys.readouterr().out
    assert "5 passing cases not listed" in out
    assert not [line for line in out.splitlines() if line.startswith("bn/NC/")]


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
    table = [line.split()[:2] for line in out.splitlines() if line.startswith("bn/NCHW/")]
    statuses = [s for _, s in table]
    assert "fail" in statuses and statuses == sorted(statuses, key=lambda s: s != "fail")
    assert "FAIL  bn/NCHW/" in out and "max abs err" in out and "DOES NOT CONFORM" in out


def test_skip_reasons_shown(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("array_api_strict")
    argv = ["conformance", "--backend", "array-api-strict", "--cases", "*float16*"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("dtype float16 not declared") == 5


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
        (["--backend", "numpy", "--cases", "zzz*"], "no case id matches"),
        (["--backend", "numpy", "--vectors", "/no/such.npz"], "cannot read vectors"),
        (["--backend", "numpy", "--json", "/no/such/dir/r.json"], "cannot write"),
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


def test_an_unwritable_report_fails_before_any_case_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mbn_conformance import cli as suite_cli

    def no_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("cases ran although the report cannot be written")

    monkeypatch.setattr(suite_cli, "run", no_run)
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


def test_third_party_example_through_the_console_script() -> None:
    """The worked example of docs/conformance.md conforms, with its skips and known failure."""
    exe = Path(sys.executable).parent / "mbn-ref"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mbn_ref.cli"]
    out = subprocess.run(
        [*cmd, "conformance", "--impl", THIRD_PARTY, "--json", "-"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    doc = json.loads(out.stdout)
    check_report_schema(doc)
    s = doc["summary"]
    assert s["fail"] == s["error"] == s["xpass"] == 0
    assert s["xfail"] == 1 and s["skip"] == 10 and s["pass"] == s["total"] - 11
    assert doc["capabilities"]["native_momentum"] == "update_rate"


def test_python_m_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    from mbn_conformance.cli import main as suite_main

    assert suite_main(["--backend", "numpy", "--cases", "cumulative/*"]) == 0
    assert "2 passed" in capsys.readouterr().out
    assert suite_main(["--impl", "x"]) == 2


def test_properties_join_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    """--properties adds one row per property (ids property/<name>); patterns select them."""
    assert (
        main(
            [
                "conformance",
                "--backend",
                "numpy",
                "--properties",
                "--json",
                "-",
                "--cases",
                "property/bn_*",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    ids = [c["case"] for c in doc["cases"]]
    assert ids and all(i.startswith("property/bn_") for i in ids)
    assert {c["status"] for c in doc["cases"]} == {"pass"}
    assert (
        main(["conformance", "--backend", "numpy", "--properties", "--cases", "property/nope"]) == 2
    )
    assert "no property matches" in capsys.readouterr().err
