"""``mbn-ref bench``: runs the benchmark scripts, one ratio table, bench.json/.md/.png."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mbn_ref.cli import bench as bench_cmd
from mbn_ref.cli import main

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _case(case: str, mode: str, base: str, times: dict[str, float], **extra: Any) -> dict[str, Any]:
    """A case as the scripts write it: contenders, ratios ``ours/base``, targets."""
    contenders = {k: {"median_ms": v} for k, v in times.items()}
    ratios = {f"{k}/{base}": {"median": v / times[base]} for k, v in times.items() if k != base}
    targets = {
        name: {"limit": 1.5, "aim": None, "ratio": r["median"], "pass": r["median"] <= 1.5}
        for name, r in ratios.items()
    }
    return {"case": case, "mode": mode, "contenders": contenders, "ratios": ratios,
            "targets": targets, **extra}  # fmt: skip


def torch_report() -> dict[str, Any]:
    case = _case("16x8", "eager_train", "native", {"native": 2.0, "mbn": 4.0, "mbn_lam0": 2.1})
    for name, peak in (("native", 2**20), ("mbn", 3 * 2**19), ("mbn_lam0", 2**20)):
        case["contenders"][name]["memory"] = {"peak_bytes": peak}
    for name in ("mbn", "mbn_lam0"):
        ratio = case["contenders"][name]["memory"]["peak_bytes"] / 2**20
        case["targets"][f"memory:{name}/native"] = {
            "limit": 1.2, "aim": None, "ratio": ratio, "pass": ratio <= 1.2,
        }  # fmt: skip
    return {"schema": "mbn-ref/bench-torch/1", "header": {}, "cases": [case]}


def keras_report() -> dict[str, Any]:
    case = _case("256x1024", "tf_function", "keras", {"keras": 3.0, "mbn": 3.3})
    return {"schema": "mbn-ref/bench-keras/1", "header": {}, "cases": [case]}


def core_report() -> dict[str, Any]:
    case = _case("", "train_forward", "torch_native", {"torch_native": 1.0, "bn_numpy": 2.0})
    del case["case"]
    case["shape"] = [4, 8]
    return {"schema": "mbn-ref/bench-core/1", "header": {}, "cases": [case]}


def table_lines(text: str) -> list[list[str]]:
    """The Markdown table's rows, split into cells (header and separator included)."""
    rows = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in rows]


def fake_benchmarks(folder: Path, reports: dict[str, dict[str, Any] | int]) -> Path:
    """Scripts ``bench_<suite>.py`` that write ``report`` (with their argv) or exit with a code."""
    folder.mkdir()
    for suite, report in reports.items():
        if isinstance(report, int):
            body = f"import sys\nprint('boom from {suite}')\nsys.exit({report})\n"
        else:
            body = textwrap.dedent(f"""\
                import json, sys
                report = json.loads({json.dumps(json.dumps(report))})
                report["header"]["argv"] = sys.argv[1:]
                path = sys.argv[sys.argv.index("--json") + 1]
                with open(path, "w") as f:
                    json.dump(report, f)
                print("the script's own table")
            """)
        (folder / f"bench_{suite}.py").write_text(body)
    return folder


# -- the real core suite, end to end -------------------------------------------------------------


def test_quick_core_suite_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--suite", "core", "--out", str(out), "--timeout", "240"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "running suite core" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    doc = json.loads((out / "bench.json").read_text())
    assert doc["schema"] == "mbn-ref/bench/1" and doc["command"] == ["mbn-ref", *argv]
    assert doc["versions"]["mbn-ref"] and doc["versions"]["numpy"] and doc["versions"]["python"]
    [suite] = doc["suites"]
    assert suite["suite"] == "core" and suite["status"] == "ran" and suite["returncode"] == 0
    assert "--quick" in suite["argv"]
    report = suite["report"]
    assert report["schema"] == "mbn-ref/bench-core/1" and report["header"]["settings"]["quick"]
    n_ratios = sum(len(c["ratios"]) for c in report["cases"])
    assert n_ratios == 40 and len(doc["rows"]) == n_ratios  # every ratio is a row
    for lines in (table_lines(captured.out), table_lines((out / "bench.md").read_text())):
        head, sep, *rows = lines
        assert head[:6] == ["suite", "case", "mode", "ours", "baseline", "metric"]
        assert set(sep) == {"---"} and len(rows) == n_ratios
        assert all(len(r) == len(head) for r in rows)
        for row, want in zip(rows, doc["rows"], strict=True):
            assert float(row[8]) == pytest.approx(want["ratio"], abs=0.005)
            assert row[10] == want["result"] and row[10] in ("PASS", "FAIL", "-")
    with_target = [r for r in doc["rows"] if r["limit"] is not None]
    assert doc["summary"]["with_target"] == len(with_target) == 32
    assert doc["summary"]["pass"] + doc["summary"]["fail"] == 32
    png = (out / "bench.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000


# -- re-rendering reports ------------------------------------------------------------------------


def test_from_json_renders_reports_without_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("--from-json ran a suite")

    monkeypatch.setattr(bench_cmd, "_run_suite", no_run)
    files = []
    for name, report in (("torch", torch_report()), ("keras", keras_report())):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(report))
    out = tmp_path / "out"
    assert main(["bench", "--from-json", *map(str, files), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    _, _, *rows = table_lines(text)
    by_key = {(r[0], r[3], r[5]): r for r in rows}
    assert len(rows) == 2 + 2 + 1  # two time ratios, two memory ratios, one keras ratio
    mbn_time = by_key[("torch", "mbn", "time")]
    assert mbn_time[6:] == ["2.000 ms", "4.000 ms", "2.00", "<= 1.5", "FAIL"]
    assert by_key[("torch", "mbn_lam0", "time")][8:] == ["1.05", "<= 1.5", "PASS"]
    mbn_mem = by_key[("torch", "mbn", "memory")]
    assert mbn_mem[6:] == ["1.00 MiB", "1.50 MiB", "1.50", "<= 1.2", "FAIL"]
    assert by_key[("keras", "mbn", "time")][8:] == ["1.10", "<= 1.5", "PASS"]
    assert "5 targets: 3 PASS, 2 FAIL" in text
    doc = json.loads((out / "bench.json").read_text())
    assert [e["status"] for e in doc["suites"]] == ["loaded", "loaded"]
    assert doc["summary"] == {"rows": 5, "with_target": 5, "pass": 3, "fail": 2}
    md = (out / "bench.md").read_text()
    assert "mbn-ref bench --from-json" in md and table_lines(md)[2:] == rows
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    # the merged report renders again, to the same rows; --json - prints it alone
    again = tmp_path / "again"
    argv = ["bench", "--from-json", str(out / "bench.json"), "--out", str(again), "--no-plot"]
    assert main([*argv, "--json", "-"]) == 0
    doc2 = json.loads(capsys.readouterr().out)
    assert doc2["rows"] == doc["rows"] and doc2["command"] == ["mbn-ref", *argv, "--json", "-"]
    assert sorted(p.name for p in again.iterdir()) == ["bench.md"]


def test_core_rows_are_named_by_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "core.json"
    path.write_text(json.dumps(core_report()))
    argv = ["bench", "--from-json", str(path), "--out", str(tmp_path / "o"), "--no-plot"]
    assert main([*argv, "--json", "-"]) == 0
    [row] = json.loads(capsys.readouterr().out)["rows"]
    assert (row["case"], row["contender"], row["baseline"]) == ("4x8", "bn_numpy", "torch_native")
    assert row["ratio"] == 2.0 and row["result"] == "FAIL"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("not json", "is not JSON"),
        ('{"schema": "something-else/1"}', "is not a benchmark report"),
        ("[1, 2]", "is not a benchmark report"),
        ('{"schema": "mbn-ref/bench-torch/1", "cases": [{"ratios": {}}]}', "malformed"),
    ],
)
def test_from_json_rejects_what_is_not_a_report(
    content: str, match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.json"
    path.write_text(content)
    assert main(["bench", "--from-json", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mbn-ref bench: error: ") and match in err[0]
    assert not (tmp_path / "out" / "bench.json").exists()


# -- running the scripts -------------------------------------------------------------------------


def test_missing_benchmarks_dir_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["bench", "--suite", "core", "--out", str(out)]
    assert main([*argv, "--benchmarks-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mbn-ref bench: error: cannot find bench_core.py in --benchmarks-dir " + str(
        tmp_path / "nowhere"
    )
    monkeypatch.setattr(bench_cmd, "default_benchmarks_dir", lambda: tmp_path / "site")
    assert main(argv) == 2  # an installed (non-editable) mbn_ref: no scripts beside it
    err = capsys.readouterr().err.strip()
    assert "cannot find bench_core.py" in err and "--benchmarks-dir" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_default_benchmarks_dir_is_the_checkouts() -> None:
    assert (bench_cmd.default_benchmarks_dir() / "bench_core.py").is_file()


def test_a_failing_suite_exits_1_and_the_others_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = fake_benchmarks(tmp_path / "b", {"core": 3, "torch": torch_report()})
    out = tmp_path / "out"
    argv = ["bench", "--suite", "core,torch", "--benchmarks-dir", str(folder), "--out", str(out)]
    assert main([*argv, "--quick", "--threads", "1", "--repeats", "2", "--seed", "5"]) == 1
    captured = capsys.readouterr()
    assert "running suite core" in captured.err and "running suite torch" in captured.err
    assert "boom from core" in captured.err  # the failing script's output
    assert "suite core failed: exit status 3" in captured.err
    doc = json.loads((out / "bench.json").read_text())
    core, torch = doc["suites"]
    assert (core["suite"], core["status"], core["returncode"]) == ("core", "failed", 3)
    assert core["report"] is None and core["reason"] == "exit status 3"
    assert core["argv"] == ["--quick", "--repeats", "2", "--torch-threads", "1", "--seed", "5"]
    assert torch["status"] == "ran"
    assert torch["report"]["header"]["argv"][:7] == [
        "--quick", "--repeats", "2", "--threads", "1", "--seed", "5",
    ]  # fmt: skip
    assert {r["suite"] for r in doc["rows"]} == {"torch"} and len(doc["rows"]) == 4
    assert "| torch | 16x8 | eager_train | mbn |" in captured.out
    assert "suite core: failed (exit status 3)" in (out / "bench.md").read_text()


def test_default_selection_skips_a_missing_framework(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = {"core": core_report(), "torch": torch_report(), "keras": keras_report()}
    folder = fake_benchmarks(tmp_path / "b", reports)
    requires = {**bench_cmd.REQUIRES, "keras": (("no_such_module_xyz", "pip install xyz"),)}
    monkeypatch.setattr(bench_cmd, "REQUIRES", requires)
    out = tmp_path / "out"
    argv = ["bench", "--benchmarks-dir", str(folder), "--out", str(out), "--no-plot"]
    argv += ["--torch-args", "--cases 'a b' --modes eager_train"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipping suite keras: no_such_module_xyz is not installed (pip install xyz)" in (
        captured.err
    )
    doc = json.loads((out / "bench.json").read_text())
    assert [(e["suite"], e["status"]) for e in doc["suites"]] == [
        ("core", "ran"), ("torch", "ran"), ("keras", "skipped"),
    ]  # fmt: skip
    torch_argv = doc["suites"][1]["report"]["header"]["argv"]
    assert torch_argv[:3] == ["--cases", "a b", "--modes"]  # the suite's own options, quoted
    assert "keras skipped" in captured.out
    # named explicitly, a suite that cannot run is a usage error, before anything runs
    assert main([*argv, "--suite", "torch,keras"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mbn-ref bench: error: --suite keras: no_such_module_xyz is not installed " + (
        "(pip install xyz)"
    )


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--core-args", "--json x.json"], "--json is set by mbn-ref bench"),
        (["--core-args", "'unclosed"], "--core-args"),
        (["--suite", "core,core"], "repeated name"),
        (["--suite", "core", "--from-json", "x.json"], "takes no --suite"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_bench_usage_errors(
    extra: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = fake_benchmarks(tmp_path / "b", {"core": core_report()})
    argv = ["bench", "--benchmarks-dir", str(folder), "--out", str(tmp_path / "out")]
    assert (
        main([*argv, "--suite", "core", *extra] if "--suite" not in extra else [*argv, *extra]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mbn-ref bench: error:") and match in err[0]
    assert not (tmp_path / "out").exists()
