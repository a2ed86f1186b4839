"""The conformance adapter of TinyNorm (:mod:`.tinynorm`).

The worked example of ``docs/conformance.md``::

    mbn-ref conformance --impl examples.third_party_mbn.adapter:make

The suite speaks decays and canonical state keys; TinyNorm speaks PyTorch. The adapter
translates, and nothing else:

==========================  ==========================================================
suite (canonical)           TinyNorm
==========================  ==========================================================
``decay`` (BN), ``tau``     ``momentum = 1 - decay`` (update rate); ``None`` stays ``None``
``lam`` (MBN)               ``train_momentum = 1 - lam``
``estimator``               ``unbiased = (estimator == "unbiased")``
channel ``axis``            moved to axis 1 and back (TinyNorm is ``(N, C, *)`` only)
``moving_mean/_var``        ``train_mean`` / ``train_var``
``running_*``, count        ``running_*``, ``num_batches_tracked`` (same names)
``gamma`` / ``beta``        ``weight`` / ``bias``; ``None``: ``affine=False``
==========================  ==========================================================

Capabilities are declared honestly: float32/float64 (TinyNorm has no float16), no
synchronized statistics, and one known failure with its reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mbn_conformance import Capabilities

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
        native_momentum="update_rate",
        known_failures={
            "mbn/*/N1/*": (
                "TinyNorm refuses a training batch with one value per channel (PyTorch's "
                "rule), also in MBN mode where the moving statistics could normalize it"
            ),
        },
    )

    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        """A copy of ``a``: TinyNorm works on NumPy arrays."""
        return np.array(a, copy=True)

    def to_numpy(self, a: Any) -> np.ndarray:
        """``a`` as a NumPy array (it already is one)."""
        return np.asarray(a)

    def init_state(self, algorithm: str, num_features: int, dtype: str) -> MomentumBatchNorm:
        """A fresh TinyNorm layer in ``dtype``, tagged with ``algorithm``: the state."""
        layer = MomentumBatchNorm(num_features, dtype=np.dtype(dtype))
        layer.algorithm = algorithm  # type: ignore[attr-defined]
        return layer

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
        """The layer's buffers under canonical keys (MBN's moving statistics for ``"mbn"``)."""
        keys = ("running_mean", "running_var")
        if state.algorithm == "mbn":  # type: ignore[attr-defined]
            keys += ("moving_mean", "moving_var")
        out = {k: np.asarray(getattr(state, STATE_KEYS[k])) for k in keys}
        out["num_batches_tracked"] = np.asarray(state.num_batches_tracked, dtype=np.int64)
        return out

    @staticmethod
    def _set_params(layer: MomentumBatchNorm, gamma: Any, beta: Any, eps: float) -> None:
        layer.eps = eps
        layer.affine = gamma is not None
        layer.weight = None if gamma is None else np.asarray(gamma, dtype=layer.dtype)
        layer.bias = None if beta is None else np.asarray(beta, dtype=layer.dtype)

    def train_step(
        self,
        algorithm: str,
        state: MomentumBatchNorm,
        x: np.ndarray,
        gamma: Any,
        beta: Any,
        *,
        decay: float | None,
        lam: float,
        tau: float | None,
        eps: float,
        axis: int,
        estimator: str,
    ) -> tuple[np.ndarray, MomentumBatchNorm, tuple[MomentumBatchNorm, int]]:
        """One training ``forward``, decays translated to update rates (table above).

        Returns ``(y, layer, (layer, axis))``: the context is the layer, whose cache
        :meth:`backward` uses, and the channel axis.
        """
        layer = state
        self._set_params(layer, gamma, beta, eps)
        layer.training = True
        layer.unbiased = estimator == "unbiased"
        if algorithm == "mbn":
            layer.train_momentum = 1.0 - lam
            layer.momentum = None if tau is None else 1.0 - tau
        else:
            layer.train_momentum = None
            layer.momentum = None if decay is None else 1.0 - decay
        ax = axis % x.ndim
        y = layer.forward(np.moveaxis(x, ax, 1))
        return np.moveaxis(y, 1, ax), layer, (layer, ax)

    def eval_step(
        self,
        algorithm: str,
        state: MomentumBatchNorm,
        x: np.ndarray,
        gamma: Any,
        beta: Any,
        *,
        eps: float,
        axis: int,
    ) -> np.ndarray:
        """The layer's evaluation-mode ``forward`` (running statistics)."""
        self._set_params(state, gamma, beta, eps)
        state.training = False
        ax = axis % x.ndim
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
