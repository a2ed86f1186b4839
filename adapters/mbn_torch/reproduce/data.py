"""The data: scikit-learn's ``load_digits`` (1797 8x8 images, 10 classes; no download).

A stratified train/test split with a fixed seed, features standardized with the training
set's mean and standard deviation (pixels that are constant in the training set stay 0).

>>> data = load_digits_split()
>>> data.x_train.shape, data.x_test.shape, data.num_classes
(torch.Size([1347, 64]), torch.Size([450, 64]), 10)
>>> round(float(data.x_train.mean()), 6) == 0.0
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Digits", "load_digits_split"]


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
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    split_seed: int


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
    )
