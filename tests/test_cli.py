"""Tests of the mbn-ref command line (mbn_ref.cli)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mbn_ref
from mbn_ref import cli
from mbn_ref.cli import _main as cli_main
from mbn_ref.cli import main
from mbn_ref.cli import schedule as schedule_cmd
from mbn_ref.conventions import update_rate_from_decay
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
    # the one converter of mbn_ref.conventions, bit for bit (1 - 0.9 reads 0.1)
    assert data["lam_torch_momentum"] == [update_rate_from_decay(v) for v in data["lam"]]
    assert data["tau"] == mbn_tau(batch_size=2)
    assert data["tau_torch_momentum"] == update_rate_from_decay(data["tau"])
    assert data["batch_size"] == 2 and data["ideal_batch_size"] == 32
    assert "decay" in data["conventions"]["values"]


def test_schedule_json_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "--batch-size", "8", "--epochs", "5", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["lam"][-1] == 0.75


@pytest.mark.parametrize("where", ["missing-dir/x.json", "."])
def test_schedule_json_unwritable(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output that cannot be written is a usage error (exit 2), found before any output."""
    bad = tmp_path / where
    assert main(["schedule", "--batch-size", "2", "--epochs", "5", "--json", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before the check
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and str(bad) in lines[0]
    assert lines[0].startswith("mbn-ref schedule: error:")


def _count_lam_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every Eq. 11 evaluation of the command append its epoch to the returned list."""
    calls: list[int] = []
    real = schedule_cmd.mbn_lambda_schedule

    def counting(*args: Any, **kwargs: Any) -> Callable[[float], float]:
        schedule = real(*args, **kwargs)

        def wrapped(count: float, /) -> float:
            calls.append(int(count) + 1)
            return schedule(count)

        return wrapped

    monkeypatch.setattr(schedule_cmd, "mbn_lambda_schedule", counting)
    return calls


def test_schedule_computes_only_the_rows_it_prints(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--epochs 10000000 prints 21 rows and evaluates Eq. 11 21 times (it used to compute and
    hold every epoch: about a minute and 1.2 GB)."""
    calls = _count_lam_calls(monkeypatch)
    assert main(["schedule", "--batch-size", "2", "--epochs", "10000000"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert sorted(rows) == [1, *range(500_000, 10_000_001, 500_000)]
    assert sorted(calls) == sorted(rows)  # each printed epoch once, nothing else
    assert rows[10_000_000] == (0.9375, 0.0625)
    calls.clear()
    assert main(["schedule", "--batch-size", "2", "--epochs", "1000", "--every", "300"]) == 0
    assert sorted(table_rows(capsys.readouterr().out)) == [1, 300, 600, 900, 1000]
    assert sorted(calls) == [1, 300, 600, 900, 1000]


def test_schedule_json_holds_every_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.json"
    argv = ["schedule", "--batch-size", "4", "--epochs", "7"]
    assert main([*argv, "--json", str(path)]) == 0
    text = path.read_text()
    data = json.loads(text)
    assert list(data) == [
        "conventions",
        "batch_size",
        "ideal_batch_size",
        "total_epochs",
        "tau0",
        "epoch",
        "lam",
        "lam_torch_momentum",
        "tau",
        "tau_torch_momentum",
        "end_point_effective_batch_size",
    ]
    assert data["epoch"] == list(range(1, 8))
    assert data["lam"] == [mbn_lambda(t, total_epochs=7, batch_size=4) for t in range(1, 8)]
    capsys.readouterr()
    assert main([*argv, "--json", "-"]) == 0
    assert capsys.readouterr().out == text  # the same document on stdout


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["schedule", "--batch-size", "0", "--epochs", "10"], "--batch-size"),
        (["schedule", "--batch-size", "x", "--epochs", "10"], "integer"),
        (["schedule", "--batch-size", "2", "--epochs", "0"], "--epochs"),
        (["schedule", "--batch-size", "2"], "--epochs"),
        (["schedule", "--batch-size", "2", "--epochs", "3", "--tau0", "1.0"], "tau0"),
        (["schedule", "--batch-size", "2", "--epochs", "3", "--every", "0"], "--every"),
        (["schedule", "--batch-size", "2", "--epochs", "3", "--tau0", "nan"], "tau0"),
        (["schedule", "--batch-size", "2", "--epochs", "3", "--json"], "--json"),
        ([], "COMMAND"),
        (["nonsense"], "nonsense"),
        # the plugin subcommand follows the same rule
        (["conformance"], "--backend"),
        (["conformance", "--backend", "numpy", "--json"], "--json"),
        (["conformance", "--impl", "no_such_module_xyz:make"], "no_such_module_xyz"),
        (["conformance", "--impl", "nocolon"], "module:factory"),
        (["conformance", "--backend", "numpy", "--json", "/no/such/dir/r.json"], "cannot write"),
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


# ----------------------------------------------------------------------- subcommand plugins

PLUGIN = "mbn_ref_test_plugin_xyz"


def _with_entry_points(monkeypatch: pytest.MonkeyPatch, **eps: str) -> None:
    """The installed entry points of the subcommand group plus ``name=value`` ones."""
    real = cli_main._entry_points
    extra = [importlib.metadata.EntryPoint(n, v, cli.COMMAND_GROUP) for n, v in eps.items()]
    monkeypatch.setattr(cli_main, "_entry_points", lambda: [*real(), *extra])


def _plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    (tmp_path / f"{PLUGIN}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)


def test_the_distribution_declares_the_conformance_plugin() -> None:
    eps = importlib.metadata.entry_points(group=cli.COMMAND_GROUP)
    assert {ep.name: ep.value for ep in eps}["conformance"] == "mbn_conformance.cli:register"


GOOD_PLUGIN = """
    def register(subparsers):
        parser = subparsers.add_parser("hello", help="say hello")
        parser.add_argument("--name", required=True)
        parser.set_defaults(run=lambda args: print("hello", args.name) or 3)
"""


def test_a_plugin_adds_a_subcommand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _plugin_module(tmp_path, monkeypatch, GOOD_PLUGIN)
    _with_entry_points(monkeypatch, hello=f"{PLUGIN}:register", schedule=f"{PLUGIN}:nope")
    assert main(["schedule", "--batch-size", "2", "--epochs", "3"]) == 0  # built-ins win
    assert PLUGIN not in sys.modules  # a plugin loads only when its subcommand is used
    capsys.readouterr()
    assert main(["hello", "--name", "x"]) == 3  # the plugin's own exit status
    assert capsys.readouterr().out == "hello x\n"
    assert main(["hello"]) == 2  # its usage errors are one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mbn-ref hello: error:") and "--name" in err[0]
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "say hello" in out and "run the conformance suite" in out


@pytest.mark.parametrize(
    ("body", "value", "match"),
    [
        (None, "no_such_module_xyz:register", "is not importable"),
        ("raise RuntimeError('boom\\nsecond line')", f"{PLUGIN}:register", "failed to load"),
        ("", f"{PLUGIN}:register", "AttributeError"),
        ("def register(subparsers):\n    raise ValueError('bad')", f"{PLUGIN}:register", "bad"),
        ("def register(subparsers):\n    pass", f"{PLUGIN}:register", "no subcommand"),
        (
            "def register(subparsers):\n    subparsers.add_parser('broken')\n    1/0",
            f"{PLUGIN}:register",
            "ZeroDivisionError",
        ),
    ],
)
def test_a_broken_plugin_fails_alone_on_one_line(
    body: str | None,
    value: str,
    match: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if body is not None:
        _plugin_module(tmp_path, monkeypatch, body)
    _with_entry_points(monkeypatch, broken=value)
    assert main(["broken", "--any", "args"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mbn-ref broken: error:") and match in lines[0]
    assert value in lines[0] and "Traceback" not in captured.err and captured.out == ""
    # the other subcommands, and the help listing, keep working
    assert main(["schedule", "--batch-size", "2", "--epochs", "3"]) == 0
    assert main(["--help"]) == 0
    assert "broken" in capsys.readouterr().out
    assert main(["conformance", "--backend", "numpy", "--cases", "cumulative/*"]) == 0


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    """``mbn-ref schedule ... --every 1 | head -1``: a broken pipe ends the command quietly."""
    cmd = [sys.executable, "-m", "mbn_ref.cli", "schedule", "--batch-size", "2"]
    proc = subprocess.Popen(
        [*cmd, "--epochs", "1000000", "--every", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("# mbn-ref schedule")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


# -- noise ------------------------------------------------------------------------------------


def test_noise_table_and_json_are_the_noise_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mbn_ref import noise

    path = tmp_path / "noise.json"
    argv = ["noise", "--batch-size", "2", "--lam", "0", "0.9375", "--json", str(path)]
    assert main(argv) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln[:1] == " "]
    rows = [r for r in lines if r[0].replace(".", "").isdigit()]
    assert [float(r[0]) for r in rows] == [0.0, 0.9375]
    assert float(rows[1][2]) == pytest.approx(float(noise.mbn_xi_mu_var(2, 0.9375)), rel=1e-5)
    assert float(rows[1][5]) == pytest.approx(62.0)  # erratum 3: not m0 = 32
    report = json.loads(path.read_text())
    assert report["batch_size"] == 2
    got = report["rows"][1]
    assert got["effective_batch_size_mean"] == float(noise.effective_batch_size(2, 0.9375))
    assert got["effective_batch_size_variance"] == float(
        noise.effective_batch_size_sigma(2, 0.9375)
    )
    assert got["mbn_var_xi_sigma"] == float(noise.mbn_xi_sigma_var(2, 0.9375))


def test_noise_json_stdout_and_edge_cases(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["noise", "--batch-size", "1", "--lam", "0.5", "1", "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["bn_var_xi_sigma"] is None  # one value: no variance noise
    assert rows[0]["effective_batch_size_mean"] == 3.0
    assert rows[1]["effective_batch_size_mean"] is None  # lam = 1: infinite, JSON null


@pytest.mark.parametrize(
    "argv",
    [
        ["noise", "--batch-size", "4", "--lam", "1.5"],
        ["noise", "--batch-size", "0"],
        ["noise", "--lam", "0.5"],
        ["noise", "--batch-size", "4", "--json", "/nonexistent/dir/x.json"],
    ],
)
def test_noise_usage_errors_exit_2_and_print_nothing(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "error" in captured.err


def test_noise_lists_are_comma_separated(capsys: pytest.CaptureFixture[str]) -> None:
    """The project's list syntax (``--lam 0,0.5``); the older space-separated form still works."""
    assert main(["noise", "--batch-size", "4", "--lam", "0,0.5,0.9", "--json", "-"]) == 0
    commas = json.loads(capsys.readouterr().out)
    assert [r["lam"] for r in commas["rows"]] == [0.0, 0.5, 0.9]
    assert main(["noise", "--batch-size", "4", "--lam", "0", "0.5,0.9", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == commas
    assert main(["noise", "--batch-size", "4", "--lam", "0,x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mbn-ref noise: error:") and "comma-separated numbers" in err


# -- conventions shared by every command --------------------------------------------------------


def test_top_level_help_documents_exit_statuses_and_examples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "exit status (every command):" in out
    block = out[out.index("exit status (every command):") :]
    for code in ("0", "1", "2"):
        assert f"\n  {code}  " in block
    for command in ("schedule", "noise", "bench", "conformance", "reproduce"):
        assert f"mbn-ref {command}" in out
    assert "--json PATH" in out and "'-'" in out


@pytest.mark.parametrize("command", ["schedule", "noise", "bench", "conformance"])
def test_every_command_help_has_examples_and_exit_statuses(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "\nexamples:\n" in out and "\nexit status:\n" in out
    examples = out[out.index("\nexamples:\n") : out.index("\nexit status:\n")]
    assert examples.count(f"  mbn-ref {command} ") >= 2
    statuses = out[out.index("\nexit status:\n") :].splitlines()
    assert [ln[:5] for ln in statuses if ln[:5].strip().isdigit()] == ["  0  ", "  1  ", "  2  "]
    assert "--json" in out  # data commands write JSON ...
    assert "'-'" in out  # ... with '-' for stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["noise", "--batch-size", "2", "--json", "{missing}/n.json"],
        ["schedule", "--batch-size", "2", "--epochs", "3", "--plot", "{missing}/p.png"],
        ["bench", "--suite", "nope"],
        ["bench", "--from-json", "{missing}/report.json", "--out", "{missing}/out"],
        ["bench", "--from-json", "{tmp}/r.json", "--out", "{missing}/out"],
        ["conformance", "--backend", "numpy", "--cases", ","],
    ],
)
def test_usage_errors_name_their_command(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "r.json").write_text('{"schema": "mbn-ref/bench-core/1", "cases": []}')
    missing = tmp_path / "missing"
    argv = [a.format(missing=missing, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # nothing created
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mbn-ref {argv[0]}: error: "), captured.err
    assert captured.out == "" and "Traceback" not in captured.err
