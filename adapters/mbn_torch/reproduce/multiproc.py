"""``--nproc K``: one run over K ``torch.distributed`` processes (gloo on CPU, NCCL on GPUs).

The paper trained on 4 GPUs with per-device statistics. Here each of K spawned processes
trains on its share (``batch_size`` samples) of each global batch of ``K * batch_size``;
``DistributedDataParallel`` averages the gradients; BN and MBN normalize with per-device
statistics (the modules' default: no collective) and their inference statistics are merged
across the processes by :func:`mbn_torch.merge_inference_statistics` before evaluating
(:func:`~mbn_torch.reproduce.experiment.train_one` with ``rank``/``world_size``). Each
process loads the data itself (:func:`~mbn_torch.reproduce.data.load_dataset` with the
data's :meth:`~mbn_torch.reproduce.data.Dataset.source`: the digits' split, or CIFAR-10's
files again); process 0 reports the run. On CUDA (``device="cuda"``) process ``r`` trains on
``cuda:r`` over NCCL (:func:`process_placement`). A process that fails ends the run with a
:class:`WorkerError` whose message is one line: which process, and its error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .data import Dataset, load_dataset
from .experiment import RunResult, train_one

__all__ = ["WorkerError", "process_placement", "train_spawned"]


class WorkerError(RuntimeError):
    """A process of a ``--nproc`` run failed; the message says which and why, on one line."""


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def process_placement(device: str, rank: int) -> tuple[str, str]:
    """The ``torch.distributed`` backend and the device of process ``rank``.

    Examples
    --------
    >>> process_placement("cpu", 1), process_placement("cuda", 1)
    (('gloo', 'cpu'), ('nccl', 'cuda:1'))
    """
    if torch.device(device).type == "cuda":
        return "nccl", f"cuda:{rank}"
    return "gloo", device


def _worker(
    rank: int,
    world_size: int,
    tmp: str,
    threads: int,
    source: dict[str, Any],
    args: dict[str, Any],
) -> None:
    torch.set_num_threads(threads)
    backend, device = process_placement(args.get("device", "cpu"), rank)
    args = {**args, "device": device}
    try:
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend,
            init_method=f"file://{os.path.join(tmp, 'store')}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=120),
        )
        try:
            data = load_dataset(**source)  # no tensor crosses the process boundary
            result = train_one(data, **args, rank=rank, world_size=world_size)
            if rank == 0:
                text = json.dumps(dataclasses.asdict(result))
                Path(tmp, "result.json").write_text(text, encoding="utf-8")
        finally:
            dist.destroy_process_group()
    except Exception as exc:
        Path(tmp, f"error-{rank}.txt").write_text(_one_line(exc), encoding="utf-8")
        raise


@contextlib.contextmanager
def _quiet_spawn_log() -> Iterator[None]:
    """Silence torch's "Terminating process ..." warnings: the failure is reported once."""
    log = logging.getLogger("torch.multiprocessing.spawn")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def train_spawned(
    data: Dataset,
    model_name: str,
    norm: str,
    batch_size: int,
    seed: int,
    *,
    nproc: int,
    on_step: Callable[[], None] | None = None,
    **kwargs: Any,
) -> RunResult:
    """:func:`~mbn_torch.reproduce.experiment.train_one` over ``nproc`` processes.

    ``batch_size`` is per process; every process loads ``data`` again from its
    :meth:`~mbn_torch.reproduce.data.Dataset.source`. ``on_step`` is called once per
    optimizer step when the run has finished (the processes report no progress). The other
    keyword arguments are :func:`~mbn_torch.reproduce.experiment.train_one`'s. Each process
    uses ``torch.get_num_threads() // nproc`` threads (at least 1).

    Raises
    ------
    WorkerError
        A process failed: ``process R of K failed: ErrorType: message`` (the first process
        to fail; the others are stopped).
    """
    args = {
        "model_name": model_name,
        "norm": norm,
        "batch_size": batch_size,
        "seed": seed,
        **kwargs,
    }
    threads = max(1, torch.get_num_threads() // nproc)
    with tempfile.TemporaryDirectory(prefix="mbn-reproduce-") as tmp:
        try:
            with _quiet_spawn_log():
                mp.spawn(  # type: ignore[attr-defined,no-untyped-call]
                    _worker,
                    args=(nproc, tmp, threads, data.source(), args),
                    nprocs=nproc,
                    join=True,
                )
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:  # type: ignore[attr-defined]
            rank = exc.error_index
            error = Path(tmp, f"error-{rank}.txt")
            reason = error.read_text(encoding="utf-8") if error.exists() else str(exc).strip()
            raise WorkerError(f"process {rank} of {nproc} failed: {reason}") from None
        result = RunResult(**json.loads(Path(tmp, "result.json").read_text(encoding="utf-8")))
    if on_step is not None:
        for _ in range(result.steps):
            on_step()
    return result
