"""The models (an MLP and a CNN for the digits, ResNet-18 for CIFAR-10), their normalizations.

Normalizations (:data:`NORMS`): ``none``; ``bn``, batch normalization
(:class:`mbn_torch.DynamicBatchNorm1d`/``2d``, PyTorch's fused kernel, its momentum runtime
state so that it gets the same inference decay as MBN); ``mbn``, momentum batch normalization
(:class:`mbn_torch.MomentumBatchNorm1d`/``2d``); ``gn``, GroupNorm (8 groups); ``ln``,
LayerNorm (over the features; over channels and pixels for the CNN, ``GroupNorm(1, C)``);
``in``, InstanceNorm (CNN and ResNet-18 only). ResNet-18 (:mod:`~mbn_torch.reproduce.resnet`)
uses GroupNorm with 32 groups, as Wu and He's.

>>> import torch
>>> mlp = make_model("mlp", "mbn")
>>> mlp(torch.randn(4, 64)).shape
torch.Size([4, 10])
>>> cnn = make_model("cnn", "in")
>>> cnn(torch.randn(4, 64)).shape
torch.Size([4, 10])
>>> make_model("resnet18", "gn")(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules import (
    DynamicBatchNorm1d,
    DynamicBatchNorm2d,
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
)
from .resnet import ResNet18

__all__ = ["DATA_MODELS", "MODELS", "NORMS", "NORM_LABELS", "make_model", "make_norm"]

MODELS = ("mlp", "cnn")
"""The digits' model names: ``mlp`` (64-128-128-10) and ``cnn`` (digits as 1x8x8 images)."""

DATA_MODELS = {"digits": MODELS, "cifar10": ("resnet18",)}
"""The models of each data set: ``resnet18`` takes ``(N, 3, 32, 32)`` CIFAR images."""

NORMS = ("none", "bn", "mbn", "gn", "ln", "in")
"""The normalization names, in the order of the table."""

NORM_LABELS = {
    "none": "none",
    "bn": "BN",
    "mbn": "MBN",
    "gn": "GroupNorm",
    "ln": "LayerNorm",
    "in": "InstanceNorm",
}
"""Readable names of :data:`NORMS`."""

_GROUPS = 8
_RESNET_GROUPS = 32


def make_norm(norm: str, num_features: int, *, spatial: bool, groups: int = _GROUPS) -> nn.Module:
    """One normalization layer over ``num_features`` channels.

    Parameters
    ----------
    norm : str
        One of :data:`NORMS`.
    num_features : int
        The number of channels (features).
    spatial : bool
        ``True`` for ``(N, C, H, W)`` input (the CNN), ``False`` for ``(N, C)`` (the MLP).
    groups : int, optional
        The number of groups of ``gn``.

    Returns
    -------
    nn.Module
        The layer; ``nn.Identity`` for ``none``.

    Raises
    ------
    ValueError
        An unknown name, or ``in`` for the MLP (one feature per channel: nothing to normalize).

    Examples
    --------
    >>> make_norm("bn", 16, spatial=True)
    DynamicBatchNorm2d(16, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    """
    if norm not in NORMS:
        raise ValueError(f"unknown normalization {norm!r}; expected one of {', '.join(NORMS)}")
    if norm == "none":
        return nn.Identity()
    if norm == "bn":
        return (DynamicBatchNorm2d if spatial else DynamicBatchNorm1d)(num_features)
    if norm == "mbn":
        return (MomentumBatchNorm2d if spatial else MomentumBatchNorm1d)(num_features)
    if norm == "gn":
        return nn.GroupNorm(groups, num_features)
    if norm == "ln":
        return nn.GroupNorm(1, num_features) if spatial else nn.LayerNorm(num_features)
    if not spatial:
        raise ValueError("InstanceNorm ('in') needs spatial input: use it with the CNN only")
    return nn.InstanceNorm2d(num_features, affine=True)


class _Image(nn.Module):
    """Reshape ``(N, 64)`` features to ``(N, 1, 8, 8)`` images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, 8, 8)


def make_model(model: str, norm: str, num_classes: int = 10) -> nn.Module:
    """The model ``model`` with the normalization ``norm`` after each hidden layer.

    Parameters
    ----------
    model : str
        ``mlp``: 64 -> 128 -> 128 -> 10, a normalization after each hidden linear layer,
        ReLU. ``cnn``: the 8x8 digits as 1x8x8 images, conv 3x3 (16 channels), conv 3x3
        stride 2 (32 channels), conv 3x3 (32 channels), each followed by the normalization
        and ReLU, global average pooling, a linear classifier. ``resnet18``: ResNet-18 for
        CIFAR (:class:`~mbn_torch.reproduce.resnet.ResNet18`; GroupNorm with 32 groups).
    norm : str
        One of :data:`NORMS` (``in`` not for the MLP).
    num_classes : int, optional
        The number of outputs.

    Returns
    -------
    nn.Module
        The model; ``mlp`` and ``cnn`` take ``(N, 64)`` features, ``resnet18``
        ``(N, 3, 32, 32)`` images.

    Raises
    ------
    ValueError
        An unknown model or normalization.

    Examples
    --------
    >>> sum(p.numel() for p in make_model("mlp", "none").parameters())
    26122
    """
    if model == "mlp":
        return nn.Sequential(
            nn.Linear(64, 128),
            make_norm(norm, 128, spatial=False),
            nn.ReLU(),
            nn.Linear(128, 128),
            make_norm(norm, 128, spatial=False),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
    if model == "cnn":
        return nn.Sequential(
            _Image(),
            nn.Conv2d(1, 16, 3, padding=1),
            make_norm(norm, 16, spatial=True),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            make_norm(norm, 32, spatial=True),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            make_norm(norm, 32, spatial=True),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, num_classes),
        )
    if model == "resnet18":
        return ResNet18(
            lambda c: make_norm(norm, c, spatial=True, groups=_RESNET_GROUPS), num_classes
        )
    known = ", ".join(name for names in DATA_MODELS.values() for name in names)
    raise ValueError(f"unknown model {model!r}; expected one of {known}")
