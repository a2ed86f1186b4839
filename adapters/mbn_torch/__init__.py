"""mbn_torch: the PyTorch adapter of mbn-ref (docs/torch.md; its seams: docs/adapters.md).

>>> import torch
>>> import mbn_torch
>>> bn = mbn_torch.MomentumBatchNorm2d(3, lam=0.5)
>>> bn(torch.randn(2, 3, 4, 4)).shape
torch.Size([2, 3, 4, 4])
"""

from ._function import batch_statistics_norm, momentum_batch_norm
from .checkpoint import load_checkpoint, save_checkpoint
from .convert import convert_to_batchnorm, convert_to_mbn
from .distributed import SyncMomentumBatchNorm, merge_inference_statistics, process_group_sum
from .modules import (
    DynamicBatchNorm1d,
    DynamicBatchNorm2d,
    DynamicBatchNorm3d,
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
    MomentumBatchNorm3d,
)
from .scheduler import MomentumScheduler

__all__ = [
    "DynamicBatchNorm1d",
    "DynamicBatchNorm2d",
    "DynamicBatchNorm3d",
    "MomentumBatchNorm1d",
    "MomentumBatchNorm2d",
    "MomentumBatchNorm3d",
    "MomentumScheduler",
    "SyncMomentumBatchNorm",
    "batch_statistics_norm",
    "convert_to_batchnorm",
    "convert_to_mbn",
    "load_checkpoint",
    "merge_inference_statistics",
    "momentum_batch_norm",
    "process_group_sum",
    "save_checkpoint",
]
