"""Data-parallel training of a small CNN with Momentum Batch Normalization (DDP).

The paper's setting: a tiny batch per device (2 by default). The CNN is written with
``nn.BatchNorm2d`` and converted with :func:`mbn_torch.convert_to_mbn`; a
:class:`mbn_torch.MomentumScheduler` sets the training decay ``lam`` (Eq. 11) and the
inference decay ``tau`` (Eq. 12) of every layer each epoch. Two modes:

- per-device MBN (default, the paper's experiments): statistics and ``m`` per process,
  DDP with ``forward_sync_buffers=False`` (``broadcast_buffers=False`` before PyTorch 2.13),
  and
  :func:`mbn_torch.distributed.merge_inference_statistics` on every rank before each
  evaluation and before the checkpoint;
- ``--sync``: synchronized MBN (``nn.SyncBatchNorm.convert_sync_batchnorm``, then
  ``convert_to_mbn`` gives ``SyncMomentumBatchNorm``): statistics and ``m`` of the global
  batch.

Run it (data: synthetic 8x8 "glyphs" of 10 classes from a fixed seed)::

    python examples/torch_ddp/train.py --nproc 2               # CPU, 2 gloo processes
    python examples/torch_ddp/train.py --nproc 2 --sync
    torchrun --nproc_per_node=4 examples/torch_ddp/train.py --backend nccl   # 4 GPUs

Under ``torchrun`` the script reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` and uses
``cuda:LOCAL_RANK`` with NCCL; otherwise it spawns ``--nproc`` processes itself on
127.0.0.1. Rank 0 prints one line per epoch and saves the checkpoint (``--checkpoint``), a
``state_dict`` that ``torch.load(..., weights_only=True)`` reads.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mbn_torch
from mbn_torch.distributed import merge_inference_statistics

CLASSES = 10
SIZE = 8


def make_data(num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` noisy 8x8 images of 10 fixed random glyphs, with per-image contrast/offset.

    The glyphs come from seed 0 (the same for every split); ``seed`` draws the samples.
    """
    glyphs = torch.randn(CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (num,), generator=gen)
    contrast = torch.empty(num, 1, 1, 1).uniform_(0.5, 2.0, generator=gen)
    offset = torch.empty(num, 1, 1, 1).uniform_(-1.0, 1.0, generator=gen)
    noise = torch.randn(num, 1, SIZE, SIZE, generator=gen)
    return contrast * glyphs[labels] + offset + noise, labels


def make_model() -> nn.Module:
    """A small CNN with ``nn.BatchNorm2d``, as a model is usually written."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, CLASSES),
    )


def to_mbn(model: nn.Module, *, sync: bool) -> nn.Module:
    """MBN layers: synchronized over the process group, or per device."""
    if sync:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return mbn_torch.convert_to_mbn(model)


def evaluate(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], rank: int, world: int, device: Any
) -> tuple[float, float]:
    """Loss and accuracy on the test set, split over the ranks and summed."""
    x, y = data[0][rank::world].to(device), data[1][rank::world].to(device)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        totals = torch.tensor(
            [
                nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                (logits.argmax(1) == y).sum().item(),
                len(y),
            ],
            dtype=torch.float64,
            device=device,
        )
    model.train()
    dist.all_reduce(totals)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def train(rank: int, world: int, local_rank: int, args: argparse.Namespace) -> list[str]:
    """One process's training run (an initialized process group); rank 0's printed lines."""
    device = torch.device(f"cuda:{local_rank}" if args.backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = to_mbn(make_model(), sync=args.sync).to(device)
    ddp = DistributedDataParallel(
        model,
        device_ids=[local_rank] if device.type == "cuda" else None,
        # per-device statistics must not be overwritten by rank 0's before every forward;
        # synchronized ones are equal on all ranks, so the copy would only cost time
        # (PyTorch < 2.13: broadcast_buffers=False)
        forward_sync_buffers=False,
    )
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    x_train, y_train = make_data(args.train_samples, seed=1)
    test = make_data(args.test_samples, seed=2)
    # Eq. 11/12 with m = the batch the statistics come from: per device, or global (sync)
    m = args.batch_size * (world if args.sync else 1)
    decays = mbn_torch.MomentumScheduler(model, batch_size=m, total_epochs=args.epochs)
    lines = []
    for epoch in range(1, args.epochs + 1):
        lam = decays.get_last_lam()
        order = torch.randperm(args.train_samples, generator=torch.Generator().manual_seed(epoch))
        mine = order[rank::world]  # this rank's samples of the epoch
        steps = len(mine) // args.batch_size
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for step in range(steps):
            idx = mine[step * args.batch_size : (step + 1) * args.batch_size]
            logits = ddp(x_train[idx].to(device))
            loss = nn.functional.cross_entropy(logits, y_train[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        dist.all_reduce(loss_sum)
        train_loss = float(loss_sum) / max(steps * world, 1)
        if not args.sync:
            # per-device statistics -> one consistent set, weighted by the batch size
            merge_inference_statistics(model, weight=args.batch_size)
        test_loss, accuracy = evaluate(model, test, rank, world, device)
        line = (
            f"epoch {epoch}/{args.epochs}  lam {lam or 0.0:.4f}  train loss {train_loss:.4f}  "
            f"test loss {test_loss:.4f}  accuracy {accuracy:.4f}"
        )
        if rank == 0:
            print(line, flush=True)
        lines.append(line)
        decays.step()  # the next epoch's lam and tau
    if rank == 0 and args.checkpoint:
        torch.save(model.state_dict(), args.checkpoint)
        print(f"checkpoint: {args.checkpoint}", flush=True)
    dist.barrier()
    return lines


def _process(
    rank: int, world: int, local_rank: int, args: argparse.Namespace, store_port: int | None
) -> None:
    """Join the process group (the spawning parent's store, or torchrun's), then train."""
    timeout = datetime.timedelta(seconds=args.timeout)
    store = None
    if store_port is not None:
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timeout)
    dist.init_process_group(
        args.backend,
        init_method=None if store is not None else "env://",
        store=store,
        rank=rank,
        world_size=world,
        timeout=timeout,
    )
    try:
        if args.backend == "gloo":
            torch.set_num_threads(1)  # one core per process on a CPU machine
        train(rank, world, local_rank, args)
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, args: argparse.Namespace, store_port: int) -> None:
    _process(rank, args.nproc, rank, args, store_port)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn (not torchrun)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--sync", action="store_true", help="synchronized instead of per-device MBN")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2, help="per process")
    p.add_argument("--train-samples", type=int, default=1024)
    p.add_argument("--test-samples", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default="mbn_ddp_checkpoint.pt", help="'' for none")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per collective")
    args = p.parse_args(argv)
    if args.nproc < 1 or args.epochs < 1 or args.batch_size < 1:
        p.error("--nproc, --epochs and --batch-size must be >= 1")
    if not math.isfinite(args.lr) or args.lr <= 0:
        p.error("--lr must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run under torchrun (its environment), or spawn ``--nproc`` local processes."""
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        _process(rank, world, int(os.environ.get("LOCAL_RANK", 0)), args, None)
        return
    # the rendezvous store lives in this process, which outlives every rank (a rank's exit
    # never takes the store from the others), on a free port of 127.0.0.1
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=args.timeout),
    )  # fmt: skip
    torch.multiprocessing.start_processes(
        _spawned, args=(args, store.port), nprocs=args.nproc, start_method="spawn"
    )


if __name__ == "__main__":
    main()
