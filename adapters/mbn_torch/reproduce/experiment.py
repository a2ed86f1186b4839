"""The experiment: its configuration, the presets, one training run, all runs.

Every run trains one model (:func:`~mbn_torch.reproduce.models.make_model`) with one
normalization at one batch size from one seed, with SGD (momentum 0.9, a learning rate
scaled linearly with the batch size as in the paper: ``lr * m / lr_batch_size``, that is
``0.1 * m / 32`` on the digits and the paper's ``0.1 * m / 64`` on CIFAR-10, divided by 10
at 60% and 90% of training; weight decay 1e-4 on CIFAR-10, none on the digits), the data
set's augmentation (CIFAR-10: random crop and flip), the last incomplete batch of each
epoch dropped, and reports the test accuracy. One loop serves both data sets. The decays
of BN and MBN come from :class:`mbn_torch.MomentumScheduler`, stepped once per epoch: MBN's
training decay ``lam`` follows Eq. 11 (from the batch size and the number of epochs) and the
inference decay ``tau`` of *both* BN and MBN is Eq. 12's, so the two differ only in how they
normalize during training.

>>> cfg = PRESETS["quick"]
>>> cfg.models, cfg.norms, cfg.batch_sizes
(('mlp',), ('bn', 'mbn'), (2, 32))
>>> cifar = CIFAR10_PRESETS["full"]
>>> cifar.models, cifar.batch_sizes, cifar.epochs, cifar.lr, cifar.lr_batch_size
(('resnet18',), (2, 4, 8, 16, 32), 200, 0.1, 64)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..distributed import merge_inference_statistics
from ..modules import _DecayNorm, _MomentumBatchNorm
from ..scheduler import MomentumScheduler
from .data import DATASETS, Dataset
from .models import DATA_MODELS, MODELS, NORMS, make_model

__all__ = [
    "CIFAR10_PRESETS",
    "NORMS",
    "PRESETS",
    "PRESETS_BY_DATA",
    "Config",
    "RunResult",
    "check_data",
    "decay_scheduler",
    "lr_milestones",
    "planned_runs",
    "run_experiment",
    "steps_per_run",
    "train_one",
]

BATCH_SIZES = (2, 4, 8, 16, 32)
"""The batch sizes of the paper's Fig. 4 range that ``--full`` runs."""

EVAL_ELEMENTS = 2**22
"""Input elements per forward pass when evaluating (1365 CIFAR images, every digit)."""

TRAIN_EVAL_LIMIT = 10_000
"""``train_accuracy`` is measured on the first (at most) this many training samples."""


@dataclass(frozen=True)
class Config:
    """What to run: the grid (models x normalizations x batch sizes x seeds) and training.

    Attributes
    ----------
    models, norms : tuple of str
        From the data set's models (:data:`~mbn_torch.reproduce.models.DATA_MODELS`) and
        :data:`NORMS`; ``in`` is skipped for the MLP.
    batch_sizes : tuple of int
        Batch sizes (>= 2: BN needs two values per channel).
    seeds : tuple of int
        One run per seed (initialization and shuffling); the data split is fixed.
    epochs : int
        Epochs per run (``T`` of Eq. 11).
    lr : float
        The learning rate at batch size ``lr_batch_size`` (scaled linearly:
        ``lr * m / lr_batch_size``, ``m`` the total batch of all processes).
    ideal_batch_size, tau0 : float
        ``m0`` and ``tau0`` of Eq. 11/12 (the paper's §5.2: 32 and 0.85).
    preset : str
        The preset it came from (``custom`` when options changed it).
    nproc : int
        Processes per run (the paper's multi-device setting: gloo on the CPU, NCCL and
        one GPU per process on CUDA); the batch sizes
        are per process.
    data : str
        The data set (:data:`~mbn_torch.reproduce.data.DATASETS`).
    lr_batch_size : int
        The batch size at which the learning rate is ``lr`` (32 on the digits, the paper's
        64 on CIFAR-10).
    weight_decay : float
        SGD's weight decay (0 on the digits, the paper's 1e-4 on CIFAR-10).
    train_limit, test_limit : int or None
        Use only the first samples of each split (``None``: all).
    device : str
        The torch device of the runs (``cpu``, ``cuda``, ``cuda:1``); ``nproc > 1`` runs on
        the CPU only.
    """

    models: tuple[str, ...] = ("mlp",)
    norms: tuple[str, ...] = ("none", "bn", "mbn", "gn")
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    seeds: tuple[int, ...] = (0, 1)
    epochs: int = 10
    lr: float = 0.1
    ideal_batch_size: float = 32
    tau0: float = 0.85
    preset: str = "default"
    nproc: int = 1
    data: str = "digits"
    lr_batch_size: int = 32
    weight_decay: float = 0.0
    train_limit: int | None = None
    test_limit: int | None = None
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.data not in DATASETS:
            raise ValueError(f"unknown data set {self.data!r}; expected one of {DATASETS}")
        for name, values, allowed in (
            ("models", self.models, DATA_MODELS[self.data]),
            ("norms", self.norms, NORMS),
        ):
            if not values:
                raise ValueError(f"{name}: at least one is needed")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(
                    f"{name}: unknown {bad[0]!r}"
                    + (f" with {self.data}" if name == "models" else "")
                    + f"; expected some of {', '.join(allowed)}"
                )
        if not self.batch_sizes or min(self.batch_sizes) < 2:
            raise ValueError("batch sizes must be >= 2 (BN needs two values per channel)")
        if not self.seeds:
            raise ValueError("seeds: at least one is needed")
        if self.nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {self.nproc}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_batch_size < 1:
            raise ValueError(f"lr_batch_size must be >= 1, got {self.lr_batch_size}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name, limit in (("train_limit", self.train_limit), ("test_limit", self.test_limit)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be >= 1, got {limit}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"device: not a torch device: {self.device!r}") from None
        if self.nproc > 1 and device.type == "cuda" and device.index is not None:
            raise ValueError(
                f"nproc > 1 on CUDA uses one GPU per process (cuda:0 .. cuda:{self.nproc - 1}, "
                f"NCCL): give --device cuda, not {self.device}"
            )
        if self.nproc > 1 and device.type not in ("cpu", "cuda"):
            raise ValueError(f"nproc > 1 runs on cpu (gloo) or cuda (NCCL), not {self.device}")
        if not self.runs():
            raise ValueError("nothing to run: InstanceNorm ('in') needs the CNN (--models cnn)")

    def runs(self) -> list[tuple[str, str, int, int]]:
        """Every ``(model, norm, batch_size, seed)`` to train, in order."""
        return [
            (model, norm, m, seed)
            for model in self.models
            for norm in self.norms
            if not (norm == "in" and model == "mlp")
            for m in self.batch_sizes
            for seed in self.seeds
        ]

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready values."""
        out = dataclasses.asdict(self)
        out.pop("extra")
        return {**out, **self.extra}


PRESETS: dict[str, Config] = {
    "default": Config(),
    "quick": Config(
        norms=("bn", "mbn"), batch_sizes=(2, 32), seeds=(0, 1), epochs=4, preset="quick"
    ),
    "full": Config(
        models=MODELS,
        norms=NORMS,
        batch_sizes=BATCH_SIZES,
        seeds=(0, 1, 2),
        epochs=10,
        preset="full",
    ),
}
"""The digits' presets: ``default`` (README's command: the MLP, none/BN/MBN/GroupNorm at
batch sizes 2, 4, 8, 16 and 32, two seeds), ``quick`` (for CI: BN and MBN on the MLP at
batch sizes 2 and 32, two seeds, 4 epochs) and ``full`` (both models, every normalization
and batch size, three seeds)."""

_CIFAR10 = Config(
    data="cifar10",
    models=("resnet18",),
    norms=("bn", "mbn", "gn"),
    batch_sizes=(2, 8, 32),
    seeds=(0,),
    epochs=10,
    lr=0.1,
    lr_batch_size=64,
    weight_decay=1e-4,
)

CIFAR10_PRESETS: dict[str, Config] = {
    "default": _CIFAR10,
    "quick": dataclasses.replace(
        _CIFAR10,
        norms=("bn", "mbn"),
        batch_sizes=(2, 32),
        epochs=2,
        train_limit=5000,
        test_limit=1000,
        preset="quick",
    ),
    "full": dataclasses.replace(
        _CIFAR10,
        norms=("none", "bn", "mbn", "gn"),
        batch_sizes=BATCH_SIZES,
        epochs=200,
        preset="full",
    ),
}
"""CIFAR-10's presets (ResNet-18; SGD with the paper's ``0.1 * m / 64``, weight decay 1e-4,
crop and flip): ``full`` is the paper's setting (none/BN/MBN/GroupNorm at batch sizes 2..32,
200 epochs: days on one GPU); ``default`` (BN, MBN, GroupNorm at batch sizes 2, 8 and 32,
one seed, 10 epochs: hours on a GPU, impractical on a CPU); ``quick`` (BN and MBN at batch
sizes 2 and 32, 2 epochs on the first 5000 training and 1000 test images: to try it; about
1.5 hours on 2 shared CPU cores, from measured steps of 0.12 s at m = 2 and 4 s at m = 32)."""

PRESETS_BY_DATA: dict[str, dict[str, Config]] = {"digits": PRESETS, "cifar10": CIFAR10_PRESETS}
"""The presets of each data set."""


@dataclass
class RunResult:
    """What one run reports.

    Attributes
    ----------
    model, norm : str
        The model and normalization.
    batch_size, seed : int
        The batch size and seed.
    test_accuracy, train_accuracy : float
        Fractions in [0, 1], in evaluation mode (inference statistics) after training
        (``train_accuracy`` on the first 10000 training samples at most).
    final_train_loss : float
        The mean training loss of the last epoch (NaN when it diverged).
    steps : int
        Optimizer steps taken.
    seconds : float
        Wall time of the run.
    lam : list of float or None
        MBN's training decay ``lam`` in each epoch (``None`` without MBN).
    inference_decay : float or None
        The inference decay ``tau`` of BN/MBN (``None`` without them).
    nproc : int
        The number of processes (devices); ``batch_size`` is per process.
    batch_statistics : dict or None
        With ``record=True``: channel 0 of the first normalization layer over the last
        epoch (``count`` values per channel per batch, ``mean``/``var`` of each batch, the
        biased variance, and for MBN ``moving_mean``/``moving_var`` after each step).
    """

    model: str
    norm: str
    batch_size: int
    seed: int
    test_accuracy: float
    train_accuracy: float
    final_train_loss: float
    steps: int
    seconds: float
    lam: list[float] | None = None
    inference_decay: float | None = None
    batch_statistics: dict[str, Any] | None = None
    nproc: int = 1

    def record(self) -> dict[str, Any]:
        """The JSON record (without the batch statistics, reported apart)."""
        out = dataclasses.asdict(self)
        out.pop("batch_statistics")
        return out


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    chunk = max(1, EVAL_ELEMENTS // max(x[:1].numel(), 1))
    with torch.no_grad():
        for i in range(0, len(y), chunk):
            out = model(x[i : i + chunk])
            correct += int((out.argmax(dim=1) == y[i : i + chunk]).sum())
    return correct / max(len(y), 1)


class _Recorder:
    """Channel 0 of one normalization layer's input (and MBN's moving statistics) per step."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.active = False
        self.count = 0
        self.values: dict[str, list[float]] = {"mean": [], "var": []}
        if isinstance(module, _MomentumBatchNorm):
            self.values.update(moving_mean=[], moving_var=[])
        self._handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if self.active and module.training:
            x = inputs[0].detach()
            c0 = x[:, 0].reshape(-1).double()
            self.count = c0.numel()
            self.values["mean"].append(float(c0.mean()))
            self.values["var"].append(float(c0.var(unbiased=False)))

    def _post(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.active and module.training and "moving_mean" in self.values:
            self.values["moving_mean"].append(float(module.moving_mean[0]))  # type: ignore[index]
            self.values["moving_var"].append(float(module.moving_var[0]))  # type: ignore[index]

    def result(self) -> dict[str, Any]:
        for h in self._handles:
            h.remove()
        return {"channel": 0, "count": self.count, **self.values}


def lr_milestones(epochs: int) -> tuple[int, int]:
    """The 0-indexed epochs from which the learning rate is divided by 10: 60% and 90%.

    Examples
    --------
    >>> lr_milestones(10), lr_milestones(200)
    ((6, 9), (120, 180))
    """
    return round(0.6 * epochs), round(0.9 * epochs)


def decay_scheduler(
    model: nn.Module,
    *,
    batch_size: int,
    epochs: int,
    ideal_batch_size: float = 32,
    tau0: float = 0.85,
) -> MomentumScheduler | None:
    """The scheduler of BN's and MBN's decays (``None`` when the model has neither).

    The paper's defaults: MBN's ``lam`` from Eq. 11 (``batch_size``, ``epochs``,
    ``ideal_batch_size``) and, for BN and MBN alike, the inference decay ``tau`` of Eq. 12.
    Step it once per epoch.

    Examples
    --------
    >>> from mbn_torch.reproduce.models import make_model
    >>> bn = make_model("mlp", "bn")
    >>> _ = decay_scheduler(bn, batch_size=2, epochs=10)
    >>> round(float(bn[1].inference_decay), 6), round(bn[1].momentum, 6)
    (0.989894, 0.010106)
    >>> decay_scheduler(make_model("mlp", "gn"), batch_size=2, epochs=10) is None
    True
    """
    if not any(isinstance(m, _DecayNorm) for m in model.modules()):
        return None
    return MomentumScheduler(
        model,
        batch_size=batch_size,
        total_epochs=epochs,
        ideal_batch_size=ideal_batch_size,
        tau0=tau0,
    )


def train_one(
    data: Dataset,
    model_name: str,
    norm: str,
    batch_size: int,
    seed: int,
    *,
    epochs: int,
    lr: float = 0.1,
    lr_batch_size: int = 32,
    weight_decay: float = 0.0,
    ideal_batch_size: float = 32,
    tau0: float = 0.85,
    device: str = "cpu",
    record: bool = False,
    on_step: Callable[[], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> RunResult:
    """Train one model and evaluate it on the test set.

    Parameters
    ----------
    data : Dataset
        The data (:func:`~mbn_torch.reproduce.data.load_dataset`); its ``augment`` is
        applied to every training batch.
    model_name, norm : str
        The model and the normalization (:func:`~mbn_torch.reproduce.models.make_model`).
    batch_size, seed : int
        The batch size and the seed of the initialization and the shuffling.
    epochs : int
        Epochs (``T`` of Eq. 11).
    lr : float, optional
        The learning rate at batch size ``lr_batch_size`` (``lr * batch_size /
        lr_batch_size`` is used).
    lr_batch_size : int, optional
        See ``lr``.
    weight_decay : float, optional
        SGD's weight decay.
    ideal_batch_size, tau0 : float, optional
        ``m0`` and ``tau0`` of Eq. 11/12.
    device : str, optional
        The torch device of the model and the data.
    record : bool, optional
        Record channel 0 of the first BN/MBN layer over the last epoch.
    on_step : callable, optional
        Called after every optimizer step (a progress bar).
    rank, world_size : int, optional
        One process of a multi-process run (:mod:`~mbn_torch.reproduce.multiproc`; the
        default process group must be initialized): the paper's multi-device setting.
        ``batch_size`` is per process; the gradients are averaged by
        ``DistributedDataParallel`` (``forward_sync_buffers=False``), MBN and BN keep per-device
        statistics, merged by :func:`mbn_torch.merge_inference_statistics` (weight
        ``batch_size``) before evaluating. The learning rate scales with the total batch
        ``batch_size * world_size``.

    Returns
    -------
    RunResult
        The run's numbers.

    Examples
    --------
    >>> from mbn_torch.reproduce.data import load_digits_split
    >>> r = train_one(load_digits_split(), "mlp", "mbn", 32, 0, epochs=2)
    >>> r.lam, round(r.inference_decay, 4), r.steps
    ([0.0, 0.0], 0.85, 84)
    >>> r.test_accuracy > 0.8
    True
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = make_model(model_name, norm, data.num_classes).to(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    net: nn.Module = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # per-device statistics: rank 0's buffers must not overwrite the others' each step
        net = DistributedDataParallel(model, forward_sync_buffers=False)
    gen = torch.Generator().manual_seed(seed)  # the same order on every rank
    # the augmentation's draws: apart from the order's, and different on every rank
    aug_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    aug_gen = torch.Generator().manual_seed(aug_seed)
    total_batch = batch_size * world_size
    opt = torch.optim.SGD(
        model.parameters(),
        lr=lr * total_batch / lr_batch_size,
        momentum=0.9,
        weight_decay=weight_decay,
    )
    lr_sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=list(lr_milestones(epochs)), gamma=0.1
    )
    decay_modules = [m for m in model.modules() if isinstance(m, _DecayNorm)]
    decays = decay_scheduler(
        model, batch_size=batch_size, epochs=epochs, ideal_batch_size=ideal_batch_size, tau0=tau0
    )
    has_lam = any(isinstance(m, _MomentumBatchNorm) for m in decay_modules)
    recorder = _Recorder(decay_modules[0]) if record and decay_modules else None
    loss_fn = nn.CrossEntropyLoss()
    n = len(y_train)
    lams: list[float] = []
    steps = 0
    loss_sum, loss_count = 0.0, 0
    for epoch in range(epochs):
        if decays is not None and has_lam:
            lams.append(float(decays.get_last_lam()))  # type: ignore[arg-type]
        if recorder is not None:
            recorder.active = epoch == epochs - 1
        model.train()
        order = torch.randperm(n, generator=gen)
        loss_sum, loss_count = 0.0, 0
        for start in range(0, n - total_batch + 1, total_batch):  # the global batches
            i = start + rank * batch_size  # this rank's share: the same count on every rank
            idx = order[i : i + batch_size].to(device)
            loss = loss_fn(net(data.augment(x_train[idx], aug_gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            loss_sum += float(loss.detach())
            loss_count += 1
            if on_step is not None:
                on_step()
        lr_sched.step()
        if decays is not None:
            decays.step()
    if world_size > 1:
        merge_inference_statistics(model, weight=batch_size)
    tau = float(decays.get_last_tau()) if decays is not None else None  # type: ignore[arg-type]
    return RunResult(
        model=model_name,
        norm=norm,
        batch_size=batch_size,
        seed=seed,
        test_accuracy=_accuracy(model, data.x_test.to(device), data.y_test.to(device)),
        train_accuracy=_accuracy(model, x_train[:TRAIN_EVAL_LIMIT], y_train[:TRAIN_EVAL_LIMIT]),
        final_train_loss=loss_sum / max(loss_count, 1),
        steps=steps,
        seconds=time.perf_counter() - start,
        lam=lams if has_lam else None,
        inference_decay=tau,
        batch_statistics=recorder.result() if recorder is not None else None,
        nproc=world_size,
    )


def steps_per_run(config: Config, num_train: int) -> Iterator[int]:
    """The number of optimizer steps of each run of :meth:`Config.runs`, in order."""
    for _, _, m, _ in config.runs():
        yield (num_train // (m * config.nproc)) * config.epochs


def run_experiment(
    config: Config, data: Dataset, *, on_step: Callable[[], None] | None = None
) -> list[RunResult]:
    """Every run of ``config``, in the order of :meth:`Config.runs`.

    The batch statistics (Fig. 1 panel) are recorded for BN and MBN at the smallest batch
    size with the first seed.

    Examples
    --------
    >>> from mbn_torch.reproduce.data import load_digits_split
    >>> cfg = Config(norms=("none",), batch_sizes=(32,), seeds=(0,), epochs=1)
    >>> [r.norm for r in run_experiment(cfg, load_digits_split())]
    ['none']
    """
    check_data(config, data)
    train: Callable[..., RunResult] = train_one
    extra: dict[str, Any] = {"device": config.device}
    if config.nproc > 1:
        from .multiproc import train_spawned

        train, extra = train_spawned, {**extra, "nproc": config.nproc}
    return [
        train(data, *run, **kwargs, **extra, on_step=on_step)
        for run, kwargs in planned_runs(config)
    ]


def check_data(config: Config, data: Dataset) -> None:
    """``ValueError`` unless ``data`` is the data set ``config`` is for."""
    name = getattr(data, "name", config.data)
    if name != config.data:
        raise ValueError(f"the configuration is for {config.data}, the data is {name}")


def planned_runs(config: Config) -> Iterator[tuple[tuple[str, str, int, int], dict[str, Any]]]:
    """Each run's ``(model, norm, batch_size, seed)`` and the training keywords of ``train_one``.

    The same for every framework's ``train_one``: the training settings, and ``record``,
    true for BN and MBN at the smallest batch size with the first seed (the Fig. 1 panel).

    Examples
    --------
    >>> run, kwargs = next(planned_runs(PRESETS["quick"]))
    >>> run, kwargs["record"], kwargs["lr_batch_size"]
    (('mlp', 'bn', 2, 0), True, 32)
    """
    m_min, seed0 = min(config.batch_sizes), config.seeds[0]
    for model, norm, m, seed in config.runs():
        yield (
            (model, norm, m, seed),
            {
                "epochs": config.epochs,
                "lr": config.lr,
                "lr_batch_size": config.lr_batch_size,
                "weight_decay": config.weight_decay,
                "ideal_batch_size": config.ideal_batch_size,
                "tau0": config.tau0,
                "record": norm in ("bn", "mbn") and m == m_min and seed == seed0,
            },
        )
