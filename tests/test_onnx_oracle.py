"""ONNX's reference ``BatchNormalization`` as an independent oracle for BN's and MBN's forward.

The oracle is ``onnx.reference.ReferenceEvaluator`` running a one-node model built with
``onnx.helper`` (float64 throughout). It shares no code with ``mbn_ref``; its NumPy source is
``onnx/reference/ops/op_batch_normalization.py``.

Opset 15, ``training_mode=1`` (outputs ``Y, running_mean, running_var``)
    ``Y`` is normalized with the batch statistics (BN), and
    ``running_mean = momentum*input_mean + (1-momentum)*mean_B``,
    ``running_var = momentum*input_var + (1-momentum)*var_B`` where ``var_B`` is the
    **biased** (population, ``1/m``) batch variance. So it is
    ``bn_forward(decay=momentum, estimator="biased")``: ``Y`` is ``y``, ``running_mean`` and
    ``running_var`` are ``BNState.running_mean``/``running_var``. With ``momentum = lam`` its
    running statistics are MBN's ``moving_mean``/``moving_var`` (Eq. 8, always biased); with
    ``momentum = tau`` they are MBN's inference statistics ``running_mean``/``running_var``
    with ``estimator="biased"`` (the ``"unbiased"`` estimator, ``1/(m-1)``, does not match:
    tested below). ``training_mode=0`` is the evaluation forward with the input statistics.

Opset 9 (no ``training_mode``)
    The reference op normalizes with the **updated** running statistics,
    ``Y = scale*(X - mu)/sqrt(var + epsilon) + B`` with ``mu = momentum*mean + (1-momentum)*mean_B``
    and ``var = momentum*var + (1-momentum)*var_B`` (biased): MBN's training forward with
    ``lam = momentum`` (ONNX's momentum is a decay, like ``lam``). Its ``Y`` is compared with
    ``mbn_forward``'s ``y``.

Where opset 9's reference differs from "MBN's training forward with ``lam = momentum``":

- It returns ``Y`` alone: the schema's training outputs are never produced, and a model that
  declares them fails in ``ReferenceEvaluator.run``
  (:func:`test_opset9_reference_returns_y_only` pins this). What they would correspond to:

  ==============  =====================================================================
  opset 9 output  MBN (``lam = momentum``)
  ==============  =====================================================================
  ``Y``           ``y`` of ``mbn_forward`` (compared here)
  ``mean``        ``moving_mean`` after the step ("running mean after the operator")
  ``var``         ``moving_var`` after the step: the EMA of the *biased* batch variance,
                  whatever ``estimator`` (which only shapes the inference ``running_var``)
  ``saved_mean``  the batch mean ``mu_B``: no state field (MBN keeps it for the backward)
  ``saved_var``   the schema says only "saved ... to speed up gradient computation"; ONNX's
                  training helper for opsets 6 and 14 returns the biased ``var_B``; no
                  state field
  ==============  =====================================================================

  MBN's statistics are therefore checked against opset 15's running statistics (above),
  chained by ONNX itself: each step feeds ONNX's own outputs back to ONNX and ours back to
  ``mbn_forward``, so neither trajectory borrows from the other.
- It chooses its mode by ``momentum is None``; the attribute's schema default (0.9) is always
  filled in, so a ``Y``-only model, which the schema calls test mode ("Output case #2"), runs
  this training forward too, and the schema's test mode is unreachable. We rely on that
  behaviour (the models here set ``momentum`` explicitly).
- It has no second (inference) moving average (MBN's ``tau``), no step counter
  (``num_batches_tracked``), no cumulative average (``tau=None``) and no backward.
- ONNX stores ``momentum`` and ``epsilon`` as float32 attributes: the decays used here are
  exact in float32 and ``mbn_ref`` receives ``float(np.float32(1e-5))`` as ``eps``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import pytest

import mbn_ref as mr

onnx = pytest.importorskip("onnx")
ReferenceEvaluator = pytest.importorskip("onnx.reference").ReferenceEvaluator

RTOL = 1e-13
EPS = float(np.float32(1e-5))  # what ONNX's float32 ``epsilon`` attribute holds
DECAYS = [0.0, 0.5, 0.9375, 1.0]  # ``lam`` / ``decay``; all exact in float32
TAU = 0.75
SHAPES = [(4, 3), (2, 3, 4, 5)]
STEPS = 5
INPUTS = ["X", "scale", "B", "input_mean", "input_var"]


@cache
def _evaluator(opset: int, shape: tuple[int, ...], momentum: float, **attrs: int) -> Any:
    """A checked one-node float64 ``BatchNormalization`` model of ``opset`` for ``shape``.

    Opset 9 declares ``Y`` alone (see the module docstring); opset 15 with
    ``training_mode=1`` declares ``Y, running_mean, running_var``.
    """
    helper, tp = onnx.helper, onnx.TensorProto
    assert float(np.float32(momentum)) == momentum, "ONNX's momentum attribute is float32"
    channels = [shape[1]]
    outputs = ["Y"]
    if attrs.get("training_mode"):
        outputs += ["running_mean", "running_var"]
    node = helper.make_node(
        "BatchNormalization", INPUTS, outputs, epsilon=1e-5, momentum=momentum, **attrs
    )
    graph = helper.make_graph(
        [node],
        f"bn_opset{opset}",
        [helper.make_tensor_value_info("X", tp.DOUBLE, shape)]
        + [helper.make_tensor_value_info(n, tp.DOUBLE, channels) for n in INPUTS[1:]],
        [helper.make_tensor_value_info("Y", tp.DOUBLE, shape)]
        + [helper.make_tensor_value_info(n, tp.DOUBLE, channels) for n in outputs[1:]],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return ReferenceEvaluator(model)


def _run(
    ev: Any, x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray
) -> list[np.ndarray]:
    """Outputs of ``ev`` on one batch (inputs as float64 NumPy arrays)."""
    feeds = dict(zip(INPUTS, (x, gamma, beta, mean, var), strict=True))
    return list(ev.run(None, feeds))


def _rel_err(actual: Any, expected: np.ndarray) -> float:
    """``max|actual - expected|`` relative to ``max(1, max|expected|)``."""
    diff = np.max(np.abs(np.asarray(actual) - expected))
    return float(diff / max(1.0, float(np.max(np.abs(expected)))))


def _assert_close(actual: Any, expected: np.ndarray, what: str) -> None:
    """Assert that ``actual`` matches ``expected`` within ``RTOL`` (see :func:`_rel_err`)."""
    assert np.asarray(actual).shape == expected.shape, what
    err = _rel_err(actual, expected)
    assert err <= RTOL, f"{what}: relative difference {err:.2e} > {RTOL:.0e}"


def _data(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``gamma``, ``beta`` and ``STEPS`` batches with off-zero means and non-unit spreads."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    batches = [
        rng.normal(rng.uniform(-2, 2), rng.uniform(0.5, 3), size=shape) for _ in range(STEPS)
    ]
    return gamma, beta, batches


def _mbn_against_onnx(shape: tuple[int, ...], lam: float, lam_ours: float) -> dict[str, float]:
    """Run MBN (decay ``lam_ours``) and the ONNX oracles (``lam``) side by side for ``STEPS``.

    Returns the worst relative difference per compared quantity; asserts nothing, so that the
    sensitivity test can reuse it.
    """
    gamma, beta, batches = _data(shape, seed=len(shape) + int(lam * 16))
    c = shape[1]
    train_y = _evaluator(9, shape, lam)
    moving = _evaluator(15, shape, lam, training_mode=1)
    inference = _evaluator(15, shape, TAU, training_mode=1)
    evaluate = _evaluator(15, shape, TAU, training_mode=0)
    state = mr.init_state(c, dtype=np.float64)
    o_mean, o_var = np.zeros(c), np.ones(c)  # ONNX's own trajectory, mu / var
    o_mean_inf, o_var_inf = np.zeros(c), np.ones(c)  # and mu_inf / var_inf
    worst: dict[str, float] = {}

    def record(name: str, actual: Any, expected: np.ndarray) -> None:
        worst[name] = max(worst.get(name, 0.0), _rel_err(actual, expected))

    for step, x in enumerate(batches, start=1):
        y, state, _ = mr.mbn_forward(x, state, gamma, beta, lam=lam_ours, tau=TAU, eps=EPS)
        (o_y,) = _run(train_y, x, gamma, beta, o_mean, o_var)
        _, o_mean, o_var = _run(moving, x, gamma, beta, o_mean, o_var)
        _, o_mean_inf, o_var_inf = _run(inference, x, gamma, beta, o_mean_inf, o_var_inf)
        record("y", y, o_y)
        record("moving_mean", state.moving_mean, o_mean)
        record("moving_var", state.moving_var, o_var)
        record("running_mean", state.running_mean, o_mean_inf)
        record("running_var", state.running_var, o_var_inf)
        assert int(state.num_batches_tracked) == step
    y_eval, _, _ = mr.mbn_forward(batches[0], state, gamma, beta, eps=EPS, training=False)
    (o_y_eval,) = _run(evaluate, batches[0], gamma, beta, o_mean_inf, o_var_inf)
    record("y_eval", y_eval, o_y_eval)
    return worst


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("lam", DECAYS)
def test_mbn_forward_matches_onnx(shape: tuple[int, ...], lam: float) -> None:
    """MBN's training forward is opset 9's ``Y`` with ``momentum = lam``; its state is opset
    15's running statistics (``moving_*``: ``momentum = lam``; ``running_*``: ``momentum = tau``,
    biased estimator); its evaluation forward is opset 15's ``training_mode=0``; over
    ``STEPS`` steps, each side feeding back its own state. (Measured: about 4e-16.)"""
    worst = _mbn_against_onnx(shape, lam, lam)
    for name, err in worst.items():
        assert err <= RTOL, (
            f"{name}: relative difference {err:.2e} > {RTOL:.0e} (if only 'y' differs, check "
            "that ONNX's opset-9 reference still normalizes with the updated statistics)"
        )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_oracle_detects_a_perturbed_lam(shape: tuple[int, ...]) -> None:
    """The comparison can fail: ``lam`` off by ``2**-10`` breaks ``y`` and the moving
    statistics by far more than the tolerance, and leaves the inference statistics exact."""
    worst = _mbn_against_onnx(shape, 0.5, 0.5 + 2.0**-10)
    for name in ("y", "moving_mean", "moving_var"):
        assert worst[name] > 1e3 * RTOL, (name, worst[name])
    assert worst["running_mean"] <= RTOL and worst["running_var"] <= RTOL


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("decay", DECAYS)
def test_bn_forward_matches_onnx_opset15(shape: tuple[int, ...], decay: float) -> None:
    """BN is opset 15's ``BatchNormalization`` with ``momentum = decay``: ``Y`` is ``y`` (batch
    statistics), ``running_mean``/``running_var`` (biased) are ``BNState``'s, over ``STEPS``
    steps; ``training_mode=0`` is BN's evaluation forward."""
    gamma, beta, batches = _data(shape, seed=100 + len(shape) + int(decay * 16))
    c = shape[1]
    train = _evaluator(15, shape, decay, training_mode=1)
    evaluate = _evaluator(15, shape, decay, training_mode=0)
    state = mr.init_bn_state(c, dtype=np.float64)
    o_mean, o_var = np.zeros(c), np.ones(c)
    for step, x in enumerate(batches, start=1):
        y, state, _ = mr.bn_forward(x, state, gamma, beta, decay=decay, eps=EPS)
        o_y, o_mean, o_var = _run(train, x, gamma, beta, o_mean, o_var)
        assert state is not None
        _assert_close(y, o_y, f"y, step {step}")
        _assert_close(state.running_mean, o_mean, f"running_mean, step {step}")
        _assert_close(state.running_var, o_var, f"running_var, step {step}")
    y_eval, _, _ = mr.bn_forward(batches[0], state, gamma, beta, eps=EPS, training=False)
    (o_y_eval,) = _run(evaluate, batches[0], gamma, beta, o_mean, o_var)
    _assert_close(y_eval, o_y_eval, "y (evaluation)")


def test_onnx_variance_is_biased_not_unbiased() -> None:
    """ONNX's running variance uses ``1/m``: MBN's ``estimator="unbiased"`` inference variance
    differs from it (by the ``m/(m-1)`` factor on the batch term) while the mean agrees."""
    shape = (4, 3)
    gamma, beta, batches = _data(shape, seed=7)
    x = batches[0]
    state = mr.init_state(3, dtype=np.float64)
    _, state, _ = mr.mbn_forward(
        x, state, gamma, beta, lam=0.5, tau=TAU, eps=EPS, estimator="unbiased"
    )
    _, o_mean, o_var = _run(
        _evaluator(15, shape, TAU, training_mode=1), x, gamma, beta, np.zeros(3), np.ones(3)
    )
    _assert_close(state.running_mean, o_mean, "running_mean")
    m = shape[0]
    var_b = (np.asarray(state.running_var) - TAU) / (1 - TAU)  # the unbiased batch variance
    _assert_close((o_var - TAU) / (1 - TAU), var_b * (m - 1) / m, "biased batch variance")
    assert _rel_err(state.running_var, o_var) > 1e3 * RTOL


def test_opset9_reference_returns_y_only() -> None:
    """Pins the first difference in the module docstring: opset 9's reference op produces no
    training outputs, so a model that declares ``mean, var, saved_mean, saved_var`` cannot run.
    If this starts to fail, ONNX returns them now: compare ``mean``/``var`` with MBN's
    ``moving_mean``/``moving_var`` in :func:`_mbn_against_onnx`."""
    helper, tp = onnx.helper, onnx.TensorProto
    shape, c = (4, 3), [3]
    stats = ["mean", "var", "saved_mean", "saved_var"]
    node = helper.make_node("BatchNormalization", INPUTS, ["Y", *stats], epsilon=1e-5, momentum=0.5)
    graph = helper.make_graph(
        [node],
        "bn_opset9_training_outputs",
        [helper.make_tensor_value_info("X", tp.DOUBLE, shape)]
        + [helper.make_tensor_value_info(n, tp.DOUBLE, c) for n in INPUTS[1:]],
        [helper.make_tensor_value_info("Y", tp.DOUBLE, shape)]
        + [helper.make_tensor_value_info(n, tp.DOUBLE, c) for n in stats],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    onnx.checker.check_model(model, full_check=True)  # valid ONNX: the schema allows them
    gamma, beta, batches = _data(shape, seed=3)
    with pytest.raises(RuntimeError, match="mean"):
        _run(ReferenceEvaluator(model), batches[0], gamma, beta, np.zeros(3), np.ones(3))
