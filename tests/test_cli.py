"""Tests of the mbn-ref command line (mbn_ref.cli)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mbn_ref
from mbn_ref.cli import main
from mbn_ref.schedules import mbn_lambda, mbn_tau


def table_rows(out: str) -> dict[int, tuple[float, float]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit():
            rows[int(parts[0])] = (float(parts[1]), float(parts[2]))
    return rows


def test_schedule_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "--batch-size", "2", "--epochs", "200"]) == 0
    out = capsys.readouterr().out
    assert "decays" in out and "1-indexed" in out and "1 - d" in out
    rows = table_rows(out)
    assert sorted(rows) == [1, *range(10, 201, 10)]  # default: every T//20 plus first/last
    assert rows[1] == (0.0, 1.0)
    assert rows[200] == (0.9375, 0.0625)
    assert rows[100][0] == pytest.approx(0.185764, abs=1e-6)
    assert rows[100][0] + rows[100][1] == pytest.approx(1.0, abs=2e-6)
    assert "tau (Eq. 12, inference) = 0.989894" in out


def test_schedule_every_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "schedule",
        "--batch-size",
        "4",
        "--epochs",
        "10",
        "--every",
        "4",
        "--ideal-batch-size",
        "64",
        "--tau0",
        "0.9",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert sorted(rows) == [1, 4, 8, 10]
    for t, (lam, torch_m) in rows.items():
        expected = mbn_lambda(t, total_epochs=10, batch_size=4, ideal_batch_size=64)
        assert lam == pytest.approx(expected, abs=5e-7)
        assert torch_m == pytest.approx(1 - expected, abs=5e-7)
    tau = mbn_tau(batch_size=4, ideal_batch_size=64, tau0=0.9)
    assert f"= {tau:.6f}" in out


def test_schedule_single_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "--batch-size", "2", "--epochs", "1"]) == 0
    assert table_rows(capsys.readouterr().out) == {1: (0.0, 1.0)}


def test_schedule_json_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lam.json"
    assert main(["schedule", "--batch-size", "2", "--epochs", "50", "--json", str(path)]) == 0
    assert "epoch t" in capsys.readouterr().out  # the table is still printed
    data = json.loads(path.read_text())
    assert data["epoch"] == list(range(1, 51))
    assert data["lam"] == [mbn_lambda(t, total_epochs=50, batch_size=2) for t in range(1, 51)]
    assert data["lam_torch_momentum"] == [1 - v for v in data["lam"]]
    assert data["tau"] == mbn_tau(batch_size=2)
    assert data["batch_size"] == 2 and data["ideal_batch_size"] == 32
    assert "decay" in data["conventions"]["values"]


def test_schedule_json_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "--batch-size", "8", "--epochs", "5", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["lam"][-1] == 0.75


def test_schedule_json_unwritable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "missing-dir" / "x.json"
    assert main(["schedule", "--batch-size", "2", "--epochs", "5", "--json", str(bad)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot write" in err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["schedule", "--batch-size", "0", "--epochs", "10"], "--batch-size"),
        (["schedule", "--batch-size", "x", "--epochs", "10"], "integer"),
        (["schedule", "--batch-size", "2", "--epochs", "0"], "--epochs"),
        (["schedule", "--batch-size", "2"], "--epochs"),
        (["schedule", "--batch-size", "2", "--epochs", "3", "--tau0", "1.0"], "tau0"),
        (["schedule", "--batch-size", "2", "--epochs", "3", "--every", "0"], "--every"),
        ([], "COMMAND"),
        (["nonsense"], "nonsense"),
    ],
)
def test_errors_are_one_line_exit_2(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mbn-ref") and "error" in lines[0] and match in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mbn-ref {mbn_ref.__version__}"


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "--help"]) == 0
    assert "--batch-size" in capsys.readouterr().out


def test_console_script() -> None:
    exe = Path(sys.executable).parent / "mbn-ref"
    if not exe.exists():
        pytest.skip(f"console script not installed beside {sys.executable}")
    ok = subprocess.run(
        [str(exe), "schedule", "--batch-size", "2", "--epochs", "200"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert table_rows(ok.stdout)[200] == (0.9375, 0.0625)
    bad = subprocess.run(
        [str(exe), "schedule", "--batch-size", "0", "--epochs", "200"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_schedule_reports_what_the_end_point_really_matches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """m = 4, m0 = 32: lam(T) = 7/8 matches BN at 2*m0 - m = 60 in the mean noise (erratum 3)."""
    assert main(["schedule", "--batch-size", "4", "--epochs", "10", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["end_point_effective_batch_size"]["mean_noise"] == pytest.approx(60.0)
    assert main(["schedule", "--batch-size", "4", "--epochs", "10"]) == 0
    assert "batch size\n60.0 in the mean" in capsys.readouterr().out
    assert main(["schedule", "--batch-size", "32", "--epochs", "10"]) == 0
    assert "At t = T" not in capsys.readouterr().out  # m >= m0: MBN is BN, nothing to claim
