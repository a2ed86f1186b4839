"""The core as a synchronized adapter of the fused shape only (``FusedSyncAdapter``).

Test support for the suite's second sync path: forward and backward in one ``sync_step``
call, as frameworks whose gradient cannot leave a replica context need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from mbn_conformance import builtin
from mbn_conformance.protocol import Setup, Step


class FusedCore:
    """The core behind ``sync_step`` alone; ``calls`` records whether each asked for gradients.

    Keyword arguments replace fields of the core's capabilities (e.g. ``backward=False``).
    """

    def __init__(self, **caps: Any) -> None:
        self.core = builtin.CoreAdapter("numpy")
        self.name = "fused-core"
        self.capabilities = replace(self.core.capabilities, **caps)
        self.calls: list[bool] = []

    def from_numpy(self, a: np.ndarray) -> Any:
        return self.core.from_numpy(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        return self.core.to_numpy(a)

    def init_state(self, setup: Setup) -> Any:
        return self.core.init_state(setup)

    def load_state(self, state: Any, values: Mapping[str, np.ndarray]) -> Any:
        return self.core.load_state(state, values)

    def state_to_numpy(self, state: Any) -> dict[str, np.ndarray]:
        return self.core.state_to_numpy(state)

    def train_step(self, step: Step, state: Any, x: Any, g: Any, b: Any) -> Any:
        return self.core.train_step(step, state, x, g, b)

    def eval_step(self, step: Step, state: Any, x: Any, g: Any, b: Any) -> Any:
        return self.core.eval_step(step, state, x, g, b)

    def backward(self, ctx: Any, dy: Any) -> Any:
        return self.core.backward(ctx, dy)

    def sync_step(
        self,
        step: Step,
        state: Any,
        shards: Sequence[Any],
        gamma: Any,
        beta: Any,
        dys: Sequence[Any] | None,
    ) -> tuple[list[Any], Any, list[Any] | None, Any, Any]:
        self.calls.append(dys is not None)
        ys, new_state, ctxs = self.core.sync_train_step(step, state, shards, gamma, beta)
        if dys is None:
            return ys, new_state, None, None, None
        dxs, dg, db = self.core.sync_backward(ctxs, dys)
        return ys, new_state, dxs, dg, db
