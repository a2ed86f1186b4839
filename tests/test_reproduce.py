"""``mbn-ref reproduce`` (adapters/mbn_torch/reproduce): end to end (--quick) and its pieces."""

from __future__ import annotations

import doctest
import importlib
import importlib.metadata
import json
import math
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sklearn")  # the `reproduce` extra (in the `test` extra too)
pytest.importorskip("tqdm")

import torch

from mbn_ref import schedules
from mbn_ref.cli import main
from mbn_torch.reproduce import PRESETS, Config
from mbn_torch.reproduce.data import load_digits_split
from mbn_torch.reproduce.experiment import (
    RunResult,
    decay_scheduler,
    run_experiment,
    train_one,
)
from mbn_torch.reproduce.models import make_model
from mbn_torch.reproduce.output import format_table, summarize, write_json

RECORD_KEYS = {"model", "norm", "batch_size", "seed", "test_accuracy"}


@pytest.fixture(scope="module")
def data() -> Any:
    return load_digits_split()


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def quick(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("quick")
    script = Path(sys.executable).with_name("mbn-ref")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mbn_ref.cli"]
    proc = subprocess.run(
        [*cmd, "reproduce", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    return proc, out


def test_quick_runs_and_prints_the_table(quick: Any) -> None:
    proc, _ = quick
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy (%), mean ± std over seeds" in proc.stdout
    assert "same inference decay tau" in proc.stdout  # the comparison is said to be fair
    rows = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("mlp")}
    assert set(rows) == {"BN", "MBN"}
    assert "m=2" in proc.stdout and "m=32" in proc.stdout
    assert "step" in proc.stderr  # the progress bar, on stderr


def test_quick_json_report(quick: Any) -> None:
    proc, out = quick
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "reproduce.json").read_text(encoding="utf-8"))
    for key in ("configuration", "versions", "results", "summary", "batch_statistics", "notes"):
        assert key in report
    assert report["configuration"]["preset"] == "quick"
    assert report["versions"]["torch"] == torch.__version__.split("+")[0] or report["versions"][
        "torch"
    ].startswith(torch.__version__.split("+")[0])
    cfg = PRESETS["quick"]
    assert len(report["results"]) == len(cfg.runs())
    for rec in report["results"]:
        assert set(rec) >= RECORD_KEYS
        assert 0.0 <= rec["test_accuracy"] <= 1.0
    assert {(r["norm"], r["batch_size"], r["seed"]) for r in report["results"]} == {
        (n, m, s) for _, n, m, s in cfg.runs()
    }
    stats = {s["norm"]: s for s in report["batch_statistics"]}
    assert set(stats) == {"bn", "mbn"}
    assert stats["mbn"]["count"] == 2 and len(stats["mbn"]["moving_mean"]) == 1347 // 2


def test_quick_mbn_beats_bn_at_batch_size_2(quick: Any) -> None:
    """The paper's claim, as CI checks it: at m = 2, MBN beats BN by >= 10 points."""
    proc, out = quick
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "reproduce.json").read_text(encoding="utf-8"))
    acc = {(s["norm"], s["batch_size"]): s["mean"] for s in report["summary"]}
    assert acc[("mbn", 2)] - acc[("bn", 2)] >= 0.10, acc
    assert acc[("bn", 32)] > 0.9 and acc[("mbn", 32)] > 0.9  # both fine at m = 32


def test_quick_writes_the_figure(quick: Any) -> None:
    proc, out = quick
    assert proc.returncode == 0, proc.stderr
    png = (out / "reproduce.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# ------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize(
    "argv",
    [
        ["--quick", "--full"],
        ["--batch-sizes", "1,2"],
        ["--batch-sizes", "two"],
        ["--batch-sizes", "2,2"],
        ["--norms", "bn,foo"],
        ["--models", "rnn"],
        ["--norms", "in"],  # InstanceNorm on the MLP only: nothing to run
        ["--epochs", "0"],
        ["--lr", "-1"],
        ["--nproc", "0"],
        ["--data", "cifar10"],  # without --data-dir
        ["--data-dir", "x"],  # with the digits
        ["--framework", "keras", "--nproc", "2"],
        ["--framework", "keras", "--device", "cpu"],
        ["--train-limit", "0"],
        ["--no-such-option"],
    ],
)
def test_usage_errors_exit_2_and_write_nothing(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["reproduce", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_keras_without_mbn_tf_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "mbn_tf.reproduce", None)  # import fails: ImportError
    out = tmp_path / "o"
    assert main(["reproduce", "--framework", "keras", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--framework keras needs TensorFlow/Keras and mbn_tf.reproduce" in err
    assert not out.exists()


def test_keras_dispatches_to_mbn_tf(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--framework keras calls mbn_tf.reproduce.run_experiment(config, data, on_step=...)."""
    calls: list[tuple[Config, Any]] = []

    def fake(config: Config, data: Any, on_step: Any = None) -> list[RunResult]:
        calls.append((config, data))
        return [RunResult("mlp", n, m, s, 0.5, 0.5, 1.0, 1, 0.0) for _, n, m, s in config.runs()]

    module = types.ModuleType("mbn_tf.reproduce")
    module.run_experiment = fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mbn_tf.reproduce", module)
    argv = ["reproduce", "--framework", "keras", "--norms", "bn", "--batch-sizes", "4"]
    argv += ["--seeds", "0", "--no-plot", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    ((config, data),) = calls
    assert config.norms == ("bn",) and config.data == "digits" and len(data.y_train) == 1347
    report = json.loads((tmp_path / "reproduce.json").read_text(encoding="utf-8"))
    assert report["framework"] == "keras" and "keras" in report["versions"]
    assert [r["norm"] for r in report["results"]] == ["bn"]
    assert "torch on" not in capsys.readouterr().out  # no torch device is claimed


def test_unwritable_output_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["reproduce", "--quick", "--out", str(blocker / "sub")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--help"]) == 0
    text = capsys.readouterr().out
    assert "mbn-ref reproduce --quick" in text and "exit status" in text


def test_registered_as_an_entry_point() -> None:
    eps = importlib.metadata.entry_points(group="mbn_ref.commands")
    assert {ep.name: ep.value for ep in eps}["reproduce"] == "mbn_torch.reproduce.cli:register"


def test_small_custom_run_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["reproduce", "--norms", "gn,ln", "--batch-sizes", "32", "--seeds", "0"]
    argv += ["--epochs", "1", "--no-plot", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "reproduce.json").read_text(encoding="utf-8"))
    assert report["configuration"]["preset"] == "custom"
    assert [r["norm"] for r in report["results"]] == ["gn", "ln"]
    assert not (tmp_path / "reproduce.png").exists()
    assert "GroupNorm" in capsys.readouterr().out


def test_json_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json -: stdout is the report alone (parseable), the table goes to stderr."""
    argv = ["reproduce", "--norms", "gn", "--batch-sizes", "32", "--seeds", "0", "--epochs", "1"]
    argv += ["--no-plot", "--no-progress", "--out", str(tmp_path / "out"), "--json", "-"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [r["norm"] for r in report["results"]] == ["gn"]
    assert "GroupNorm" in captured.err and "report to stdout" in captured.err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------ the pieces


def test_presets() -> None:
    assert PRESETS["default"].models == ("mlp",)
    assert {"none", "bn", "mbn", "gn"} <= set(PRESETS["default"].norms)
    assert 2 in PRESETS["default"].batch_sizes and 32 in PRESETS["default"].batch_sizes
    full = PRESETS["full"]
    assert set(full.models) == {"mlp", "cnn"} and len(full.norms) == 6
    assert full.batch_sizes == (2, 4, 8, 16, 32) and len(full.seeds) >= 3
    # InstanceNorm runs on the CNN only
    assert ("mlp", "in") not in {(m, n) for m, n, _, _ in full.runs()}
    assert ("cnn", "in") in {(m, n) for m, n, _, _ in full.runs()}


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="batch sizes"):
        Config(batch_sizes=(1,))
    with pytest.raises(ValueError, match="unknown"):
        Config(norms=("batchnorm",))
    with pytest.raises(ValueError, match="nothing to run"):
        Config(norms=("in",))


def test_data_split_is_stratified_and_standardized(data: Any) -> None:
    assert data.x_train.shape == (1347, 64) and data.x_test.shape == (450, 64)
    test = torch.bincount(data.y_test, minlength=10)
    total = test + torch.bincount(data.y_train, minlength=10)
    assert (test - 0.25 * total).abs().max() <= 1  # stratified: each class 25% in the test set
    assert torch.allclose(data.x_train.mean(0), torch.zeros(64), atol=1e-5)
    again = load_digits_split()
    assert torch.equal(again.x_train, data.x_train)


@pytest.mark.parametrize("m", [2, 8, 32])
def test_bn_inference_decay_equals_mbns(m: int) -> None:
    """BN's running statistics get MBN's inference decay (Eq. 12): a fair comparison."""
    bn, mbn = make_model("mlp", "bn"), make_model("mlp", "mbn")
    decay_scheduler(bn, batch_size=m, epochs=10)
    decay_scheduler(mbn, batch_size=m, epochs=10)
    tau = schedules.mbn_tau(batch_size=m)
    bn_taus = [float(x.inference_decay) for x in bn.modules() if hasattr(x, "inference_decay")]
    mbn_taus = [float(x.inference_decay) for x in mbn.modules() if hasattr(x, "inference_decay")]
    assert len(bn_taus) == len(mbn_taus) == 2
    assert bn_taus == mbn_taus == [tau, tau]
    assert not any(hasattr(x, "lam") for x in bn.modules() if hasattr(x, "inference_decay"))
    if m < 32:
        assert tau > 0.85  # not PyTorch's default 0.9: the schedule really sets it


def test_scheduler_drives_mbn(data: Any) -> None:
    """Eq. 11 per epoch reaches MBN's lam buffers and the run reports it."""
    model = make_model("mlp", "mbn")
    sched = decay_scheduler(model, batch_size=4, epochs=5)
    assert sched is not None
    for t in range(5):
        expect = schedules.mbn_lambda(t + 1, total_epochs=5, batch_size=4)  # 1-indexed
        assert [float(x.lam) for x in model.modules() if hasattr(x, "lam")] == [expect] * 2
        sched.step()
    r = train_one(data, "mlp", "mbn", 16, 0, epochs=3)
    eq11 = schedules.mbn_lambda_schedule(total_epochs=3, batch_size=16)
    assert r.lam == [eq11(t) for t in range(3)]
    assert r.lam[-1] > 0 and r.inference_decay == schedules.mbn_tau(batch_size=16)
    bn = train_one(data, "mlp", "bn", 16, 0, epochs=1)
    assert bn.lam is None and bn.inference_decay == r.inference_decay


def test_same_seed_same_result(data: Any) -> None:
    a = train_one(data, "mlp", "mbn", 16, 3, epochs=2)
    b = train_one(data, "mlp", "mbn", 16, 3, epochs=2)
    c = train_one(data, "mlp", "mbn", 16, 4, epochs=2)
    assert (a.test_accuracy, a.final_train_loss) == (b.test_accuracy, b.final_train_loss)
    assert a.final_train_loss != c.final_train_loss


def test_cnn_runs_with_every_normalization(data: Any) -> None:
    cfg = Config(
        models=("cnn",), norms=("bn", "mbn", "in"), batch_sizes=(32,), seeds=(0,), epochs=1
    )
    results = run_experiment(cfg, data)
    assert [r.norm for r in results] == ["bn", "mbn", "in"]
    assert all(0.0 <= r.test_accuracy <= 1.0 and math.isfinite(r.final_train_loss) for r in results)
    assert results[0].test_accuracy > 0.5  # BN learns in one epoch
    # lam = 0 at m = 32 (Eq. 11) and the same tau: MBN computes what BN does
    assert results[0].test_accuracy == results[1].test_accuracy
    stats = [r.batch_statistics for r in results if r.batch_statistics is not None]
    assert [s["count"] for s in stats] == [32 * 64, 32 * 64]  # m x 8 x 8 values per channel


def test_table_and_summary() -> None:
    runs = [
        RunResult("mlp", "bn", 2, 0, 0.70, 0.7, 1.0, 1, 0.0),
        RunResult("mlp", "bn", 2, 1, 0.72, 0.7, 1.0, 1, 0.0),
        RunResult("mlp", "mbn", 2, 0, 0.97, 0.9, 0.1, 1, 0.0),
    ]
    s = {x["norm"]: x for x in summarize(runs)}
    assert s["bn"]["mean"] == pytest.approx(0.71)
    assert s["bn"]["std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert s["mbn"]["std"] == 0.0 and s["mbn"]["n"] == 1
    table = format_table(runs)
    assert "71.0 ± 1.4" in table and "97.0 ± 0.0" in table
    assert table.index("BN ") < table.index("MBN")


def test_json_has_no_nan(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json({"results": [{"final_train_loss": float("nan")}]}, path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"results": [{"final_train_loss": None}]}


def test_nproc_two_gloo_processes(tmp_path: Path) -> None:
    """--nproc 2: per-device MBN over 2 gloo processes, statistics merged for inference.

    m = 32 per process with 1347 samples: 21 global batches of 64; both ranks must take
    the same number of steps (each collective is matched) or the run hangs and fails.
    """
    argv = ["reproduce", "--norms", "mbn", "--batch-sizes", "32", "--seeds", "0", "--epochs"]
    argv += ["1", "--nproc", "2", "--no-plot", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "reproduce.json").read_text(encoding="utf-8"))
    assert report["configuration"]["nproc"] == 2
    (rec,) = report["results"]
    assert rec["nproc"] == 2 and rec["steps"] == 1347 // 64
    assert rec["test_accuracy"] > 0.5


def test_nproc_failure_exits_1_and_leaves_no_report(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mbn_torch.reproduce import multiproc

    def failing(*args: Any, nproc: int, **kwargs: Any) -> RunResult:
        raise multiproc.WorkerError(f"process 1 of {nproc} failed: RuntimeError: boom")

    monkeypatch.setattr(multiproc, "train_spawned", failing)
    argv = ["reproduce", "--quick", "--nproc", "2", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "mbn-ref reproduce: error: a run failed: process 1 of 2 failed: RuntimeError: boom"
    )
    assert not (tmp_path / "reproduce.json").exists()
    assert not (tmp_path / "reproduce.png").exists()


@pytest.mark.parametrize("name", ["", ".data", ".models", ".experiment", ".output", ".cli"])
def test_doctests(name: str) -> None:
    """The modules' examples (the test run's --doctest-modules does not reach adapters/)."""
    module = importlib.import_module(f"mbn_torch.reproduce{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
