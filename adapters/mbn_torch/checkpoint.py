"""Checkpoints of a model and its :class:`~mbn_torch.MomentumScheduler`, all or nothing.

``torch.nn.Module.load_state_dict`` copies tensors as it walks the model and reports errors
at the end, so a checkpoint with one wrong shape leaves a model partly loaded. These helpers
keep a copy of what they replace and put it back when anything fails: the model and the
scheduler hold either the whole checkpoint or exactly what they held before. Everything is
saved as tensors and plain types, and read back with ``torch.load(weights_only=True)``.

>>> import io, torch
>>> from torch import nn
>>> import mbn_torch
>>> model = nn.Sequential(nn.Linear(3, 3), mbn_torch.MomentumBatchNorm1d(3))
>>> sched = mbn_torch.MomentumScheduler(model, batch_size=2, total_epochs=10)
>>> buffer = io.BytesIO()
>>> save_checkpoint(buffer, model, sched, epoch=4)
>>> _ = buffer.seek(0)
>>> load_checkpoint(buffer, model, sched)
{'epoch': 4}
"""

from __future__ import annotations

import os
from typing import IO, Any

import torch
from torch import nn

from .scheduler import MomentumScheduler

__all__ = ["load_checkpoint", "save_checkpoint"]

_MODEL, _SCHEDULER, _EXTRA = "model", "momentum_scheduler", "extra"

PathOrFile = str | os.PathLike[str] | IO[bytes]


def save_checkpoint(
    f: PathOrFile, model: nn.Module, scheduler: MomentumScheduler | None = None, **extra: Any
) -> None:
    """Save ``model``'s state dict, the scheduler's beside it, and ``extra`` values.

    Parameters
    ----------
    f : path or binary file
        Where to write (``torch.save``).
    model : nn.Module
        The model (its ``state_dict()``: parameters and buffers, decays included).
    scheduler : MomentumScheduler, optional
        Its ``state_dict()`` is saved beside the model's.
    **extra
        Further values (epoch, metrics...): tensors and plain types, so that
        ``torch.load(weights_only=True)`` reads them.
    """
    torch.save(
        {
            _MODEL: model.state_dict(),
            _SCHEDULER: None if scheduler is None else scheduler.state_dict(),
            _EXTRA: extra,
        },
        f,
    )


def load_checkpoint(
    f: PathOrFile,
    model: nn.Module,
    scheduler: MomentumScheduler | None = None,
    *,
    strict: bool = True,
    map_location: Any = None,
) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` file into ``model`` (and ``scheduler``), all or nothing.

    Parameters
    ----------
    f : path or binary file
        What :func:`save_checkpoint` wrote; read with ``torch.load(weights_only=True)``.
    model : nn.Module
        Receives the model's state dict (``strict`` as in ``load_state_dict``; a
        ``BatchNorm*d`` layer's keys load into an MBN module, see docs/torch.md).
    scheduler : MomentumScheduler, optional
        Receives the scheduler's state; an error if the checkpoint has none.
    strict : bool, optional
        Passed to ``model.load_state_dict``.
    map_location : optional
        Passed to ``torch.load``.

    Returns
    -------
    dict
        The ``extra`` values given to :func:`save_checkpoint`.

    Raises
    ------
    RuntimeError
        A wrong key or shape (PyTorch's message); the model and the scheduler are then
        exactly as before the call.
    ValueError
        Not a checkpoint of :func:`save_checkpoint`, or a scheduler without its state; or the
        scheduler refuses its state (nothing changed either).
    """
    checkpoint = torch.load(f, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or set(checkpoint) != {_MODEL, _SCHEDULER, _EXTRA}:
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"not a checkpoint of mbn_torch.save_checkpoint (expected the keys "
            f"{[_EXTRA, _MODEL, _SCHEDULER]}, got {keys}); a bare state dict loads with "
            "model.load_state_dict"
        )
    if scheduler is not None and checkpoint[_SCHEDULER] is None:
        raise ValueError("the checkpoint holds no scheduler state (saved without a scheduler)")
    model_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scheduler_before = None if scheduler is None else scheduler.state_dict()
    try:
        model.load_state_dict(checkpoint[_MODEL], strict=strict)
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint[_SCHEDULER])
    except BaseException:
        model.load_state_dict(model_before, strict=True)
        if scheduler is not None and scheduler_before is not None:
            scheduler.load_state_dict(scheduler_before)
        raise
    extra: dict[str, Any] = checkpoint[_EXTRA]
    return extra
