"""The digits experiment on Keras (TensorFlow backend): one training run, all runs.

The torch experiment (:mod:`mbn_torch.reproduce.experiment`) with the Keras adapter: the
same :class:`~mbn_torch.reproduce.experiment.Config`, data (the digits), models
(:func:`~mbn_tf.reproduce.models.make_model`), training (SGD with momentum 0.9, learning
rate ``lr * m / lr_batch_size``, i.e. ``0.1 * m / 32``, divided by 10 at 60% and 90% of the
epochs, weight decay as PyTorch's (added to the gradient), the last incomplete batch of
each epoch dropped, cross-entropy) and the same
:class:`~mbn_torch.reproduce.experiment.RunResult` records, so the torch side's table,
figure and JSON report take them unchanged. The decays of BN and MBN come from the callback
:class:`mbn_tf.MomentumScheduler` with the paper's defaults (``lam`` from Eq. 11 for MBN,
the inference decay ``tau`` of Eq. 12 for BN and MBN alike), applied at the start of each
epoch through its Keras hooks.

The training runs in a compiled ``tf.function`` that takes a chunk of up to
:data:`CHUNK` optimizer steps (a ``tf.range`` loop over ``(steps, m)`` sample indices):
traced once per run, it reads the decays and the learning rate from their variables, so
the scheduler moves them without retracing.

>>> from mbn_torch.reproduce import Config
>>> from mbn_torch.reproduce.data import load_digits_split
>>> cfg = Config(norms=("none",), batch_sizes=(32,), seeds=(0,), epochs=1)
>>> [(r.norm, r.steps) for r in run_experiment(cfg, load_digits_split())]
[('none', 42)]
"""

from __future__ import annotations

import bisect
import functools
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from mbn_torch.reproduce.data import Dataset
from mbn_torch.reproduce.experiment import (
    TRAIN_EVAL_LIMIT,
    Config,
    RunResult,
    check_data,
    lr_milestones,
    planned_runs,
)

from ..callbacks import MomentumScheduler
from ..layers import DynamicBatchNormalization, MomentumBatchNormalization
from .models import make_model

__all__ = [
    "CHUNK",
    "Trainer",
    "decay_scheduler",
    "learning_rate",
    "require_tensorflow_backend",
    "run_experiment",
    "train_one",
]

CHUNK = 64
"""Optimizer steps per call of the compiled function (``on_step`` runs after each call)."""

_DecayLayers = (DynamicBatchNormalization, MomentumBatchNormalization)


def require_tensorflow_backend() -> None:
    """Raise ``RuntimeError`` unless Keras runs on TensorFlow (the compiled step is ``tf``).

    Examples
    --------
    >>> require_tensorflow_backend()  # KERAS_BACKEND=tensorflow (Keras' default)
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"the Keras experiment needs Keras' TensorFlow backend, but Keras runs on "
            f"{backend!r}: set KERAS_BACKEND=tensorflow before Keras is imported"
        )


def learning_rate(epoch: int, *, epochs: int, base: float) -> float:
    """The learning rate of 0-indexed ``epoch``: ``base``, divided by 10 at 60% and 90%.

    The milestones are :func:`mbn_torch.reproduce.experiment.lr_milestones` (the torch
    experiment's ``MultiStepLR``, stepped once per epoch).

    Examples
    --------
    >>> [round(learning_rate(e, epochs=10, base=1.0), 6) for e in (0, 5, 6, 8, 9)]
    [1.0, 1.0, 0.1, 0.1, 0.01]
    """
    return base * 0.1 ** bisect.bisect_right(sorted(lr_milestones(epochs)), epoch)


def decay_scheduler(
    model: keras.Model,
    *,
    batch_size: int,
    epochs: int,
    ideal_batch_size: float = 32,
    tau0: float = 0.85,
) -> MomentumScheduler | None:
    """The callback of BN's and MBN's decays, attached to ``model`` (``None`` without them).

    The paper's defaults: MBN's ``lam`` from Eq. 11 (``batch_size``, ``epochs``,
    ``ideal_batch_size``) and, for BN and MBN alike, the inference decay ``tau`` of Eq. 12.
    Call its ``on_epoch_begin(epoch)`` and ``on_epoch_end(epoch)`` around each epoch.

    Examples
    --------
    >>> bn = make_model("mlp", "bn")
    >>> sched = decay_scheduler(bn, batch_size=2, epochs=10)
    >>> sched.on_epoch_begin(0)
    >>> round(bn.layers[1].momentum, 6)
    0.989894
    >>> decay_scheduler(make_model("mlp", "gn"), batch_size=2, epochs=10) is None
    True
    """
    if not any(isinstance(layer, _DecayLayers) for layer in model.layers):
        return None
    sched = MomentumScheduler(
        batch_size=batch_size,
        total_epochs=epochs,
        ideal_batch_size=ideal_batch_size,
        tau0=tau0,
    )
    sched.set_model(model)
    sched.on_train_begin()
    return sched


class Trainer:
    """The compiled training of one model: SGD steps in chunks, with the probe's statistics.

    Parameters
    ----------
    model : keras.Sequential
        The model (built), returning logits.
    x, y : numpy.ndarray
        The training features ``(n, 64)`` (float32) and labels ``(n,)``.
    batch_size : int
        The batch size ``m`` (static in the traced function).
    lr : float
        The initial learning rate (:meth:`set_learning_rate` changes it between calls).
    weight_decay : float, optional
        PyTorch's SGD weight decay: ``weight_decay * w`` added to every gradient.

    Attributes
    ----------
    probe : keras.layers.Layer or None
        The first BN/MBN layer: channel 0 of its input is measured at every step.
    count : int
        The number of values of that channel per batch (``m``, or ``m * H * W``), known
        once the function is traced.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(8, 64)).astype("float32")
    >>> t = Trainer(make_model("mlp", "mbn"), x, np.arange(8) % 10, batch_size=2, lr=0.1)
    >>> out = t.run(np.arange(8).reshape(4, 2))
    >>> sorted(out), out["loss"].shape, t.traces
    (['loss', 'mean', 'moving_mean', 'moving_var', 'var'], (4,), 1)
    """

    def __init__(
        self,
        model: keras.Sequential,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int,
        lr: float,
        weight_decay: float = 0.0,
    ) -> None:
        import tensorflow as tf

        self.model = model
        self.probe = next((la for la in model.layers if isinstance(la, _DecayLayers)), None)
        self._moving = isinstance(self.probe, MomentumBatchNormalization)
        self.count = 0
        self._weight_decay = float(weight_decay)
        self._x = tf.constant(x, tf.float32)
        self._y = tf.constant(y, tf.int32)
        self._loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.optimizer = keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
        self._variables = model.trainable_variables
        self.optimizer.build(self._variables)
        # a partial, not the bound method: TensorFlow counts traces per function code, and
        # one trace per run (a new model each) would read as "frequent retracing" to it
        self._run = tf.function(
            functools.partial(Trainer._chunk, self),
            input_signature=[tf.TensorSpec([None, batch_size], tf.int32)],
        )

    @property
    def names(self) -> tuple[str, ...]:
        """The keys of :meth:`run`'s result."""
        names: tuple[str, ...] = ("loss",)
        if self.probe is not None:
            names += ("mean", "var")
        if self._moving:
            names += ("moving_mean", "moving_var")
        return names

    @property
    def traces(self) -> int:
        """How many times the compiled function has been traced (1 once it has run)."""
        return int(self._run.experimental_get_tracing_count())

    def set_learning_rate(self, lr: float) -> None:
        """Assign the optimizer's learning rate (a variable: no retracing)."""
        self.optimizer.learning_rate.assign(lr)

    def run(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Train on ``indices`` (``(steps, m)`` sample indices), one optimizer step per row.

        Returns each step's loss and, with a BN/MBN layer, channel 0 of the probe's input:
        ``mean`` and biased ``var`` of the batch, for MBN ``moving_mean``/``moving_var``
        (its training statistics after the step), as float64 arrays of length ``steps``.
        """
        out = self._run(np.asarray(indices, dtype=np.int32)).numpy()
        return {name: out[:, i] for i, name in enumerate(self.names)}

    def _step(self, idx: Any) -> Any:
        import tensorflow as tf

        xb, yb = tf.gather(self._x, idx), tf.gather(self._y, idx)
        probe_in = None
        with tf.GradientTape() as tape:
            h = xb
            for layer in self.model.layers:
                if layer is self.probe:
                    probe_in = h
                h = layer(h, training=True)
            loss = self._loss(yb, h)
        gradients = tape.gradient(loss, self._variables)
        if self._weight_decay:
            pairs = zip(gradients, self._variables, strict=True)
            gradients = [g + self._weight_decay * v for g, v in pairs]
        self.optimizer.apply(gradients, self._variables)
        row = [tf.cast(loss, tf.float64)]
        if probe_in is not None:
            c0 = tf.reshape(tf.cast(probe_in[..., 0], tf.float64), [-1])
            self.count = int(c0.shape[0])  # static: m and the image size are fixed
            mean = tf.reduce_mean(c0)
            row += [mean, tf.reduce_mean(tf.square(c0 - mean))]
        if self._moving:
            assert self.probe is not None
            row += [
                tf.cast(self.probe.moving_train_mean[0], tf.float64),
                tf.cast(self.probe.moving_train_variance[0], tf.float64),
            ]
        return tf.stack(row)

    def _chunk(self, indices: Any) -> Any:
        import tensorflow as tf

        steps = tf.shape(indices)[0]
        rows = tf.TensorArray(tf.float64, size=steps, element_shape=[len(self.names)])
        for i in tf.range(steps):
            rows = rows.write(i, self._step(indices[i]))
        return rows.stack()


def _accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    logits = np.asarray(model(x, training=False))
    return float(np.mean(logits.argmax(axis=1) == y))


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
    record: bool = False,
    on_step: Callable[[], None] | None = None,
) -> RunResult:
    """Train one Keras model and evaluate it on the test set.

    Parameters
    ----------
    data : Dataset
        The digits (:func:`mbn_torch.reproduce.data.load_dataset`; no augmentation).
    model_name, norm : str
        The model and the normalization (:func:`~mbn_tf.reproduce.models.make_model`).
    batch_size, seed : int
        The batch size and the seed (``keras.utils.set_random_seed``: the initialization;
        a NumPy generator: the shuffling).
    epochs : int
        Epochs (``T`` of Eq. 11).
    lr : float, optional
        The learning rate at batch size ``lr_batch_size`` (``lr * batch_size /
        lr_batch_size`` is used).
    lr_batch_size : int, optional
        See ``lr``.
    weight_decay : float, optional
        SGD's weight decay (PyTorch's: added to the gradient).
    ideal_batch_size, tau0 : float, optional
        ``m0`` and ``tau0`` of Eq. 11/12.
    record : bool, optional
        Record channel 0 of the first BN/MBN layer's input (and MBN's training statistics)
        over the last epoch.
    on_step : callable, optional
        Called once per optimizer step (after each compiled chunk of :data:`CHUNK` steps).

    Returns
    -------
    RunResult
        The run's numbers (``nproc`` 1).

    Raises
    ------
    RuntimeError
        Keras does not run on TensorFlow.

    Examples
    --------
    >>> from mbn_torch.reproduce.data import load_digits_split
    >>> r = train_one(load_digits_split(), "mlp", "mbn", 32, 0, epochs=2)
    >>> r.lam, round(r.inference_decay, 4), r.steps
    ([0.0, 0.0], 0.85, 84)
    >>> r.test_accuracy > 0.8
    True
    """
    require_tensorflow_backend()
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    model = make_model(model_name, norm, data.num_classes)
    x, y = data.x_train.numpy(), data.y_train.numpy()
    base_lr = lr * batch_size / lr_batch_size
    trainer = Trainer(model, x, y, batch_size=batch_size, lr=base_lr, weight_decay=weight_decay)
    decays = decay_scheduler(
        model, batch_size=batch_size, epochs=epochs, ideal_batch_size=ideal_batch_size, tau0=tau0
    )
    has_lam = any(isinstance(layer, MomentumBatchNormalization) for layer in model.layers)
    record = record and trainer.probe is not None
    rng = np.random.default_rng(seed)
    per_epoch = len(y) // batch_size
    lams: list[float] = []
    last: dict[str, list[float]] = {}
    for epoch in range(epochs):
        if decays is not None:
            decays.on_epoch_begin(epoch)
            if has_lam:
                lams.append(float(decays.get_last()["lam"]))  # type: ignore[arg-type]
        trainer.set_learning_rate(learning_rate(epoch, epochs=epochs, base=base_lr))
        order = rng.permutation(len(y))[: per_epoch * batch_size].reshape(per_epoch, batch_size)
        last = {name: [] for name in trainer.names}
        for first in range(0, per_epoch, CHUNK):
            out = trainer.run(order[first : first + CHUNK])
            for name, values in out.items():
                last[name].extend(values.tolist())
            if on_step is not None:
                for _ in range(len(out["loss"])):
                    on_step()
        if decays is not None:
            decays.on_epoch_end(epoch)
    statistics = None
    if record:
        statistics = {
            "channel": 0,
            "count": trainer.count,
            **{name: values for name, values in last.items() if name != "loss"},
        }
    tau = decays.get_last()["momentum"] if decays is not None else None
    losses = last.get("loss", [])
    return RunResult(
        model=model_name,
        norm=norm,
        batch_size=batch_size,
        seed=seed,
        test_accuracy=_accuracy(model, data.x_test.numpy(), data.y_test.numpy()),
        train_accuracy=_accuracy(model, x[:TRAIN_EVAL_LIMIT], y[:TRAIN_EVAL_LIMIT]),
        final_train_loss=float(np.mean(losses)) if losses else float("nan"),
        steps=per_epoch * epochs,
        seconds=time.perf_counter() - start,
        lam=lams if has_lam else None,
        inference_decay=tau,
        batch_statistics=statistics,
        nproc=1,
    )


def run_experiment(
    config: Config, data: Dataset, on_step: Callable[[], None] | None = None
) -> list[RunResult]:
    """Every run of ``config`` on Keras, in the order of :meth:`Config.runs`.

    As :func:`mbn_torch.reproduce.experiment.run_experiment`: the batch statistics (the
    Fig. 1 panel) are recorded for BN and MBN at the smallest batch size with the first
    seed.

    Parameters
    ----------
    config : Config
        What to run: the digits (``data="digits"``), ``nproc`` 1, ``device`` ``cpu`` (Keras
        places the computation itself).
    data : Dataset
        The digits (:func:`mbn_torch.reproduce.data.load_dataset`).
    on_step : callable, optional
        Called once per optimizer step (the progress bar).

    Returns
    -------
    list of RunResult
        One per run.

    Raises
    ------
    ValueError
        Another data set than the digits, ``nproc > 1`` (the multi-process setting is
        torch's), a device other than ``cpu``, or data that are not the configuration's.
    RuntimeError
        Keras does not run on TensorFlow.
    """
    if config.data != "digits":
        raise ValueError(
            f"data={config.data!r}: the Keras experiment runs the digits only "
            "(CIFAR-10 needs --framework torch)"
        )
    if config.nproc != 1:
        raise ValueError(
            f"nproc={config.nproc}: the Keras experiment runs in one process "
            "(--nproc is implemented for --framework torch only)"
        )
    if config.device != "cpu":
        raise ValueError(
            f"device={config.device!r}: the Keras experiment takes no device (Keras places "
            "the computation itself); --device is for --framework torch"
        )
    check_data(config, data)
    require_tensorflow_backend()
    runs = planned_runs(config)
    return [train_one(data, *run, **kwargs, on_step=on_step) for run, kwargs in runs]
