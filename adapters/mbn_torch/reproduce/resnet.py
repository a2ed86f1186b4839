"""ResNet-18 for CIFAR (32x32 images), as in the paper's CIFAR experiments.

The CIFAR variant of He et al.'s ResNet-18: a 3x3 stem convolution (64 channels, stride 1,
no max-pooling), four stages of two basic blocks with 64, 128, 256 and 512 channels (stride
2 at the first block of the last three stages, a 1x1 convolution and a normalization on the
shortcut where the shape changes), global average pooling and a linear classifier. Every
convolution is bias-free and followed by the normalization that ``norm`` builds (the factory
of :func:`~mbn_torch.reproduce.models.make_norm`).

>>> from torch import nn
>>> net = ResNet18(lambda c: nn.BatchNorm2d(c))
>>> net(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
>>> sum(p.numel() for p in net.parameters())
11173962
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet18"]

NormFactory = Callable[[int], nn.Module]
"""A function of the channel count returning a normalization layer for ``(N, C, H, W)``."""


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, each normalized, with an identity (or projection) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.norm1 = norm(channels)
        self.conv2 = _conv3x3(channels, channels)
        self.norm2 = norm(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), norm(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``."""
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 3x32x32 images (see the module's docstring).

    Parameters
    ----------
    norm : callable
        ``norm(channels)`` returns the normalization layer after each convolution.
    num_classes : int, optional
        The number of outputs.
    """

    def __init__(self, norm: NormFactory, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(3, 64), norm(64), nn.ReLU())
        stages: list[nn.Module] = []
        in_channels = 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    BasicBlock(in_channels, channels, stride, norm),
                    BasicBlock(channels, channels, 1, norm),
                )
            )
            in_channels = channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, 3, 32, 32)``."""
        out: torch.Tensor = self.head(self.stages(self.stem(x)))
        return out
