"""CIFAR-10 from its *binary* distribution (``cifar-10-batches-bin``): raw bytes, no pickle.

The binary version (``cifar-10-binary.tar.gz`` on Alex Krizhevsky's page) holds
``data_batch_1.bin`` .. ``data_batch_5.bin`` (training) and ``test_batch.bin`` (test). Each
record is 3073 bytes: 1 label byte (0..9), then 3072 pixel bytes, 1024 red, 1024 green,
1024 blue, each channel a 32x32 image in row-major order; the official files hold 10000
records each. They are read with :func:`numpy.fromfile` (no pickle is ever loaded, no
torchvision), optionally only the first records (``train_limit``/``test_limit``), and
normalized by the per-channel mean and standard deviation of the training images read.

>>> import tempfile
>>> from pathlib import Path
>>> tmpdir = tempfile.TemporaryDirectory()
>>> tmp = Path(tmpdir.name)
>>> record = np.zeros(RECORD_BYTES, dtype=np.uint8)
>>> record[0] = 7                           # the label
>>> record[1 + 1024 + 32 * 5 + 9] = 255     # green (channel 1), row 5, column 9
>>> for name in TRAIN_FILES + (TEST_FILE,):
...     np.tile(record, 3).tofile(tmp / name)
>>> x, y = read_records(tmp / TEST_FILE)
>>> x.shape, x.dtype, y.tolist(), int(x[0, 1, 5, 9])
((3, 3, 32, 32), dtype('uint8'), [7, 7, 7], 255)
>>> data = load_cifar10(tmp, train_limit=4)
>>> tuple(data.x_train.shape), tuple(data.x_test.shape)
((4, 3, 32, 32), (3, 3, 32, 32))
>>> tmpdir.cleanup()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .augment import random_crop_flip

__all__ = [
    "CHANNEL_BYTES",
    "DIRECTORY",
    "RECORD_BYTES",
    "TEST_FILE",
    "TRAIN_FILES",
    "Cifar10",
    "Cifar10Error",
    "channel_moments",
    "find_cifar10",
    "load_cifar10",
    "read_records",
]

DIRECTORY = "cifar-10-batches-bin"
"""The directory the binary archive unpacks to."""

TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
"""The training files, in the order they are read."""

TEST_FILE = "test_batch.bin"
"""The test file."""

CHANNEL_BYTES = 32 * 32
RECORD_BYTES = 1 + 3 * CHANNEL_BYTES
"""One record: the label byte and the 3 x 32 x 32 pixel bytes (3073)."""

NUM_CLASSES = 10


class Cifar10Error(ValueError):
    """The CIFAR-10 binary files are missing or malformed (one line: what and where)."""


def find_cifar10(path: str | Path) -> Path:
    """The directory holding the six binary files: ``path`` itself or ``path/cifar-10-batches-bin``.

    Parameters
    ----------
    path : str or Path
        The ``cifar-10-batches-bin`` directory or its parent.

    Returns
    -------
    Path
        The directory, after checking that every file is there and holds whole records.

    Raises
    ------
    Cifar10Error
        A missing directory, missing files, an empty file or a size that is not a multiple of
        3073 bytes.
    """
    path = Path(path)
    if not path.is_dir():
        raise Cifar10Error(f"no such directory: {path} (expected the CIFAR-10 binary files)")
    root = path / DIRECTORY if (path / DIRECTORY).is_dir() else path
    names = (*TRAIN_FILES, TEST_FILE)
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        hint = ""
        if (root / "data_batch_1").exists() or (path / "cifar-10-batches-py").exists():
            hint = "; that is the Python (pickle) version: use the binary version instead"
        raise Cifar10Error(
            f"missing {', '.join(missing)} in {root} (expected {DIRECTORY}/ of "
            f"cifar-10-binary.tar.gz: data_batch_1.bin..data_batch_5.bin and {TEST_FILE}, "
            f"in PATH or in PATH/{DIRECTORY}){hint}"
        )
    for name in names:
        size = (root / name).stat().st_size
        if size == 0 or size % RECORD_BYTES:
            raise Cifar10Error(
                f"{root / name}: {size} bytes is not a positive multiple of {RECORD_BYTES} "
                f"(a record is 1 label byte and 3072 pixel bytes); not a CIFAR-10 binary file"
            )
    return root


def read_records(path: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one binary file (its first ``limit`` records at most).

    Parameters
    ----------
    path : Path
        A ``*.bin`` file of whole 3073-byte records.
    limit : int, optional
        Read at most this many records.

    Returns
    -------
    images : numpy.ndarray
        ``(n, 3, 32, 32)`` uint8, channels red, green, blue; rows then columns.
    labels : numpy.ndarray
        ``(n,)`` int64 in ``0..9``.

    Raises
    ------
    Cifar10Error
        A size that is not a multiple of 3073 bytes, or a label outside ``0..9``.
    """
    size = path.stat().st_size
    if size % RECORD_BYTES:
        raise Cifar10Error(f"{path}: {size} bytes is not a multiple of {RECORD_BYTES}")
    count = size // RECORD_BYTES if limit is None else min(limit, size // RECORD_BYTES)
    raw = np.fromfile(path, dtype=np.uint8, count=count * RECORD_BYTES)
    records = raw.reshape(count, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise Cifar10Error(
            f"{path}: record {int(bad[0])} has label {int(labels[bad[0]])}, expected 0..9 "
            f"(a corrupt or non-CIFAR-10 file)"
        )
    images = records[:, 1:].reshape(count, 3, 32, 32)
    return images, labels


def _read_split(root: Path, names: tuple[str, ...], limit: int | None) -> tuple[np.ndarray, ...]:
    images, labels = [], []
    left = limit
    for name in names:
        if left is not None and left <= 0:
            break
        x, y = read_records(root / name, left)
        images.append(x)
        labels.append(y)
        left = None if left is None else left - len(y)
    return np.concatenate(images), np.concatenate(labels)


def channel_moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) standard deviation of uint8 images, exactly.

    From each channel's histogram of the 256 byte values, in float64: no float copy of the
    images is made.

    Examples
    --------
    >>> x = np.array([[[[0, 2]], [[4, 4]], [[1, 3]]]], dtype=np.uint8)   # (1, 3, 1, 2)
    >>> mean, std = channel_moments(x)
    >>> mean.tolist(), std.tolist()
    ([1.0, 4.0, 2.0], [1.0, 0.0, 1.0])
    """
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        n = counts.sum()
        mean = float(counts @ values) / n
        means.append(mean)
        stds.append(float(np.sqrt(counts @ (values - mean) ** 2 / n)))
    return np.array(means), np.array(stds)


@dataclass(frozen=True)
class Cifar10:
    """CIFAR-10, normalized with the training images' per-channel mean and std.

    Attributes
    ----------
    x_train, x_test : torch.Tensor
        ``(n, 3, 32, 32)`` float32, ``(pixel - mean) / std`` per channel (pixels in 0..255).
    y_train, y_test : torch.Tensor
        ``(n,)`` int64 labels in ``0..9``.
    num_classes : int
        10.
    mean, std : tuple of float
        The training images' per-channel mean and standard deviation (0..255 scale).
    path : str
        The directory read.
    train_limit, test_limit : int or None
        The number of records read at most (the first ones, in file order).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    path: str
    train_limit: int | None = None
    test_limit: int | None = None

    name = "cifar10"

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The standard augmentation: random crop with 4-pixel zero padding, horizontal flip.

        The padding is black (0 before normalization); see
        :func:`~mbn_torch.reproduce.augment.random_crop_flip`.
        """
        fill = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)])
        return random_crop_flip(x, generator, padding=4, fill=fill)

    def source(self) -> dict[str, Any]:
        """The arguments of :func:`~mbn_torch.reproduce.data.load_dataset` that reload it."""
        return {
            "name": self.name,
            "path": self.path,
            "train_limit": self.train_limit,
            "test_limit": self.test_limit,
        }

    def describe(self) -> dict[str, Any]:
        """The JSON record of the data set."""
        return {
            "name": "CIFAR-10 (binary version, cifar-10-batches-bin)",
            "path": self.path,
            "train": len(self.y_train),
            "test": len(self.y_test),
            "train_limit": self.train_limit,
            "test_limit": self.test_limit,
            "normalization": "per channel, the training images' mean and std (0..255)",
            "mean": list(self.mean),
            "std": list(self.std),
            "augmentation": "random crop 32 of the image zero-padded by 4, horizontal flip",
        }


def load_cifar10(
    path: str | Path, *, train_limit: int | None = None, test_limit: int | None = None
) -> Cifar10:
    """Read and normalize CIFAR-10's binary files.

    Parameters
    ----------
    path : str or Path
        The ``cifar-10-batches-bin`` directory or its parent.
    train_limit, test_limit : int, optional
        Read only the first records (files in order: ``data_batch_1.bin`` first), to try it
        on a laptop.

    Returns
    -------
    Cifar10
        The data, normalized with the per-channel mean and std of the training images read.

    Raises
    ------
    Cifar10Error
        Missing or malformed files (:func:`find_cifar10`, :func:`read_records`), or a limit
        below 1.
    """
    for name, limit in (("train_limit", train_limit), ("test_limit", test_limit)):
        if limit is not None and limit < 1:
            raise Cifar10Error(f"{name} must be >= 1, got {limit}")
    root = find_cifar10(path)
    x_tr, y_tr = _read_split(root, TRAIN_FILES, train_limit)
    x_te, y_te = _read_split(root, (TEST_FILE,), test_limit)
    mean, std = channel_moments(x_tr)
    std = np.where(std > 0, std, 1.0)
    scale = (1.0 / std).astype(np.float32).reshape(1, 3, 1, 1)
    shift = mean.astype(np.float32).reshape(1, 3, 1, 1)

    def images(x: np.ndarray) -> torch.Tensor:
        out = x.astype(np.float32)  # in place from here: one float copy of the images
        out -= shift
        out *= scale
        return torch.from_numpy(out)

    return Cifar10(
        x_train=images(x_tr),
        y_train=torch.from_numpy(y_tr),
        x_test=images(x_te),
        y_test=torch.from_numpy(y_te),
        num_classes=NUM_CLASSES,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        path=str(root),
        train_limit=train_limit,
        test_limit=test_limit,
    )
