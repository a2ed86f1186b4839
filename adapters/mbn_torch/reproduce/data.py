"""The data sets: what a run needs of one (:class:`Dataset`), the digits, and loading by name.

- ``digits``: scikit-learn's ``load_digits`` (1797 8x8 images, 10 classes; no download), a
  stratified train/test split with a fixed seed, features standardized with the training
  set's mean and standard deviation (pixels that are constant in the training set stay 0);
  no augmentation.
- ``cifar10``: CIFAR-10's binary files (:mod:`~mbn_torch.reproduce.cifar`).

:func:`load_dataset` loads either by name (``--nproc`` processes reload the data with it,
from :meth:`Dataset.source`); ``train_limit``/``test_limit`` keep the first samples only.

>>> data = load_digits_split()
>>> data.x_train.shape, data.x_test.shape, data.num_classes
(torch.Size([1347, 64]), torch.Size([450, 64]), 10)
>>> round(float(data.x_train.mean()), 6) == 0.0
True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["DATASETS", "Dataset", "Digits", "load_dataset", "load_digits_split"]

DATASETS = ("digits", "cifar10")
"""The data sets' names."""


class Dataset(Protocol):
    """What a training run needs of a data set (:class:`Digits`, :class:`~.cifar.Cifar10`).

    ``x_*`` are float32 inputs (the model's shape), ``y_*`` int64 labels in
    ``0..num_classes - 1``.
    """

    @property
    def x_train(self) -> torch.Tensor: ...  # noqa: D102
    @property
    def y_train(self) -> torch.Tensor: ...  # noqa: D102
    @property
    def x_test(self) -> torch.Tensor: ...  # noqa: D102
    @property
    def y_test(self) -> torch.Tensor: ...  # noqa: D102
    @property
    def num_classes(self) -> int: ...  # noqa: D102

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A training batch as the model sees it (random draws from ``generator`` only)."""
        ...

    def source(self) -> dict[str, Any]:
        """The keyword arguments of :func:`load_dataset` that load this data again."""
        ...

    def describe(self) -> dict[str, Any]:
        """The JSON record of the data (name, sizes, preprocessing)."""
        ...


@dataclass(frozen=True)
class Digits:
    """A train/test split of the digits, as float32 features and int64 labels.

    Attributes
    ----------
    x_train, x_test : torch.Tensor
        ``(n, 64)`` standardized features (reshape to ``(n, 1, 8, 8)`` for the CNN).
    y_train, y_test : torch.Tensor
        ``(n,)`` labels in ``0..9``.
    num_classes : int
        10.
    split_seed : int
        The seed of the split.
    test_size : float
        The fraction of the samples held out for testing.
    train_limit, test_limit : int or None
        The first samples kept of each split (``None``: all).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    split_seed: int
    test_size: float = 0.25
    train_limit: int | None = None
    test_limit: int | None = None

    name = "digits"

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """No augmentation: ``x`` itself."""
        return x

    def source(self) -> dict[str, Any]:
        """The keyword arguments of :func:`load_dataset` that load this split again."""
        return {
            "name": self.name,
            "test_size": self.test_size,
            "split_seed": self.split_seed,
            "train_limit": self.train_limit,
            "test_limit": self.test_limit,
        }

    def describe(self) -> dict[str, Any]:
        """The JSON record of the data."""
        return {
            "name": "sklearn.datasets.load_digits",
            "train": len(self.y_train),
            "test": len(self.y_test),
            "split_seed": self.split_seed,
            "split": "stratified, standardized with the training set's statistics",
            "train_limit": self.train_limit,
            "test_limit": self.test_limit,
        }


def load_digits_split(test_size: float = 0.25, split_seed: int = 0) -> Digits:
    """Load the digits, split them (stratified) and standardize them.

    Parameters
    ----------
    test_size : float, optional
        The fraction of the samples held out for testing.
    split_seed : int, optional
        The seed of the split (the same for every run, so runs differ only by their seed).

    Returns
    -------
    Digits
        The split.

    Examples
    --------
    >>> d = load_digits_split(test_size=0.5)
    >>> len(d.y_train) + len(d.y_test)
    1797
    """
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=split_seed
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std = np.where(std > 0, std, 1.0)

    def feats(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((a - mean) / std, dtype=torch.float32)

    return Digits(
        x_train=feats(x_tr),
        y_train=torch.as_tensor(y_tr, dtype=torch.int64),
        x_test=feats(x_te),
        y_test=torch.as_tensor(y_te, dtype=torch.int64),
        num_classes=int(y.max()) + 1,
        split_seed=split_seed,
        test_size=test_size,
    )


def _first(data: Digits, train_limit: int | None, test_limit: int | None) -> Digits:
    changes: dict[str, Any] = {"train_limit": train_limit, "test_limit": test_limit}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        if limit is not None:
            changes[f"x_{split}"] = getattr(data, f"x_{split}")[:limit]
            changes[f"y_{split}"] = getattr(data, f"y_{split}")[:limit]
    return dataclasses.replace(data, **changes)


def load_dataset(
    name: str,
    *,
    path: str | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """Load the data set ``name`` (one of :data:`DATASETS`).

    Parameters
    ----------
    name : str
        ``digits`` or ``cifar10``.
    path : str, optional
        CIFAR-10's binary directory (or its parent); required for ``cifar10`` only.
    train_limit, test_limit : int, optional
        Keep only the first samples of each split (CIFAR-10 reads only those).
    **kwargs
        :func:`load_digits_split`'s arguments (``test_size``, ``split_seed``).

    Returns
    -------
    Dataset
        The data.

    Raises
    ------
    ValueError
        An unknown name, a missing ``path`` or a limit below 1;
        :class:`~mbn_torch.reproduce.cifar.Cifar10Error` for bad CIFAR-10 files.

    Examples
    --------
    >>> d = load_dataset("digits", train_limit=100)
    >>> len(d.y_train), len(d.y_test)
    (100, 450)
    >>> torch.equal(load_dataset(**d.source()).x_train, d.x_train)  # as --nproc reloads it
    True
    """
    for what, limit in (("train_limit", train_limit), ("test_limit", test_limit)):
        if limit is not None and limit < 1:
            raise ValueError(f"{what} must be >= 1, got {limit}")
    if name == "digits":
        if path is not None:
            raise ValueError("the digits need no path (it is CIFAR-10's)")
        return _first(load_digits_split(**kwargs), train_limit, test_limit)
    if name == "cifar10":
        if path is None:
            raise ValueError("cifar10 needs the path of its binary files")
        from .cifar import load_cifar10

        return load_cifar10(path, train_limit=train_limit, test_limit=test_limit)
    raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
