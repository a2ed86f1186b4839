"""The adapter protocol: what an implementation under test provides.

The suite speaks one canonical convention and adapters translate to their framework's:

- momentum values are **decays** (weight on history): ``decay`` for BN, ``lam`` and ``tau``
  for MBN; ``decay=None`` is the cumulative average. A PyTorch-style adapter passes
  ``momentum = 1 - decay``.
- state is reported by :meth:`Adapter.state_to_numpy` under canonical keys:
  ``running_mean``, ``running_var``, ``num_batches_tracked`` (BN and MBN) and
  ``moving_mean``, ``moving_var`` (MBN's training statistics). ``running_var`` holds the
  estimator the adapter declares in :attr:`Capabilities.running_var`.
- arrays cross the boundary as NumPy arrays through :meth:`Adapter.from_numpy` and
  :meth:`Adapter.to_numpy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

Algorithm = Literal["bn", "dynamic_bn", "cumulative", "mbn", "sync"]
"""``bn``: BN with a fixed decay; ``dynamic_bn``: the decay changes between steps;
``cumulative``: ``decay=None``; ``mbn``: momentum BN (Algorithm 1); ``sync``: synchronized
statistics over shards (needs :meth:`Adapter.sync_train_step`)."""

ALGORITHMS: tuple[str, ...] = ("bn", "dynamic_bn", "cumulative", "mbn", "sync")
DTYPES: tuple[str, ...] = ("float16", "float32", "float64")
LAYOUTS: tuple[str, ...] = ("NC", "NCL", "NCHW", "NCDHW", "NHWC")
ESTIMATORS: tuple[str, ...] = ("biased", "unbiased")


@dataclass(frozen=True)
class Capabilities:
    """What an implementation supports; cases outside it are skipped, with the reason.

    ``known_failures`` maps case-id glob patterns (``fnmatch``) to the reason they fail:
    those cases are reported as expected failures (xfail), like scikit-learn's
    ``expected_failed_checks``. ``native_momentum`` documents the framework's own convention
    (the adapter translates from decays).
    """

    dtypes: frozenset[str] = frozenset(DTYPES)
    layouts: frozenset[str] = frozenset(LAYOUTS)
    algorithms: frozenset[str] = frozenset(ALGORITHMS)
    running_var: frozenset[str] = frozenset(ESTIMATORS)
    native_momentum: Literal["decay", "update_rate"] = "decay"
    backward: bool = True
    affine_optional: bool = True
    known_failures: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values, allowed in (
            ("dtypes", self.dtypes, DTYPES),
            ("layouts", self.layouts, LAYOUTS),
            ("algorithms", self.algorithms, ALGORITHMS),
            ("running_var", self.running_var, ESTIMATORS),
        ):
            unknown = set(values) - set(allowed)
            if unknown:
                raise ValueError(f"unknown {name} {sorted(unknown)}; allowed: {allowed}")


@runtime_checkable
class Adapter(Protocol):
    """An implementation of BN/MBN under test.

    ``state`` and ``ctx`` are opaque to the suite. ``x``, ``gamma``, ``beta`` and ``dy``
    arrive already converted by :meth:`from_numpy`; ``gamma``/``beta`` are ``None`` in
    cases without affine parameters.
    """

    name: str
    capabilities: Capabilities

    def from_numpy(self, a: np.ndarray) -> Any:
        """The implementation's array for the NumPy array ``a``: same shape, values and dtype."""
        ...

    def to_numpy(self, a: Any) -> np.ndarray:
        """The implementation's array ``a`` (an output, a gradient) as a NumPy array."""
        ...

    def init_state(self, algorithm: str, num_features: int, dtype: str) -> Any:
        """A fresh state for ``algorithm`` (``"bn"`` or ``"mbn"``) with ``num_features`` channels.

        ``dtype`` is the case's dtype name (e.g. ``"float32"``); the state's own precision is
        the adapter's choice. The suite loads its initial values with :meth:`load_state`.
        """
        ...

    def load_state(self, state: Any, values: Mapping[str, np.ndarray]) -> Any:
        """A state holding ``values`` (canonical keys; ``num_batches_tracked`` is int64)."""
        ...

    def state_to_numpy(self, state: Any) -> dict[str, np.ndarray]:
        """The state's fields as NumPy arrays under the canonical keys (see the module)."""
        ...

    def train_step(
        self,
        algorithm: str,
        state: Any,
        x: Any,
        gamma: Any,
        beta: Any,
        *,
        decay: float | None,
        lam: float,
        tau: float | None,
        eps: float,
        axis: int,
        estimator: str,
    ) -> tuple[Any, Any, Any]:
        """``(y, new_state, ctx)`` for one training step."""
        ...

    def eval_step(
        self, algorithm: str, state: Any, x: Any, gamma: Any, beta: Any, *, eps: float, axis: int
    ) -> Any:
        """``y`` normalized with the stored (inference) statistics."""
        ...

    def backward(self, ctx: Any, dy: Any) -> tuple[Any, Any, Any]:
        """``(dx, dgamma, dbeta)`` of the training step that returned ``ctx``."""
        ...


@runtime_checkable
class SyncAdapter(Adapter, Protocol):
    """An adapter that also runs synchronized statistics over shards (algorithm ``sync``)."""

    def sync_train_step(
        self,
        algorithm: str,
        state: Any,
        shards: Sequence[Any],
        gamma: Any,
        beta: Any,
        *,
        decay: float | None,
        lam: float,
        tau: float | None,
        eps: float,
        axis: int,
        estimator: str,
    ) -> tuple[list[Any], Any, Any]:
        """``(ys, new_state, ctx)``: every shard's output, the (shared) new state."""
        ...

    def sync_backward(self, ctx: Any, dys: Sequence[Any]) -> tuple[list[Any], Any, Any]:
        """``(dxs, dgamma, dbeta)``; ``dgamma``/``dbeta`` reduced over the shards."""
        ...
