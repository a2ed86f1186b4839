"""``mbn-ref reproduce --data cifar10``: the binary reader, ResNet-18, augmentation, the CLI.

Everything runs on a small synthetic CIFAR-10 binary directory (6 files of 40 records each,
written in the official format), so no download is needed.
"""

from __future__ import annotations

import doctest
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tqdm")  # the `reproduce` extra
pytest.importorskip("scipy")

import torch

from mbn_ref.cli import main
from mbn_torch import MomentumBatchNorm2d
from mbn_torch.reproduce.augment import random_crop_flip
from mbn_torch.reproduce.cifar import (
    RECORD_BYTES,
    TEST_FILE,
    TRAIN_FILES,
    Cifar10Error,
    load_cifar10,
    read_records,
)
from mbn_torch.reproduce.experiment import CIFAR10_PRESETS, Config, train_one
from mbn_torch.reproduce.models import NORMS, make_model
from mbn_torch.reproduce.resnet import BasicBlock

RECORDS = 40
FILES = (*TRAIN_FILES, TEST_FILE)


def _label(f: int, i: int) -> int:
    return (3 * i + f) % 10


def _pixels(f: int, i: int) -> np.ndarray:
    """Record i of file f: byte (c, h, w) = (f + 3 i + 5 c + 7 h + 11 w) mod 256."""
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((f + 3 * i + 5 * c + 7 * h + 11 * w) % 256).astype(np.uint8)


def write_cifar(root: Path, records: int = RECORDS) -> Path:
    """Six binary files in the official layout: label byte, then R, G, B planes row-major."""
    root.mkdir(parents=True, exist_ok=True)
    for f, name in enumerate(FILES):
        out = np.empty((records, RECORD_BYTES), dtype=np.uint8)
        for i in range(records):
            out[i, 0] = _label(f, i)
            out[i, 1:] = _pixels(f, i).reshape(-1)  # (3, 32, 32) C order: R plane, G, B
        out.tofile(root / name)
    return root


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """One torch thread: a tiny ResNet batch gains nothing from more on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("cifar")
    write_cifar(parent / "cifar-10-batches-bin")
    return parent


@pytest.fixture
def cifar_copy(tmp_path: Path) -> Path:
    return write_cifar(tmp_path / "cifar-10-batches-bin")


# ------------------------------------------------------------------------------ the reader


def test_read_records_layout(cifar_parent: Path) -> None:
    x, y = read_records(cifar_parent / "cifar-10-batches-bin" / TRAIN_FILES[1])
    assert x.shape == (RECORDS, 3, 32, 32) and x.dtype == np.uint8
    assert y.dtype == np.int64 and y.tolist() == [_label(1, i) for i in range(RECORDS)]
    # a known pixel: record 3, blue (channel 2), row 7, column 11
    assert int(x[3, 2, 7, 11]) == (1 + 9 + 10 + 49 + 121) % 256
    assert x[3, 2, 7, 11] != x[3, 2, 11, 7]  # rows are rows, not columns
    for i in (0, 17, RECORDS - 1):
        assert np.array_equal(x[i], _pixels(1, i))


def test_known_pixel_lands_at_its_channel_row_column(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "d", records=2)
    raw = np.fromfile(root / TEST_FILE, dtype=np.uint8).reshape(2, RECORD_BYTES)
    raw[1, 1:] = 0
    raw[1, 1 + 1 * 1024 + 5 * 32 + 30] = 251  # green, row 5, column 30 of record 1
    raw.tofile(root / TEST_FILE)
    x, _ = read_records(root / TEST_FILE)
    assert np.argwhere(x[1] == 251).tolist() == [[1, 5, 30]]


def test_load_parent_or_directory_same_data(cifar_parent: Path) -> None:
    a = load_cifar10(cifar_parent)
    b = load_cifar10(cifar_parent / "cifar-10-batches-bin")
    assert torch.equal(a.x_train, b.x_train) and a.path == b.path
    assert a.x_train.shape == (5 * RECORDS, 3, 32, 32) and a.x_train.dtype == torch.float32
    assert a.x_test.shape == (RECORDS, 3, 32, 32) and a.num_classes == 10
    # the training files in order 1..5, then the test file
    expect = [_label(f, i) for f in range(5) for i in range(RECORDS)]
    assert a.y_train.tolist() == expect
    assert a.y_test.tolist() == [_label(5, i) for i in range(RECORDS)]


def test_normalized_with_the_training_statistics(cifar_parent: Path) -> None:
    data = load_cifar10(cifar_parent)
    raw = np.stack([_pixels(f, i) for f in range(5) for i in range(RECORDS)]).astype(np.float64)
    mean, std = raw.mean(axis=(0, 2, 3)), raw.std(axis=(0, 2, 3))
    np.testing.assert_allclose(data.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(data.std, std, rtol=1e-12)
    x = data.x_train.double()
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(dim=(0, 2, 3), unbiased=False).numpy(), 1.0, atol=1e-5)
    # a pixel: (value - mean) / std of its channel
    value = _pixels(5, 2)[0, 4, 9]
    assert float(data.x_test[2, 0, 4, 9]) == pytest.approx((value - mean[0]) / std[0], abs=1e-5)


def test_limits_read_the_first_records(cifar_parent: Path) -> None:
    data = load_cifar10(cifar_parent, train_limit=RECORDS + 10, test_limit=5)
    full = load_cifar10(cifar_parent)
    assert len(data.y_train) == RECORDS + 10 and len(data.y_test) == 5
    assert torch.equal(data.y_train, full.y_train[: RECORDS + 10])  # across two files
    assert data.mean != full.mean  # the statistics of the images read
    assert data.source()["train_limit"] == RECORDS + 10
    with pytest.raises(Cifar10Error, match="train_limit must be >= 1"):
        load_cifar10(cifar_parent, train_limit=0)


def _one_line(exc: pytest.ExceptionInfo[Exception]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(Cifar10Error) as exc:
        load_cifar10(tmp_path / "nowhere")
    assert "no such directory" in _one_line(exc)


def test_missing_files(cifar_copy: Path) -> None:
    (cifar_copy / TEST_FILE).unlink()
    (cifar_copy / TRAIN_FILES[2]).unlink()
    with pytest.raises(Cifar10Error) as exc:
        load_cifar10(cifar_copy.parent)
    text = _one_line(exc)
    assert "missing data_batch_3.bin, test_batch.bin" in text and "binary" in text


def test_python_version_is_named(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80")
    with pytest.raises(Cifar10Error, match="pickle"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("extra", [1, -1, -RECORD_BYTES * RECORDS])
def test_size_not_a_multiple_of_3073(cifar_copy: Path, extra: int) -> None:
    path = cifar_copy / TRAIN_FILES[4]
    raw = path.read_bytes()
    path.write_bytes(raw + b"\0" if extra > 0 else raw[:extra])
    with pytest.raises(Cifar10Error) as exc:
        load_cifar10(cifar_copy)
    assert "3073" in _one_line(exc) and "data_batch_5.bin" in str(exc.value)


def test_label_outside_0_to_9(cifar_copy: Path) -> None:
    raw = np.fromfile(cifar_copy / TEST_FILE, dtype=np.uint8).reshape(RECORDS, RECORD_BYTES)
    raw[6, 0] = 10
    raw.tofile(cifar_copy / TEST_FILE)
    with pytest.raises(Cifar10Error) as exc:
        load_cifar10(cifar_copy)
    assert "record 6 has label 10, expected 0..9" in _one_line(exc)


# ------------------------------------------------------------------------------ ResNet-18


def test_resnet18_architecture() -> None:
    net = make_model("resnet18", "bn")
    assert sum(p.numel() for p in net.parameters()) == 11_173_962  # the CIFAR ResNet-18
    stem = net.stem[0]
    assert isinstance(stem, torch.nn.Conv2d)
    assert (stem.kernel_size, stem.stride, stem.out_channels) == ((3, 3), (1, 1), 64)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert [b.conv2.out_channels for b in blocks] == [64, 64, 128, 128, 256, 256, 512, 512]
    mbn = make_model("resnet18", "mbn")
    assert sum(isinstance(m, MomentumBatchNorm2d) for m in mbn.modules()) == 20  # 17 + 3
    groups = {
        m.num_groups for m in make_model("resnet18", "gn").modules() if hasattr(m, "num_groups")
    }
    assert groups == {32}


@pytest.mark.parametrize("norm", NORMS)
def test_resnet18_forward_backward(norm: str) -> None:
    torch.manual_seed(0)
    net = make_model("resnet18", norm, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, 10)
    out.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(net.head[2].weight.grad.abs().sum()) > 0  # type: ignore[union-attr]


def test_resnet18_unknown_norm() -> None:
    with pytest.raises(ValueError, match="unknown normalization"):
        make_model("resnet18", "batchnorm")


# ------------------------------------------------------------------------------ augmentation


def test_augmentation_is_deterministic_and_keeps_shapes() -> None:
    x = torch.randn(16, 3, 32, 32)
    a = random_crop_flip(x, torch.Generator().manual_seed(5))
    b = random_crop_flip(x, torch.Generator().manual_seed(5))
    c = random_crop_flip(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flip_flips() -> None:
    x = torch.randn(32, 3, 4, 5)
    y = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    same = [bool(torch.equal(y[i], x[i])) for i in range(32)]
    flipped = [bool(torch.equal(y[i], x[i].flip(-1))) for i in range(32)]
    assert all(s != f for s, f in zip(same, flipped, strict=True))  # one or the other
    assert 0 < sum(flipped) < 32


def test_crop_is_a_window_of_the_padded_image() -> None:
    x = torch.randn(8, 3, 32, 32)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    y = random_crop_flip(x, torch.Generator().manual_seed(1), padding=4, fill=fill)
    padded = fill.reshape(1, 3, 1, 1).repeat(8, 1, 40, 40)
    padded[:, :, 4:36, 4:36] = x
    windows = {
        (dy, dx, flip): padded[:, :, dy : dy + 32, dx : dx + 32].flip(-1)
        if flip
        else padded[:, :, dy : dy + 32, dx : dx + 32]
        for dy in range(9)
        for dx in range(9)
        for flip in (False, True)
    }
    offsets = set()
    for i in range(8):
        found = [key for key, w in windows.items() if torch.equal(y[i], w[i])]
        assert len(found) == 1, found
        offsets.add(found[0][:2])
    assert len(offsets) > 1  # the offsets vary


def test_cifar_augmentation_pads_black(cifar_parent: Path) -> None:
    data = load_cifar10(cifar_parent, train_limit=8)
    x = data.x_train[:8]
    black = [-m / s for m, s in zip(data.mean, data.std, strict=True)]
    y = data.augment(x, torch.Generator().manual_seed(2))
    assert y.shape == x.shape
    border = y[:, :, 0, :]  # the top row is padding where the offset is < 4
    for c in range(3):
        hits = torch.isclose(border[:, c], torch.tensor(black[c])).all(dim=1)
        assert hits.any()


# ------------------------------------------------------------------------------ training


def test_presets_are_the_papers_training() -> None:
    full = CIFAR10_PRESETS["full"]
    assert full.models == ("resnet18",) and full.batch_sizes == (2, 4, 8, 16, 32)
    assert (full.lr, full.lr_batch_size, full.weight_decay, full.epochs) == (0.1, 64, 1e-4, 200)
    assert {"bn", "mbn", "gn"} <= set(full.norms)
    quick = CIFAR10_PRESETS["quick"]
    assert quick.train_limit is not None and quick.epochs <= 2
    with pytest.raises(ValueError, match="unknown 'mlp' with cifar10"):
        Config(data="cifar10", models=("mlp",))
    with pytest.raises(ValueError, match="one GPU per process"):
        Config(nproc=2, device="cuda:1")
    assert Config(nproc=2, device="cuda").nproc == 2  # process r on cuda:r, NCCL


def test_train_one_is_seeded(cifar_parent: Path) -> None:
    data = load_cifar10(cifar_parent, train_limit=3, test_limit=2)
    kw: dict[str, Any] = {"epochs": 1, "lr_batch_size": 64, "weight_decay": 1e-4}
    a = train_one(data, "resnet18", "mbn", 2, 0, **kw)
    b = train_one(data, "resnet18", "mbn", 2, 0, **kw)
    assert a.steps == 1 and a.final_train_loss == b.final_train_loss  # the last batch dropped
    assert a.test_accuracy == b.test_accuracy and 0.0 <= a.test_accuracy <= 1.0
    assert a.lam == [0.0]  # Eq. 11 with T = 1


# ------------------------------------------------------------------------------ the CLI


def _cli(cifar: Path, out: Path, *extra: str) -> list[str]:
    argv = ["reproduce", "--data", "cifar10", "--data-dir", str(cifar), "--out", str(out)]
    return [*argv, "--no-progress", *extra]


def test_cli_end_to_end(
    cifar_parent: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--norms", "bn,mbn", "--batch-sizes", "2", "--seeds", "0", "--epochs", "1"]
    extra += ["--train-limit", "4", "--test-limit", "4", "--device", "cpu", "--no-plot"]
    assert main(_cli(cifar_parent, tmp_path, *extra)) == 0
    stdout = capsys.readouterr().out
    assert "cifar10 (resnet18, torch on cpu): 4 train / 4 test images" in stdout
    assert "the paper trains 200 epochs" in stdout
    report = json.loads((tmp_path / "reproduce.json").read_text(encoding="utf-8"))
    assert [(r["model"], r["norm"]) for r in report["results"]] == [
        ("resnet18", "bn"),
        ("resnet18", "mbn"),
    ]
    for rec in report["results"]:
        assert {"model", "norm", "batch_size", "seed", "test_accuracy"} <= set(rec)
        assert rec["batch_size"] == 2 and rec["seed"] == 0 and rec["steps"] == 2
        assert 0.0 <= rec["test_accuracy"] <= 1.0
    data = report["data"]
    assert "CIFAR-10" in data["name"] and (data["train"], data["test"]) == (4, 4)
    assert data["path"] == str(cifar_parent / "cifar-10-batches-bin")
    cfg = report["configuration"]
    assert (cfg["data"], cfg["lr_batch_size"], cfg["weight_decay"]) == ("cifar10", 64, 1e-4)
    assert cfg["device"] == "cpu" and report["framework"] == "torch"


def test_cli_nproc_two(cifar_parent: Path, tmp_path: Path) -> None:
    """--nproc 2 on CIFAR-10: each gloo process reads the files; MBN merged for inference."""
    extra = ["--norms", "mbn", "--batch-sizes", "2", "--seeds", "0", "--epochs", "1"]
    extra += ["--train-limit", "4", "--test-limit", "4", "--nproc", "2", "--no-plot"]
    assert main(_cli(cifar_parent, tmp_path, *extra)) == 0
    report = json.loads((tmp_path / "reproduce.json").read_text(encoding="utf-8"))
    (rec,) = report["results"]
    assert rec["nproc"] == 2 and rec["steps"] == 1 and 0.0 <= rec["test_accuracy"] <= 1.0


def test_nproc_worker_failure_is_one_line(cifar_copy: Path) -> None:
    """A process that fails (here: the files vanished after the parent read them) ends the
    run with one line: which process, and its error."""
    from mbn_torch.reproduce.multiproc import WorkerError, train_spawned

    data = load_cifar10(cifar_copy, train_limit=4, test_limit=2)
    (cifar_copy / TEST_FILE).unlink()
    with pytest.raises(WorkerError) as exc:
        train_spawned(data, "resnet18", "bn", 2, 0, nproc=2, epochs=1)
    text = _one_line(exc)
    assert "of 2 failed: Cifar10Error: missing test_batch.bin" in text, text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "cifar10"], "--data cifar10 needs --data-dir"),
        (["--data-dir", "{cifar}"], "--data-dir is for --data cifar10"),
        (["--data", "cifar10", "--data-dir", "{missing}"], "no such directory"),
        (["--data", "cifar10", "--data-dir", "{empty}"], "missing data_batch_1.bin"),
        (["--data", "cifar10", "--data-dir", "{cifar}", "--models", "mlp"], "unknown 'mlp'"),
        (["--data", "cifar10", "--data-dir", "{cifar}", "--train-limit", "0"], "must be >= 1"),
        (["--data", "cifar10", "--data-dir", "{cifar}", "--train-limit", "3"], "fewer than one"),
        (["--data", "cifar10", "--data-dir", "{cifar}", "--framework", "keras"], "digits"),
        (["--data", "cifar10", "--data-dir", "{cifar}", "--device", "tpu"], "--device"),
        (["--data", "imagenet"], "invalid choice"),
        (["--framework", "jax"], "invalid choice"),
    ],
)
def test_cli_usage_errors(
    argv: list[str],
    message: str,
    cifar_parent: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "empty").mkdir()
    paths = {"cifar": cifar_parent, "missing": tmp_path / "nope", "empty": tmp_path / "empty"}
    argv = [a.format(**paths) for a in argv]
    out = tmp_path / "out"
    assert main(["reproduce", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err and message in err, err
    assert not out.exists()


def test_cli_bad_file_exits_2_and_writes_nothing(
    cifar_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = np.fromfile(cifar_copy / TRAIN_FILES[0], dtype=np.uint8).reshape(RECORDS, RECORD_BYTES)
    raw[0, 0] = 200
    raw.tofile(cifar_copy / TRAIN_FILES[0])
    out = tmp_path / "out"
    assert main(_cli(cifar_copy, out)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "record 0 has label 200" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cli_cuda_unavailable(
    cifar_parent: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_cli(cifar_parent, tmp_path / "out", "--device", "cuda")) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_help_mentions_cifar(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--data {digits,cifar10}" in text and "--framework {torch,keras}" in text
    assert "cifar-10-batches-bin" in text and "200 epochs" in text and "--device" in text


@pytest.mark.parametrize("name", [".cifar", ".augment", ".resnet", ".multiproc"])
def test_doctests(name: str) -> None:
    """The new modules' examples (the test run's --doctest-modules does not reach adapters/)."""
    module = importlib.import_module(f"mbn_torch.reproduce{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
