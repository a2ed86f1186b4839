"""PyTorch's own ``torch.nn.BatchNorm1d/2d/3d`` through the conformance suite.

Run it with ``mbn-ref conformance --impl examples.frameworks.torch_bn:make``. The adapter
drives a real module: the state is the module itself (its buffers), ``momentum`` is set from
the step's decay as PyTorch's update rate (``None`` for the cumulative average) and the
gradients come from autograd.

What it declares, and why:

- ``running_var="unbiased"``: ``BatchNorm*d`` stores ``var * m/(m-1)``;
  ``native_momentum="update_rate"``.
- layouts ``NC``, ``NCL`` (``BatchNorm1d``), ``NCHW`` (``BatchNorm2d``), ``NCDHW``
  (``BatchNorm3d``); channels-last data would be a permutation done by the adapter, not by
  PyTorch, so ``NHWC`` is not declared.
- no MBN (PyTorch has none) and no synchronized statistics (``SyncBatchNorm`` needs an
  initialized process group; the PyTorch adapter of mbn-ref covers it).
- dtypes float16, float32 and float64 (``BatchNorm*d`` runs all three on the CPU, its
  buffers in the module's dtype).
- ``refuses={"one_value_per_channel", "eps_not_positive"}``: in training,
  ``torch.nn.functional.batch_norm`` raises ``ValueError`` for one value per channel
  (``_verify_batch_size``) and for ``eps <= 0``; nothing checks ``momentum``.

Known failures, found by the suite (:data:`KNOWN_FAILURES`), both from
``torch/nn/modules/batchnorm.py``, ``_BatchNorm.forward``, which adds 1 to
``num_batches_tracked`` whenever the module trains, before ``F.batch_norm`` looks at the
batch:

- an empty batch increments ``num_batches_tracked``, so the count is off by one afterwards
  (and ``momentum=None``'s cumulative average, which weights a batch by
  ``1/num_batches_tracked``, would weight the next batch wrongly);
- the refusals raise, but only after the counter was incremented: the state the layer was
  given has changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mbn_conformance.protocol import Capabilities, Setup, Step

_MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
_MODULES[5] = torch.nn.BatchNorm3d

_COUNTS_FIRST = (
    "_BatchNorm.forward (torch/nn/modules/batchnorm.py) increments num_batches_tracked "
    "before F.batch_norm looks at the batch"
)
KNOWN_FAILURES: dict[str, str] = {
    "*/N0/*": "an empty batch increments num_batches_tracked: " + _COUNTS_FIRST,
    "refusal/one_value_per_channel": "raises ValueError, but only after modifying the "
    "state: " + _COUNTS_FIRST,
    "refusal/eps_not_positive": "raises ValueError, but only after modifying the state: "
    + _COUNTS_FIRST,
}
"""Check-id patterns and why they fail."""


class TorchBatchNorm:
    """A conformance adapter for ``torch.nn.BatchNorm*d`` (see the module docstring)."""

    name = f"torch.nn.BatchNorm*d (torch {torch.__version__})"

    def __init__(self) -> None:
        self.capabilities = Capabilities(
            dtypes=frozenset({"float16", "float32", "float64"}),
            layouts=frozenset({"NC", "NCL", "NCHW", "NCDHW"}),
            algorithms=frozenset({"bn", "dynamic_bn", "cumulative"}),
            running_var="unbiased",
            native_momentum="update_rate",
            refuses=frozenset({"one_value_per_channel", "eps_not_positive"}),
            version=torch.__version__,
            known_failures=KNOWN_FAILURES,
        )

    def from_numpy(self, a: np.ndarray) -> torch.Tensor:
        """``a`` as a tensor (a copy, so the module never aliases the suite's arrays)."""
        return torch.from_numpy(np.array(a))

    def to_numpy(self, a: Any) -> np.ndarray:
        """A tensor as a NumPy array (detached)."""
        return np.asarray(a.detach().numpy())

    def init_state(self, setup: Setup) -> torch.nn.Module:
        """A ``BatchNorm1d/2d/3d`` for the input rank, in the case's dtype."""
        module = _MODULES[len(setup.shape)](
            setup.num_features, affine=setup.affine, dtype=getattr(torch, setup.dtype)
        )
        return module

    def load_state(self, state: torch.nn.Module, values: Mapping[str, np.ndarray]) -> Any:
        """The module with its buffers set to ``values``."""
        with torch.no_grad():
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                buffer = getattr(state, key)
                buffer.copy_(torch.from_numpy(np.asarray(values[key])).to(buffer.dtype))
        return state

    def state_to_numpy(self, state: torch.nn.Module) -> dict[str, np.ndarray]:
        """The module's buffers under the canonical keys."""
        return {
            k: self.to_numpy(getattr(state, k))
            for k in ("running_mean", "running_var", "num_batches_tracked")
        }

    def _prepare(self, step: Step, module: torch.nn.Module, gamma: Any, beta: Any) -> None:
        module.eps = step.eps
        module.momentum = Step.update_rate(step.decay)
        if gamma is not None:
            with torch.no_grad():
                module.weight.copy_(gamma)
                module.bias.copy_(beta)

    def train_step(
        self, step: Step, state: torch.nn.Module, x: Any, gamma: Any, beta: Any
    ) -> tuple[Any, Any, Any]:
        """One training call of the module; the context keeps what autograd needs."""
        self._prepare(step, state, gamma, beta)
        state.train()
        x = x.detach().requires_grad_(True)
        y = state(x)
        return y, state, (x, y, state)

    def eval_step(self, step: Step, state: torch.nn.Module, x: Any, gamma: Any, beta: Any) -> Any:
        """One evaluation call of the module."""
        self._prepare(step, state, gamma, beta)
        state.eval()
        with torch.no_grad():
            return state(x)

    def backward(self, ctx: Any, dy: Any) -> tuple[Any, Any, Any]:
        """``(dx, dgamma, dbeta)`` from autograd."""
        x, y, module = ctx
        inputs = [x] + ([module.weight, module.bias] if module.affine else [])
        grads = torch.autograd.grad(y, inputs, dy)
        return grads[0], *(grads[1:] if module.affine else (None, None))


def make() -> TorchBatchNorm:
    """The factory for ``--impl examples.frameworks.torch_bn:make``."""
    return TorchBatchNorm()
