"""ONNX's reference ``BatchNormalization`` (opset 15) through the conformance suite.

Run it with ``mbn-ref conformance --impl examples.frameworks.onnx_bn:make``. Each step runs a
one-node model in ``onnx.reference.ReferenceEvaluator``: ``training_mode=1`` returns ``Y`` and
the updated running statistics, ``training_mode=0`` normalizes with the given ones. The state
is those two arrays; the source of the operator is
``onnx/reference/ops/op_batch_normalization.py``.

What it declares, and why:

- ``running_var="biased"`` (``x.var()``, ``1/m``) and ``momentum`` as a decay.
- ``hyperparameter_dtype="float32"``: ``momentum`` and ``epsilon`` are float32 attributes,
  so the suite compares against decays and ``eps`` rounded to float32.
- ``batch_counter=False``: the operator keeps no count (so no cumulative average either).
- channel axis 1 only (``NC`` to ``NCDHW``); no MBN, no synchronized statistics, no backward
  (the operator has no gradient in the reference evaluator).
- ``scale`` and ``B`` are required inputs: without affine parameters the adapter passes ones
  and zeros.
- dtypes float16, float32, float64 (the operator's type constraint ``T``; the reference
  computes in the inputs' dtype with NumPy).

A known failure, found by the suite (:data:`KNOWN_FAILURES`): an empty batch makes the running
statistics NaN. ``BatchNormalization_14._run`` (which serves opset 15) calls
``_batchnorm_training_mode`` in ``op_batch_normalization.py``, which takes
``x.mean(axis=axis)`` and ``x.var(axis=axis)`` of zero elements (NaN) and blends them into
the running statistics unconditionally.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from mbn_conformance.protocol import Capabilities, Setup, Step

_TYPES = {
    "float16": TensorProto.FLOAT16,
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
}


KNOWN_FAILURES: dict[str, str] = {
    "*/N0/*": "an empty batch makes the running statistics NaN: _batchnorm_training_mode "
    "(onnx/reference/ops/op_batch_normalization.py) blends x.mean()/x.var() of zero "
    "elements into them",
}
"""Check-id patterns and why they fail."""


@cache
def _session(dtype: str, rank: int, training: bool, momentum: float, eps: float) -> Any:
    """A reference session of one ``BatchNormalization`` node (opset 15)."""
    elem = _TYPES[dtype]
    inputs = [helper.make_tensor_value_info("X", elem, [None] * rank)] + [
        helper.make_tensor_value_info(n, elem, [None]) for n in ("scale", "B", "mean", "var")
    ]
    outputs = [helper.make_tensor_value_info("Y", elem, [None] * rank)]
    names = ["Y"]
    if training:
        outputs += [helper.make_tensor_value_info(n, elem, [None]) for n in ("rm", "rv")]
        names += ["rm", "rv"]
    node = helper.make_node(
        "BatchNormalization",
        ["X", "scale", "B", "mean", "var"],
        names,
        epsilon=eps,
        momentum=momentum,
        training_mode=int(training),
    )
    graph = helper.make_graph([node], "bn", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    return ReferenceEvaluator(model)


class OnnxBatchNorm:
    """A conformance adapter for ONNX's reference ``BatchNormalization`` (see the module)."""

    name = f"onnx.reference BatchNormalization-15 (onnx {onnx.__version__})"

    def __init__(self) -> None:
        self.capabilities = Capabilities(
            dtypes=frozenset(_TYPES),
            layouts=frozenset({"NC", "NCL", "NCHW", "NCDHW"}),
            algorithms=frozenset({"bn", "dynamic_bn"}),
            running_var="biased",
            backward=False,
            batch_counter=False,
            hyperparameter_dtype="float32",
            version=onnx.__version__,
            known_failures=KNOWN_FAILURES,
        )

    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        """The operator takes NumPy arrays."""
        return np.array(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        """An output as a NumPy array."""
        return np.asarray(a)

    def init_state(self, setup: Setup) -> dict[str, Any]:
        """Running statistics in the inputs' dtype, and what the steps need to know."""
        c = setup.num_features
        return {
            "dtype": setup.dtype,
            "running_mean": np.zeros(c, setup.dtype),
            "running_var": np.ones(c, setup.dtype),
        }

    def load_state(self, state: dict[str, Any], values: Mapping[str, np.ndarray]) -> Any:
        """A state holding ``values`` (in the inputs' dtype, as the operator keeps them)."""
        dt = state["dtype"]
        return {
            "dtype": dt,
            "running_mean": np.asarray(values["running_mean"], dt),
            "running_var": np.asarray(values["running_var"], dt),
        }

    def state_to_numpy(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        """The running statistics (no counter)."""
        return {k: np.asarray(state[k]) for k in ("running_mean", "running_var")}

    def _run(self, step: Step, state: dict[str, Any], x: Any, g: Any, b: Any) -> list[Any]:
        c = state["running_mean"].shape[0]
        dt = state["dtype"]
        momentum = 0.9 if step.decay is None else step.decay
        sess = _session(dt, x.ndim, step.training, float(momentum), float(step.eps))
        feeds = {
            "X": x,
            "scale": np.ones(c, dt) if g is None else g,
            "B": np.zeros(c, dt) if b is None else b,
            "mean": state["running_mean"],
            "var": state["running_var"],
        }
        return list(sess.run(None, feeds))

    def train_step(
        self, step: Step, state: dict[str, Any], x: Any, gamma: Any, beta: Any
    ) -> tuple[Any, Any, Any]:
        """``training_mode=1``: ``Y`` and the new running statistics; no context."""
        y, mean, var = self._run(step, state, x, gamma, beta)
        return y, {"dtype": state["dtype"], "running_mean": mean, "running_var": var}, None

    def eval_step(self, step: Step, state: dict[str, Any], x: Any, gamma: Any, beta: Any) -> Any:
        """``training_mode=0``: normalize with the running statistics."""
        return self._run(step, state, x, gamma, beta)[0]

    def backward(self, ctx: Any, dy: Any) -> tuple[Any, Any, Any]:
        """Not available: the reference operator has no gradient."""
        raise NotImplementedError("ONNX's reference BatchNormalization has no gradient")


def make() -> OnnxBatchNorm:
    """The factory for ``--impl examples.frameworks.onnx_bn:make``."""
    return OnnxBatchNorm()
