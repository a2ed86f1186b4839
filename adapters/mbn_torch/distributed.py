"""MBN and BN on ``torch.distributed``: synchronized statistics, and per-device MBN's merge.

Two modes (docs/distributed.md, "PyTorch: torch.distributed"; docs/spec.md §5):

- **Synchronized** (:class:`SyncMomentumBatchNorm`, like ``nn.SyncBatchNorm``): every rank
  normalizes with the statistics of the global batch. The core's ``all_sum`` becomes an
  all-reduce over the process group (:func:`process_group_sum`): two collectives forward
  (``C + 1`` and ``C`` numbers, Chan's two-pass merge), one backward (the two C-vectors).
  Unequal and empty per-rank batches are exact; ``lam = 0`` is synchronized BN.
- **Per-device** (the paper's setting): plain ``MomentumBatchNorm*d`` under DDP with
  ``forward_sync_buffers=False`` (``broadcast_buffers=False`` before PyTorch 2.13); every
  rank calls :func:`merge_inference_statistics` before evaluation and checkpointing, which
  writes the count-weighted merge of all ranks' statistics (the core's
  :func:`mbn_ref.distributed.merge_inference_statistics`) into every rank's buffers.

Without an initialized process group (or with one rank) both are the single-process
modules:

>>> import torch
>>> bn = SyncMomentumBatchNorm(3, lam=0.5)
>>> bn(torch.randn(4, 3, 2, 2, 2)).shape          # any input rank >= 2, channels on dim 1
torch.Size([4, 3, 2, 2, 2])
>>> merge_inference_statistics(torch.nn.Sequential(bn))   # one rank: nothing to merge
1
"""

from __future__ import annotations

import math
import numbers
from typing import Any, cast

import array_api_compat.torch as txp
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol

import mbn_ref as mr
from mbn_ref.distributed import AllSum
from mbn_ref.distributed import merge_inference_statistics as _merge_states

from .modules import _MomentumBatchNorm

__all__ = ["SyncMomentumBatchNorm", "merge_inference_statistics", "process_group_sum"]

# BatchNorm's buffer names: any module holding them has inference statistics to merge
_RUNNING = ("running_mean", "running_var", "num_batches_tracked")
_MOVING = ("moving_mean", "moving_var")


def _group_size(process_group: Any) -> int:
    """The number of ranks of ``process_group`` (default: the world); 1 without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(process_group))


def process_group_sum(process_group: Any = None) -> AllSum:
    """The core's ``all_sum`` over a ``torch.distributed`` process group.

    ``all_sum(t)`` returns the sum of ``t`` over the ranks of ``process_group`` (the default
    group when ``None``), as a new tensor (``t`` is left as it is). In eager mode it is
    ``torch.distributed.all_reduce`` (SUM) on a copy; inside ``torch.compile`` it is the
    traceable functional collective ``torch.distributed._functional_collectives.all_reduce``.

    Every rank of the group must make the same calls in the same order, also a rank whose
    batch is empty: :func:`mbn_ref.mbn_forward` and :func:`mbn_ref.backward` do (the core
    calls it twice forward and once backward per training step, on every rank).

    Parameters
    ----------
    process_group : torch.distributed.ProcessGroup, optional
        The ranks to sum over; ``None`` is the default (world) group.

    Returns
    -------
    callable
        ``all_sum(tensor) -> tensor``, for ``all_sum=`` of :func:`mbn_ref.mbn_forward`,
        :func:`mbn_ref.bn_forward` and :func:`mbn_torch.momentum_batch_norm`.

    Examples
    --------
    Synchronized MBN with the functional form, on any rank (with one process here):

    >>> import torch
    >>> import torch.distributed as dist
    >>> import mbn_ref as mr
    >>> import array_api_compat.torch as xp
    >>> import mbn_torch
    >>> all_sum = process_group_sum() if dist.is_initialized() else None
    >>> state = mr.init_state(2, xp=xp)
    >>> y, state = mbn_torch.momentum_batch_norm(
    ...     torch.randn(4, 2), None, None, state, torch.tensor(0.5), torch.tensor(0.9),
    ...     all_sum=all_sum)
    >>> int(state.num_batches_tracked)
    1
    """
    return _GroupSum(process_group, torch.compiler.is_compiling())


class _GroupSum:
    """:func:`process_group_sum`'s collective.

    Made inside a compiled trace, it asks the core to keep the global count a tensor
    (``keeps_count_on_device``: no host read, no graph break).
    """

    def __init__(self, process_group: Any, keeps_count_on_device: bool) -> None:
        self.process_group = process_group
        self.keeps_count_on_device = keeps_count_on_device

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        group: Any = dist.group.WORLD if self.process_group is None else self.process_group
        if torch.compiler.is_compiling():
            out: torch.Tensor = funcol.all_reduce(t, "sum", group)
            return out
        total = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total


class SyncMomentumBatchNorm(_MomentumBatchNorm):
    """Momentum batch normalization with statistics synchronized over a process group.

    ``nn.SyncBatchNorm``'s counterpart: in training, when ``torch.distributed`` is
    initialized and the process group has more than one rank, every rank normalizes with the
    mean and variance of the **global** batch (all ranks' inputs together), and the moving
    and inference statistics receive that one update on every rank (they stay identical).
    Otherwise (evaluation, no process group, one rank) it is :class:`MomentumBatchNorm2d`
    for inputs of any rank. ``lam = 0`` is synchronized BN.

    Parameters
    ----------
    num_features : int
        The number of channels C (dim 1 of the input).
    eps : float, optional
        Added to the variance inside the square root.
    momentum : float or None, optional
        PyTorch's ``momentum``: the update rate of the inference statistics; ``None`` for
        the cumulative average (held as the buffers ``inference_decay``,
        ``cumulative_average``).
    affine : bool, optional
        Learnable per-channel ``weight`` and ``bias``.
    track_running_stats : bool, optional
        Keep statistics; ``False`` normalizes with the (global, in training) batch's
        statistics, ``lam`` unused.
    process_group : torch.distributed.ProcessGroup, optional
        The ranks whose batches are normalized together; ``None`` is the default group.
    device, dtype : optional
        Where and in which dtype parameters and buffers are created.
    lam : float, optional
        The paper's training decay (weight on history) in ``[0, 1]``, held as the 0-d buffer
        ``lam``; 0 is BN.
    nonfinite : {"propagate", "skip_update", "raise"}, optional
        The core's policy for a batch holding NaN or Inf (docs/spec.md §9); the global
        statistics are non-finite when any rank's batch is, so all ranks decide alike.

    Notes
    -----
    - Input ``(N, C, ...)`` of rank >= 2, channels on dim 1 (``nn.SyncBatchNorm``'s rule).
      Per-rank batches may differ in size and may be **empty** (``N = 0``): the global
      statistics are Chan's count-weighted merge, and an empty rank still takes part in the
      collectives. A per-rank batch of one sample is fine whenever the global batch has more
      than one value per channel.
    - Every rank of the group must call ``forward`` and ``backward`` of each synchronized
      layer in the same order (the SPMD contract of ``nn.SyncBatchNorm`` and DDP): a rank
      that skips a layer leaves the others waiting in the collective. A rank outside
      ``process_group`` normalizes its own batch.
    - Cost per layer and training step: two all-reduces forward (``C + 1`` and ``C``
      numbers), one backward (``2C``), and one read of the global count on the host (none
      when compiled).
    - ``torch.compile`` (``fullgraph=True`` works): inside the trace the global count stays
      a tensor (no host read, no graph break), so there a global batch of one value per
      channel is not refused and an empty global batch changes nothing through selects
      (docs/spec.md §9); the collective is traceable (:func:`process_group_sum`).
    - Half precision (``float16``/``bfloat16`` inputs, ``torch.autocast``): statistics,
      their collectives and the backward's C-vectors are float32.
    - ``weight``/``bias`` gradients are this rank's sums; DDP (or any data-parallel
      engine) reduces them like every parameter gradient.
    - :func:`mbn_torch.convert_to_mbn` turns ``nn.SyncBatchNorm`` layers into this class
      (keeping ``process_group``), :func:`mbn_torch.convert_to_batchnorm` turns it back.

    Examples
    --------
    >>> import torch
    >>> bn = SyncMomentumBatchNorm(4, momentum=None, lam=0.9)
    >>> bn(torch.randn(2, 4)).shape, bn(torch.randn(2, 4, 3)).shape
    (torch.Size([2, 4]), torch.Size([2, 4, 3]))
    >>> bn.process_group is None, bn.momentum, int(bn.num_batches_tracked)
    (True, None, 2)
    """

    # any rank >= 2 (nn.SyncBatchNorm's rule)
    _ndims = range(2, 1 << 30)
    _ndims_text = "at least 2D"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        lam: float = 0.0,
        nonfinite: str = "propagate",
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            lam=lam,
            nonfinite=nonfinite,
        )
        self.process_group = process_group

    def _all_sum(self) -> AllSum | None:
        """A sum over ``process_group`` in training with more than one rank, else ``None``."""
        if not self.training or _group_size(self.process_group) < 2:
            return None
        return process_group_sum(self.process_group)

    def extra_repr(self) -> str:
        """As :class:`MomentumBatchNorm2d`'s, with the process group if one is set."""
        text = super().extra_repr()
        if self.process_group is not None:
            text += f", process_group={self.process_group}"
        return text


def _statistics_modules(model: nn.Module) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
    """The modules with BatchNorm-style inference statistics, and the buffers to merge."""
    found = []
    for name, module in model.named_modules():
        if not all(isinstance(getattr(module, k, None), torch.Tensor) for k in _RUNNING):
            continue
        has_moving = all(isinstance(getattr(module, k, None), torch.Tensor) for k in _MOVING)
        found.append((name, module, (_MOVING if has_moving else ()) + _RUNNING))
    return found


def _weight_value(weight: Any) -> float:
    """``weight`` as a float to send to the other ranks; NaN for what is not a real number.

    Bad weights are reported after the exchange, by every rank alike (see
    :func:`merge_inference_statistics`).
    """
    if isinstance(weight, torch.Tensor):
        if weight.numel() != 1 or weight.is_complex() or weight.dtype == torch.bool:
            return math.nan
        return float(weight)
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        return math.nan
    return float(weight)


def merge_inference_statistics(
    model: nn.Module, *, weight: Any = 1.0, process_group: Any = None
) -> int:
    """Merge per-device statistics across ranks, in place, for evaluation or a checkpoint.

    Per-device MBN (the paper's setting: statistics and batch size per GPU) leaves each rank
    with its own statistics. Every rank calls this function at the same point (before
    evaluating, before rank 0 saves a checkpoint); afterwards every rank holds the same,
    count-weighted merge of all ranks' statistics: means weighted by ``weight``, variances by
    the law of total variance (never an average of variances), ``num_batches_tracked`` the
    maximum, computed by :func:`mbn_ref.distributed.merge_inference_statistics` in float64.

    Parameters
    ----------
    model : torch.nn.Module
        The model (or its DDP wrapper). Every module holding the buffers
        ``running_mean``, ``running_var`` and ``num_batches_tracked`` is merged:
        ``MomentumBatchNorm*d`` (also its training statistics ``moving_mean``/``moving_var``),
        ``DynamicBatchNorm*d``, ``nn.BatchNorm*d``. Synchronized layers hold equal statistics
        on all ranks already; merging them changes at most the last bit.
    weight : float or 0-d tensor, optional
        This rank's weight in the merge, ``>= 0``: the per-device batch size (the paper's
        count), or the number of samples this rank has seen. Equal weights by default. A
        rank with weight 0 contributes nothing.
    process_group : torch.distributed.ProcessGroup, optional
        The ranks to merge over; ``None`` is the default group.

    Returns
    -------
    int
        The number of modules merged (the same on every rank).

    Raises
    ------
    ValueError
        On **every** rank (the check follows the exchange, so no rank is left waiting), with
        every buffer unchanged: a weight that is negative, not finite or not a number on some
        rank, weights summing to 0, or models whose statistics buffers differ between ranks
        in number or size.

    Notes
    -----
    Two collectives (an all-gather of a small header, then of all the statistics at once,
    in float64 on the buffers' device), whatever the number of layers. Without an
    initialized process group, or with one rank, nothing is exchanged or changed. Under DDP,
    per-device statistics need ``forward_sync_buffers=False`` (``broadcast_buffers=False``
    before PyTorch 2.13): DDP's default copies rank 0's buffers to every rank before each
    forward pass, so the other ranks' statistics would never count.

    Examples
    --------
    >>> import torch
    >>> from mbn_torch import MomentumBatchNorm2d
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), MomentumBatchNorm2d(2, lam=0.9))
    >>> _ = model(torch.randn(2, 1, 5, 5))
    >>> before = model[1].running_var.clone()
    >>> merge_inference_statistics(model, weight=2)    # every rank, before model.eval()
    1
    >>> torch.equal(model[1].running_var, before)      # a single process: unchanged
    True
    """
    modules = _statistics_modules(model)
    value = _weight_value(weight)
    world = _group_size(process_group)
    if world < 2:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"weight must be a finite number > 0 on one rank, got {weight!r}")
        return len(modules)
    device = _device(modules)
    buffers = [getattr(m, k) for _, m, names in modules for k in names]
    payload = (
        torch.cat([b.detach().reshape(-1).to(device, torch.float64) for b in buffers])
        if buffers
        else torch.zeros(0, dtype=torch.float64, device=device)
    )
    layout = [float(len(modules)), float(payload.numel())]
    header = torch.tensor([value, *layout], dtype=torch.float64, device=device)
    headers = _all_gather(header, world, process_group).cpu()
    weights = headers[:, 0]
    _check_exchange(weights, headers[:, 1:], modules)
    if not modules:
        return 0  # on every rank (checked): nothing to exchange
    rows = _all_gather(payload, world, process_group)
    _write_merged(modules, rows, weights.to(device))
    return len(modules)


def _device(modules: list[tuple[str, nn.Module, tuple[str, ...]]]) -> torch.device:
    """Where the exchange happens: the first statistics buffer's device (NCCL: a GPU)."""
    for _, module, names in modules:
        buffer: torch.Tensor = getattr(module, names[0])
        return buffer.device
    return torch.device("cpu")


def _all_gather(t: torch.Tensor, world: int, process_group: Any) -> torch.Tensor:
    """``(world, len(t))``: every rank's ``t``, in rank order."""
    out = torch.empty(world * t.numel(), dtype=t.dtype, device=t.device)  # flat for gloo
    # all_gather_single: PyTorch >= 2.13's name of all_gather_into_tensor
    gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
    gather(out, t.contiguous(), group=process_group)
    return out.reshape(world, t.numel())


def _check_exchange(
    weights: torch.Tensor,
    layouts: torch.Tensor,
    modules: list[tuple[str, nn.Module, tuple[str, ...]]],
) -> None:
    """Validate what the ranks sent; every rank sees the same and raises alike."""
    if not bool((layouts == layouts[0]).all()):
        per_rank = ", ".join(
            f"rank {r}: {int(layouts[r, 0])} modules, {int(layouts[r, 1])} values"
            for r in range(layouts.shape[0])
        )
        raise ValueError(
            "merge_inference_statistics: the ranks' models differ in their statistics "
            f"buffers ({per_rank}); every rank must pass the same architecture"
        )
    listed = [float(w) for w in weights]
    if not all(math.isfinite(w) and w >= 0 for w in listed) or sum(listed) <= 0:
        raise ValueError(
            "merge_inference_statistics: weight must be a finite number >= 0 on every rank "
            f"and > 0 on some rank, got {listed} in rank order (nan: not a real number); "
            "nothing was changed"
        )


def _write_merged(
    modules: list[tuple[str, nn.Module, tuple[str, ...]]],
    rows: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """Unpack every rank's statistics, merge them with the core and write them in place."""
    offset = 0
    for _, module, names in modules:
        parts: dict[str, torch.Tensor] = {}
        for k in names:
            n = getattr(module, k).numel()
            parts[k] = rows[:, offset : offset + n]
            offset += n
        # a module without training statistics (BN) is merged as an MBN state whose moving
        # statistics are its running ones; only the running ones are written back
        moving_mean = parts.get("moving_mean", parts["running_mean"])
        moving_var = parts.get("moving_var", parts["running_var"])
        states = [
            mr.MBNState(
                moving_mean[rank],
                moving_var[rank],
                parts["running_mean"][rank],
                parts["running_var"][rank],
                parts["num_batches_tracked"][rank, 0].to(torch.int64),
            )
            for rank in range(rows.shape[0])
        ]
        merged = _merge_states(states, cast(Any, weights), xp=txp)  # counts: float weights
        with torch.no_grad():
            for k in names:
                buffer: torch.Tensor = getattr(module, k)
                buffer.copy_(getattr(merged, k).reshape(buffer.shape))
