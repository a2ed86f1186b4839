"""``--nproc K``: one run over K ``torch.distributed`` processes (gloo on CPU).

The paper trained on 4 GPUs with per-device statistics. Here each of K spawned processes
trains on its share (``batch_size`` samples) of each global batch of ``K * batch_size``;
``DistributedDataParallel`` averages the gradients; BN and MBN normalize with per-device
statistics (the modules' default: no collective) and their inference statistics are merged
across the processes by :func:`mbn_torch.merge_inference_statistics` before evaluating
(:func:`~mbn_torch.reproduce.experiment.train_one` with ``rank``/``world_size``). Process 0
reports the run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .data import Digits, load_digits_split
from .experiment import RunResult, train_one

__all__ = ["train_spawned"]


def _worker(
    rank: int, world_size: int, store: str, out: str, split: dict[str, Any], args: dict[str, Any]
) -> None:
    torch.set_num_threads(1)

    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        # each process loads the (small, deterministic) split itself: no tensor crosses
        # the process boundary
        data = load_digits_split(**split)
        result = train_one(data, **args, rank=rank, world_size=world_size)
        if rank == 0:
            Path(out).write_text(json.dumps(dataclasses.asdict(result)), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def train_spawned(
    data: Digits,
    model_name: str,
    norm: str,
    batch_size: int,
    seed: int,
    *,
    nproc: int,
    on_step: Callable[[], None] | None = None,
    **kwargs: Any,
) -> RunResult:
    """:func:`~mbn_torch.reproduce.experiment.train_one` over ``nproc`` gloo processes.

    ``batch_size`` is per process; every process loads the split of ``data`` itself
    (:func:`~mbn_torch.reproduce.data.load_digits_split` with its ``split_seed`` and test
    fraction). ``on_step`` is called once per optimizer step when the
    run has finished (the processes report no progress). The other keyword arguments are
    :func:`~mbn_torch.reproduce.experiment.train_one`'s.

    Raises
    ------
    RuntimeError
        A process failed (its error is in the message).
    """
    split = {"test_size": len(data.y_test) / (len(data.y_test) + len(data.y_train))}
    split["split_seed"] = data.split_seed
    args = {
        "model_name": model_name,
        "norm": norm,
        "batch_size": batch_size,
        "seed": seed,
        **kwargs,
    }
    with tempfile.TemporaryDirectory(prefix="mbn-reproduce-") as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(nproc, store, out, split, args), nprocs=nproc, join=True)  # type: ignore[attr-defined,no-untyped-call]
        result = RunResult(**json.loads(Path(out).read_text(encoding="utf-8")))
    if on_step is not None:
        for _ in range(result.steps):
            on_step()
    return result
