"""The conformance adapter of TinyNorm (:mod:`.tinynorm`).

The worked example of ``docs/conformance.md``::

    mbn-ref conformance --impl examples.third_party_mbn.adapter:make

The suite speaks decays and canonical state keys; TinyNorm speaks PyTorch. The adapter
translates, and nothing else:

===============================  =====================================================
suite (canonical)                TinyNorm
===============================  =====================================================
``Setup``                        ``MomentumBatchNorm(num_features, affine=..., dtype=...)``
                                 with a ``train_momentum`` for MBN: the layer is the state
``Step.decay`` (BN), ``.tau``    ``momentum = 1 - decay`` (update rate); ``None`` stays
                                 ``None`` (:meth:`Step.update_rate`)
``Step.lam`` (MBN)               ``train_momentum = 1 - lam``
running-variance estimator       declared ``"unbiased"``: TinyNorm's default, kept
channel ``axis``                 moved to axis 1 and back (TinyNorm is ``(N, C, *)`` only)
``moving_mean/_var``             ``train_mean`` / ``train_var``
``running_*``, count             ``running_*``, ``num_batches_tracked`` (same names)
``gamma`` / ``beta``             ``weight`` / ``bias``
===============================  =====================================================

Capabilities are declared honestly: float32/float64 (TinyNorm has no float16), no
synchronized statistics, the unbiased running variance it stores, and the one bad input it
refuses (a training batch with one value per channel, like PyTorch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mbn_conformance import Capabilities, Setup, Step

from .tinynorm import MomentumBatchNorm

STATE_KEYS = {  # canonical key -> TinyNorm attribute
    "running_mean": "running_mean",
    "running_var": "running_var",
    "moving_mean": "train_mean",
    "moving_var": "train_var",
}


class TinyNormAdapter:
    """TinyNorm under the suite's adapter protocol; the state is the layer itself."""

    name = "TinyNorm (examples/third_party_mbn)"
    capabilities = Capabilities(
        dtypes=frozenset({"float32", "float64"}),
        algorithms=frozenset({"bn", "dynamic_bn", "cumulative", "mbn"}),
        running_var="unbiased",  # TinyNorm's default, like PyTorch's
        native_momentum="update_rate",
        refuses=frozenset({"one_value_per_channel"}),
    )

    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        """A copy of ``a``: TinyNorm works on NumPy arrays."""
        return np.array(a, copy=True)

    def to_numpy(self, a: Any) -> np.ndarray:
        """``a`` as a NumPy array (it already is one)."""
        return np.asarray(a)

    def init_state(self, setup: Setup) -> MomentumBatchNorm:
        """A TinyNorm layer for ``setup``: the state.

        Plain BN or MBN (a ``train_momentum``), affine or not, in the inputs' dtype.
        """
        return MomentumBatchNorm(
            setup.num_features,
            train_momentum=0.0 if setup.kind == "mbn" else None,
            affine=setup.affine,
            dtype=np.dtype(setup.dtype),
        )

    def load_state(
        self, state: MomentumBatchNorm, values: Mapping[str, np.ndarray]
    ) -> MomentumBatchNorm:
        """Set the layer's buffers from ``values`` (canonical keys, see :data:`STATE_KEYS`)."""
        for key, attr in STATE_KEYS.items():
            if key in values:
                setattr(state, attr, np.asarray(values[key], dtype=state.dtype).copy())
        state.num_batches_tracked = int(values["num_batches_tracked"])
        return state

    def state_to_numpy(self, state: MomentumBatchNorm) -> dict[str, np.ndarray]:
        """The layer's buffers under canonical keys (the moving statistics in MBN mode)."""
        keys: tuple[str, ...] = ("running_mean", "running_var")
        if state.train_momentum is not None:
            keys += ("moving_mean", "moving_var")
        out = {k: np.asarray(getattr(state, STATE_KEYS[k])) for k in keys}
        out["num_batches_tracked"] = np.asarray(state.num_batches_tracked, dtype=np.int64)
        return out

    @staticmethod
    def _configure(layer: MomentumBatchNorm, step: Step, gamma: Any, beta: Any) -> None:
        """Translate ``step`` into the layer's PyTorch-style settings (table above)."""
        layer.eps = step.eps
        layer.training = step.training
        layer.weight = None if gamma is None else np.asarray(gamma, dtype=layer.dtype)
        layer.bias = None if beta is None else np.asarray(beta, dtype=layer.dtype)
        if step.kind == "mbn":
            layer.train_momentum = 1.0 - step.lam
        layer.momentum = Step.update_rate(step.inference_decay)

    def train_step(
        self, step: Step, state: MomentumBatchNorm, x: np.ndarray, gamma: Any, beta: Any
    ) -> tuple[np.ndarray, MomentumBatchNorm, tuple[MomentumBatchNorm, int]]:
        """One training ``forward``, decays translated to update rates (table above).

        Returns ``(y, layer, (layer, axis))``: the context is the layer, whose cache
        :meth:`backward` uses, and the channel axis.
        """
        self._configure(state, step, gamma, beta)
        ax = step.axis % x.ndim
        y = state.forward(np.moveaxis(x, ax, 1))
        return np.moveaxis(y, 1, ax), state, (state, ax)

    def eval_step(
        self, step: Step, state: MomentumBatchNorm, x: np.ndarray, gamma: Any, beta: Any
    ) -> np.ndarray:
        """The layer's evaluation-mode ``forward`` (running statistics)."""
        self._configure(state, step, gamma, beta)
        ax = step.axis % x.ndim
        return np.moveaxis(state.forward(np.moveaxis(x, ax, 1)), 1, ax)

    def backward(
        self, ctx: tuple[MomentumBatchNorm, int], dy: np.ndarray
    ) -> tuple[np.ndarray, Any, Any]:
        """``(dx, dgamma, dbeta)`` from the layer's ``backward`` and its parameter gradients."""
        layer, ax = ctx
        dx = layer.backward(np.moveaxis(dy, ax, 1))
        return np.moveaxis(dx, 1, ax), layer.weight_grad, layer.bias_grad


def make() -> TinyNormAdapter:
    """The factory for ``--impl examples.third_party_mbn.adapter:make``."""
    return TinyNormAdapter()
