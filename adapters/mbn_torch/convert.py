"""Conversion between ``nn.BatchNorm*d`` and ``MomentumBatchNorm*d`` in a whole model.

:func:`convert_to_mbn` mirrors ``nn.SyncBatchNorm.convert_sync_batchnorm``: it walks the
model recursively, replaces each batch-norm layer by the matching
``MomentumBatchNorm1d/2d/3d`` and reuses the layer's own ``weight``/``bias`` ``Parameter``
objects and statistics tensors (so an optimizer built before the conversion still holds
the right parameters); ``nn.SyncBatchNorm`` becomes the synchronized
:class:`~mbn_torch.distributed.SyncMomentumBatchNorm`. :func:`convert_to_batchnorm` is the
way back, for export.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
>>> model = convert_to_mbn(model, lam=0.9)
>>> type(model[1]).__name__, float(model[1].lam)
('MomentumBatchNorm2d', 0.9)
>>> type(convert_to_batchnorm(model)[1]).__name__
'BatchNorm2d'
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mbn_ref import conventions

from .distributed import SyncMomentumBatchNorm
from .modules import (
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
    MomentumBatchNorm3d,
    _MomentumBatchNorm,
)

__all__ = ["convert_to_batchnorm", "convert_to_mbn"]

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
_TO_MBN: tuple[tuple[type[nn.Module], type[_MomentumBatchNorm]], ...] = (
    (nn.BatchNorm1d, MomentumBatchNorm1d),
    (nn.BatchNorm2d, MomentumBatchNorm2d),
    (nn.BatchNorm3d, MomentumBatchNorm3d),
)
_BY_NDIM: dict[int, type[_MomentumBatchNorm]] = {
    1: MomentumBatchNorm1d,
    2: MomentumBatchNorm2d,
    3: MomentumBatchNorm3d,
}
_TO_BN: tuple[tuple[type[_MomentumBatchNorm], type[nn.Module]], ...] = (
    (MomentumBatchNorm1d, nn.BatchNorm1d),
    (MomentumBatchNorm2d, nn.BatchNorm2d),
    (MomentumBatchNorm3d, nn.BatchNorm3d),
)


def _target(module: nn.Module, name: str, sync_ndim: int | None) -> type[_MomentumBatchNorm]:
    """The MBN class replacing the batch-norm layer ``module`` (checked, nothing changed)."""
    target: type[_MomentumBatchNorm]
    if isinstance(module, nn.SyncBatchNorm):
        target = SyncMomentumBatchNorm if sync_ndim is None else _BY_NDIM[sync_ndim]
    else:
        for source, mbn in _TO_MBN:
            if isinstance(module, source):
                target = mbn
                break
        else:
            raise TypeError(
                f"convert_to_mbn: {name or 'the model'} is a {type(module).__name__}, not a "
                "BatchNorm1d/2d/3d or SyncBatchNorm (an uninitialized lazy module or a "
                "custom batch norm): no MomentumBatchNorm equivalent"
            )
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(module, "bias", None) is None:
        raise ValueError(
            f"convert_to_mbn: {name or 'the model'} has a weight but no bias (bias=False); "
            "MomentumBatchNorm's affine transform has both"
        )
    return target


def _device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype of the statistics (else of the weight); ``None`` when neither."""
    for name in ("running_mean", "weight"):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor):
            return tensor.device, tensor.dtype
    lam = getattr(module, "lam", None)  # an MBN without statistics and weight
    return (lam.device if isinstance(lam, torch.Tensor) else None), None


def _adopt(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Give ``target`` the parameters, statistics and mode of ``source``, shared.

    As ``SyncBatchNorm.convert_sync_batchnorm`` does: the same ``Parameter`` objects (an
    optimizer built before the conversion keeps working) and the same statistics tensors.
    """
    if source.affine:
        with torch.no_grad():
            target.weight = source.weight
            target.bias = source.bias
    if source.track_running_stats:
        for stat in _STATISTICS:
            target.register_buffer(stat, getattr(source, stat))
    target.training = source.training
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig


def _to_mbn(module: nn.Module, lam: float, sync_ndim: int | None) -> nn.Module:
    module_output = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        device, dtype = _device_dtype(module)
        target = _target(module, "", sync_ndim)
        extra: dict[str, Any] = (
            {"process_group": module.process_group} if target is SyncMomentumBatchNorm else {}
        )
        module_output = target(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=device,
            dtype=dtype,
            lam=lam,
            **extra,
        )
        # the checkpoint loader's path: weights and statistics, and the training statistics
        # moving_mean/moving_var start from the running statistics
        module_output.load_state_dict(module.state_dict(), strict=True)
        # then, as convert_sync_batchnorm: the same Parameter objects and statistics tensors
        _adopt(module_output, module)
    for name, child in module.named_children():
        module_output.add_module(name, _to_mbn(child, lam, sync_ndim))
    del module
    return module_output


def convert_to_mbn(
    module: nn.Module, *, lam: float = 0.0, sync_ndim: int | None = None
) -> nn.Module:
    """Replace every batch-norm layer of ``module`` by a ``MomentumBatchNorm*d``.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: ``BatchNorm1d/2d/3d`` (subclasses
    included) become ``MomentumBatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` becomes
    :class:`~mbn_torch.distributed.SyncMomentumBatchNorm` (synchronized MBN over the same
    ``process_group``), in place inside ``module``; the root itself, if a batch norm, is
    replaced by a new module, so use the return value. For synchronized MBN from a model
    with plain ``BatchNorm*d``, convert with ``nn.SyncBatchNorm.convert_sync_batchnorm``
    first.

    Parameters
    ----------
    module : torch.nn.Module
        The model, or a single batch-norm layer.
    lam : float, optional
        The training decay of every new module (the paper's lambda, in ``[0, 1]``). With
        ``lam = 0`` (the default) the converted model computes exactly what it did.
    sync_ndim : {1, 2, 3}, optional
        Per-device instead of synchronized: convert ``nn.SyncBatchNorm`` layers to
        ``MomentumBatchNorm1d``, ``2d`` or ``3d`` (``SyncBatchNorm`` does not record its
        input rank), each normalizing its own device's batch (the paper's setting; see
        :func:`mbn_torch.distributed.merge_inference_statistics`). By default they become
        ``SyncMomentumBatchNorm``.

    Returns
    -------
    torch.nn.Module
        ``module`` with its batch-norm layers replaced, or the new module if ``module``
        was one.

    Raises
    ------
    ValueError
        An affine layer without bias (``bias=False``), ``lam`` outside ``[0, 1]``, or
        ``sync_ndim`` not 1, 2 or 3.
    TypeError
        A batch norm that is not ``BatchNorm1d/2d/3d`` or ``SyncBatchNorm`` (a lazy module
        not yet initialized, a custom ``_BatchNorm`` subclass).

    Notes
    -----
    Each new module gets the layer's ``eps``, ``momentum`` (``None`` included), ``affine``,
    ``track_running_stats``, ``training`` flag, device and dtype (of its statistics) and
    its ``qconfig`` if it has one (what ``convert_sync_batchnorm`` copies). Like
    ``convert_sync_batchnorm``, it **shares** the layer's ``weight``/``bias`` ``Parameter``
    objects (``requires_grad`` kept, an existing optimizer still holds them) and its
    ``running_mean``/``running_var``/``num_batches_tracked`` tensors (training the new model
    updates them in place). ``moving_mean``/``moving_var`` are new tensors, started from the
    running statistics by the loader of ``BatchNorm*d`` checkpoints (see docs/torch.md).
    Every layer is checked before any is replaced: on an error ``module`` is unchanged.
    ``process_group`` is kept by the synchronized conversion; other attributes (hooks) are
    not carried over.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=None))
    >>> net = convert_to_mbn(net, lam=0.5)
    >>> type(net[1]).__name__, net[1].momentum, float(net[1].lam)
    ('MomentumBatchNorm1d', None, 0.5)
    >>> net(torch.randn(8, 4)).shape
    torch.Size([8, 3])
    >>> type(convert_to_mbn(nn.SyncBatchNorm(3))).__name__
    'SyncMomentumBatchNorm'
    >>> type(convert_to_mbn(nn.SyncBatchNorm(3), sync_ndim=2)).__name__   # per-device
    'MomentumBatchNorm2d'
    """
    conventions.validate_decay(lam, "lam")
    if sync_ndim is not None and sync_ndim not in _BY_NDIM:
        raise ValueError(f"convert_to_mbn: sync_ndim must be 1, 2 or 3, got {sync_ndim!r}")
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            _target(sub, name, sync_ndim)
    return _to_mbn(module, lam, sync_ndim)


def _to_bn(module: nn.Module) -> nn.Module:
    module_output = module
    if isinstance(module, _MomentumBatchNorm):
        device, dtype = _device_dtype(module)
        args = (
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if isinstance(module, SyncMomentumBatchNorm):
            module_output = nn.SyncBatchNorm(
                *args, process_group=module.process_group, device=device, dtype=dtype
            )
        else:
            target = next(bn for mbn, bn in _TO_BN if isinstance(module, mbn))
            module_output = target(*args, device=device, dtype=dtype)
        _adopt(module_output, module)
    for name, child in module.named_children():
        module_output.add_module(name, _to_bn(child))
    del module
    return module_output


def convert_to_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``MomentumBatchNorm*d`` of ``module`` by a plain ``BatchNorm*d``.

    The way back of :func:`convert_to_mbn`, for export (ONNX, TorchScript, inference
    runtimes that know only batch norm): the new layers hold the **inference** statistics.
    ``SyncMomentumBatchNorm`` becomes ``nn.SyncBatchNorm`` with the same ``process_group``.

    Parameters
    ----------
    module : torch.nn.Module
        The model, or a single ``MomentumBatchNorm*d``.

    Returns
    -------
    torch.nn.Module
        ``module`` with its ``MomentumBatchNorm1d/2d/3d`` layers replaced by
        ``BatchNorm1d/2d/3d`` (``SyncMomentumBatchNorm`` by ``SyncBatchNorm``), or the new
        module if ``module`` was one.

    Notes
    -----
    Carried over: ``weight``/``bias`` (the same ``Parameter`` objects), ``running_mean``,
    ``running_var``, ``num_batches_tracked`` (the same tensors), ``eps``, ``affine``,
    ``track_running_stats``, the ``training`` flag, device, dtype, ``qconfig`` if any, and
    ``momentum``: the inference decay converted back to PyTorch's update rate
    (``1 - decay``), the cumulative average back to ``momentum=None``. **Dropped**: ``lam``
    and the training statistics ``moving_mean``/``moving_var``. Evaluation outputs are
    unchanged; training outputs change where ``lam > 0`` (plain BN normalizes with the
    batch's statistics).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from mbn_torch import MomentumBatchNorm2d
    >>> net = nn.Sequential(nn.Conv2d(3, 2, 1), MomentumBatchNorm2d(2, momentum=0.2, lam=0.9))
    >>> _ = net(torch.randn(2, 3, 4, 4))
    >>> bn = convert_to_batchnorm(net)[1]
    >>> type(bn).__name__, bn.momentum
    ('BatchNorm2d', 0.2)
    >>> int(bn.num_batches_tracked)
    1
    """
    return _to_bn(module)
