"""The adapter protocol (version 2): what an implementation under test provides.

The suite speaks one canonical convention and the adapter translates to its framework's:

- every momentum value is a **decay** (weight on history): :attr:`Step.decay` for BN,
  :attr:`Step.lam` and :attr:`Step.tau` for MBN; ``None`` is the cumulative average. A
  PyTorch-style adapter passes ``momentum = 1 - decay`` (:meth:`Step.update_rate`).
- a state is reported by :meth:`Adapter.state_to_numpy` under canonical keys:
  ``running_mean``, ``running_var`` (BN and MBN), ``moving_mean``, ``moving_var`` (MBN's
  training statistics) and ``num_batches_tracked`` (when the implementation has a counter).
  ``running_var`` holds the estimator the adapter declares in
  :attr:`Capabilities.running_var`: the suite translates its expectations to it.
- arrays cross the boundary as NumPy arrays through :meth:`Adapter.from_numpy` and
  :meth:`Adapter.to_numpy`.

An adapter describes a layer, so it is told the layer's geometry before the first step
(:class:`Setup`), and each step comes as one frozen :class:`Step`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

PROTOCOL_VERSION = 2
"""The version of this protocol (the report records it; version 1 passed keywords)."""

Kind = Literal["bn", "mbn"]
"""What a state and a step belong to: batch normalization or momentum batch normalization."""

ALGORITHMS: tuple[str, ...] = ("bn", "dynamic_bn", "cumulative", "mbn", "sync")
"""``bn``: BN with a fixed decay; ``dynamic_bn``: the decay changes between steps;
``cumulative``: ``decay=None``; ``mbn``: momentum BN (Algorithm 1); ``sync``: synchronized
statistics over shards (needs :class:`SyncAdapter` or :class:`FusedSyncAdapter`)."""

DTYPES: tuple[str, ...] = ("float16", "float32", "float64")
LAYOUTS: tuple[str, ...] = ("NC", "NCL", "NCHW", "NCDHW", "NHWC")
ESTIMATORS: tuple[str, ...] = ("biased", "unbiased")
REFUSALS: tuple[str, ...] = ("one_value_per_channel", "decay_out_of_range", "eps_not_positive")
"""Bad inputs an implementation may declare it refuses with an exception (docs/spec.md §9):
a BN training batch of one value per channel, a decay outside ``[0, 1]``, ``eps <= 0``."""


@dataclass(frozen=True)
class Capabilities:
    """What an implementation supports and how it keeps its numbers.

    Cases outside the declaration are skipped, each with its reason in the report. Every
    declaration is a convention the suite translates where it can rather than a reason to
    skip.

    Attributes
    ----------
    dtypes, layouts, algorithms : frozenset of str
        What the implementation runs (subsets of :data:`DTYPES`, :data:`LAYOUTS`,
        :data:`ALGORITHMS`).
    running_var : str
        The estimator the implementation stores in ``running_var``: ``"biased"`` (the
        paper, Keras, Flax, ONNX) or ``"unbiased"`` (PyTorch). Every case carries its
        expectations under both.
    native_momentum : str
        The framework's own momentum convention (``"decay"`` or ``"update_rate"``), for the
        report; the adapter translates from decays.
    backward : bool
        The implementation gives gradients.
    affine_optional : bool
        It runs without ``gamma``/``beta``.
    batch_counter : bool
        It keeps ``num_batches_tracked``. Without one the counter is not compared (and
        cumulative averages, which need one, are skipped).
    hyperparameter_dtype : str
        ``"float32"`` when decays and ``eps`` are held in 32 bits (ONNX's attributes): the
        expectations are then computed with them rounded to float32.
    cumulative_tau : bool
        MBN's inference statistics support ``tau=None`` (the cumulative average).
    refuses : frozenset of str
        Bad inputs (:data:`REFUSALS`) the implementation refuses with an exception; each is
        checked.
    version : str or None
        The implementation's own version, for the report.
    known_failures : mapping of str to str
        Check-id glob patterns (``fnmatch``) and the reason they fail: reported as expected
        failures, like scikit-learn's ``expected_failed_checks``.
    """

    dtypes: frozenset[str] = frozenset(DTYPES)
    layouts: frozenset[str] = frozenset(LAYOUTS)
    algorithms: frozenset[str] = frozenset(ALGORITHMS)
    running_var: str = "biased"
    native_momentum: Literal["decay", "update_rate"] = "decay"
    backward: bool = True
    affine_optional: bool = True
    batch_counter: bool = True
    hyperparameter_dtype: Literal["float64", "float32"] = "float64"
    cumulative_tau: bool = True
    refuses: frozenset[str] = frozenset()
    version: str | None = None
    known_failures: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values, allowed in (
            ("dtypes", self.dtypes, DTYPES),
            ("layouts", self.layouts, LAYOUTS),
            ("algorithms", self.algorithms, ALGORITHMS),
            ("running_var", {self.running_var}, ESTIMATORS),
            ("refuses", self.refuses, REFUSALS),
        ):
            unknown = set(values) - set(allowed)
            if unknown:
                raise ValueError(f"unknown {name} {sorted(unknown)}; allowed: {allowed}")
        if self.hyperparameter_dtype not in ("float64", "float32"):
            raise ValueError(
                f"hyperparameter_dtype must be 'float64' or 'float32', "
                f"got {self.hyperparameter_dtype!r}"
            )


@dataclass(frozen=True)
class Setup:
    """The layer an adapter builds a state for: told once, before the first step.

    Attributes
    ----------
    kind : {"bn", "mbn"}
        Batch normalization or momentum batch normalization.
    layout : str
        One of :data:`LAYOUTS`.
    shape : tuple of int
        The input shape of a step (the whole batch; shards split it along the first axis).
    axis : int
        The channel axis (1, or -1 for channels-last).
    num_features : int
        The number of channels.
    dtype : str
        The inputs' dtype name (``"float32"``...); the state's precision is the adapter's
        choice.
    affine : bool
        Whether the steps pass ``gamma``/``beta``.
    """

    kind: Kind
    layout: str
    shape: tuple[int, ...]
    axis: int
    num_features: int
    dtype: str
    affine: bool


@dataclass(frozen=True)
class Step:
    """One step of a case, in the suite's canonical convention.

    Attributes
    ----------
    kind : {"bn", "mbn"}
        Batch normalization or momentum batch normalization.
    index : int
        The 0-indexed step within its case (for messages).
    training : bool
        A training step (normalize with batch or moving statistics, update the state) or an
        evaluation step (normalize with the stored inference statistics).
    eps : float
        Added to the variance inside the square root.
    axis : int
        The channel axis.
    estimator : str
        The running-variance estimator the adapter declared (``running_var``).
    decay : float or None
        BN's decay of the running statistics; ``None`` is the cumulative average.
    lam : float
        MBN's training decay (Eq. 8); 0 makes MBN exactly BN.
    tau : float or None
        MBN's inference decay; ``None`` is the cumulative average.
    """

    kind: Kind
    index: int
    training: bool
    eps: float
    axis: int
    estimator: str = "biased"
    decay: float | None = 0.9
    lam: float = 0.0
    tau: float | None = 0.9

    @property
    def inference_decay(self) -> float | None:
        """The decay of the statistics that evaluation uses: BN's ``decay``, MBN's ``tau``."""
        return self.tau if self.kind == "mbn" else self.decay

    @staticmethod
    def update_rate(decay: float | None) -> float | None:
        """PyTorch's ``momentum`` (``1 - decay``) for a decay; ``None`` stays ``None``."""
        if decay is None:
            return None
        from mbn_ref.conventions import update_rate_from_decay

        return update_rate_from_decay(decay)


@runtime_checkable
class Adapter(Protocol):
    """An implementation of BN/MBN under test.

    ``state`` and ``ctx`` are opaque to the suite. ``x``, ``gamma``, ``beta`` and ``dy``
    arrive already converted by :meth:`from_numpy`; ``gamma``/``beta`` are ``None`` in cases
    without affine parameters. A method that raises is reported with its name, the step and
    the traceback.
    """

    name: str
    capabilities: Capabilities

    def from_numpy(self, a: np.ndarray) -> Any:
        """The implementation's array for the NumPy array ``a``: same shape, values, dtype."""
        ...

    def to_numpy(self, a: Any) -> np.ndarray:
        """The implementation's array ``a`` (an output, a gradient) as a NumPy array."""
        ...

    def init_state(self, setup: Setup) -> Any:
        """A fresh state for the layer ``setup`` describes.

        The suite then loads its initial values with :meth:`load_state`.
        """
        ...

    def load_state(self, state: Any, values: Mapping[str, np.ndarray]) -> Any:
        """A state holding ``values`` (canonical keys; ``num_batches_tracked`` is int64).

        ``running_var`` is given under the declared estimator.
        """
        ...

    def state_to_numpy(self, state: Any) -> dict[str, np.ndarray]:
        """The state's fields as NumPy arrays under the canonical keys (see the module)."""
        ...

    def train_step(
        self, step: Step, state: Any, x: Any, gamma: Any, beta: Any
    ) -> tuple[Any, Any, Any]:
        """``(y, new_state, ctx)`` for one training step; ``ctx`` goes to :meth:`backward`."""
        ...

    def eval_step(self, step: Step, state: Any, x: Any, gamma: Any, beta: Any) -> Any:
        """``y`` normalized with the stored (inference) statistics."""
        ...

    def backward(self, ctx: Any, dy: Any) -> tuple[Any, Any, Any]:
        """``(dx, dgamma, dbeta)`` of the training step that returned ``ctx``."""
        ...


@runtime_checkable
class SyncAdapter(Adapter, Protocol):
    """An adapter that runs synchronized statistics over shards, forward then backward."""

    def sync_train_step(
        self, step: Step, state: Any, shards: Sequence[Any], gamma: Any, beta: Any
    ) -> tuple[list[Any], Any, Any]:
        """``(ys, new_state, ctx)``: every shard's output and the (shared) new state."""
        ...

    def sync_backward(self, ctx: Any, dys: Sequence[Any]) -> tuple[list[Any], Any, Any]:
        """``(dxs, dgamma, dbeta)``; ``dgamma``/``dbeta`` reduced over the shards."""
        ...


@runtime_checkable
class FusedSyncAdapter(Adapter, Protocol):
    """An adapter whose synchronized step runs forward and backward in one call.

    A gradient through a collective cannot leave its replica context in some frameworks
    (``tf.distribute``, ``jax.pmap``): such an adapter gets the upstream gradients with the
    inputs and returns everything at once.
    """

    def sync_step(
        self,
        step: Step,
        state: Any,
        shards: Sequence[Any],
        gamma: Any,
        beta: Any,
        dys: Sequence[Any] | None,
    ) -> tuple[list[Any], Any, list[Any] | None, Any, Any]:
        """``(ys, new_state, dxs, dgamma, dbeta)`` for one synchronized training step.

        ``dys`` is ``None`` when the suite wants no gradients; ``dxs``, ``dgamma`` and
        ``dbeta`` are then ``None``. ``dgamma``/``dbeta`` are reduced over the shards.
        """
        ...


@dataclass(frozen=True)
class ScheduleSetup:
    """The paper's schedule parameters an implementation's scheduler is given.

    Attributes
    ----------
    batch_size : int
        ``m``, also the batch size of every step.
    ideal_batch_size : int
        ``m0`` (the paper's §5.2 default is 32).
    total_epochs : int
        ``T``; the suite runs one training step per epoch.
    tau0 : float
        Eq. 12's inference decay at ``m0`` (the paper's §5.2 default is 0.85).
    """

    batch_size: int
    ideal_batch_size: int = 32
    total_epochs: int = 5
    tau0: float = 0.85


@runtime_checkable
class ScheduledAdapter(Adapter, Protocol):
    """An adapter whose implementation sets MBN's decays with its own scheduler."""

    def scheduled_train_step(
        self,
        schedule: ScheduleSetup,
        epoch: int,
        step: Step,
        state: Any,
        x: Any,
        gamma: Any,
        beta: Any,
    ) -> tuple[Any, Any, Any, tuple[float, float]]:
        """One MBN training step with the decays the implementation's scheduler sets.

        ``epoch`` is the number of completed epochs (0 for the first); ``step`` carries
        everything but the decays (its ``lam``/``tau`` are to be ignored). Returns
        ``(y, new_state, ctx, (lam, tau))``: the decays the layer actually used, as decays
        (weights on history), read back from the implementation.
        """
        ...
