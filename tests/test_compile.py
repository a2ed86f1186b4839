"""The core compiles in one graph and does not recompile when a decay's value changes.

``torch.compile(fullgraph=True)`` of a ``torch.autograd.Function`` built the way an adapter
builds it (the core's forward, the context saved with ``save_for_backward`` through
:meth:`mbn_ref.NormContext.split`, the core's backward) and ``jax.jit`` of the forward and
backward: BN and MBN, training and evaluation, 0-d array decays, ``nonfinite="skip_update"``
and the cumulative average (``decay=None``/``tau=None``). Each case runs two steps with
different decay values, counts the graphs (1), and compares every output with the eager
core. The ``aot_eager`` backend traces exactly what inductor would compile; one case runs
inductor itself.
"""

from __future__ import annotations

import shutil
import warnings
from typing import Any

import numpy as np
import pytest

import mbn_ref as mr

torch = pytest.importorskip("torch")
import array_api_compat.torch as txp  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

# (algorithm, training, nonfinite, cumulative): the decays are 0-d tensors unless cumulative
CASES = [
    ("bn", True, "propagate", False),
    ("bn", True, "skip_update", False),
    ("bn", True, "propagate", True),
    ("bn", False, "propagate", False),
    ("mbn", True, "propagate", False),
    ("mbn", True, "skip_update", False),
    ("mbn", True, "skip_update", True),
    ("mbn", False, "propagate", False),
]
CASE_IDS = [
    f"{a}-{'train' if t else 'eval'}-{n}{'-cumulative' if c else ''}" for a, t, n, c in CASES
]
DECAYS = [(0.5, 0.9), (0.875, 0.7)]  # (lam or BN decay, tau) of the two steps


def _step_fn(algorithm: str, training: bool, nonfinite: str, cumulative: bool, xp: Any) -> Any:
    """``step(x, gamma, beta, *state, lam, tau) -> (y, *new_state)`` as an autograd.Function."""
    forward_kw: dict[str, Any] = dict(training=training, nonfinite=nonfinite, xp=xp)
    state_type = mr.BNState if algorithm == "bn" else mr.MBNState
    n_state = len(state_type._fields)

    def forward_core(x: Any, g: Any, b: Any, state: Any, lam: Any, tau: Any) -> Any:
        if algorithm == "bn":
            return mr.bn_forward(x, state, g, b, decay=None if cumulative else lam, **forward_kw)
        return mr.mbn_forward(
            x, state, g, b, lam=lam, tau=None if cumulative else tau, **forward_kw
        )

    class Step(torch.autograd.Function):
        @staticmethod
        def forward(x: Any, g: Any, b: Any, *rest: Any) -> Any:
            state, (lam, tau) = state_type(*rest[:n_state]), rest[n_state:]
            y, new_state, ctx = forward_core(x, g, b, state, lam, tau)
            arrays, static = ctx.split()
            return (y, *new_state, arrays, static)

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            ctx.save_for_backward(*output[-2])
            ctx.static = output[-1]
            ctx.mark_non_differentiable(*output[1 : 1 + n_state])

        @staticmethod
        def backward(ctx: Any, dy: Any, *unused: Any) -> Any:
            core_ctx = mr.NormContext.join(ctx.saved_tensors, ctx.static)
            dx, dg, db = mr.backward(dy, core_ctx, xp=xp)
            return (dx, dg, db) + (None,) * (n_state + 2)

    def step(x: Any, g: Any, b: Any, state: Any, lam: Any, tau: Any) -> Any:
        out = Step.apply(x, g, b, *state, lam, tau)
        # state returned unchanged (evaluation) comes back through autograd: detach it
        return out[0], state_type(*(s.detach() for s in out[1 : 1 + n_state]))

    return step


def _inputs(algorithm: str, dtype: Any, n: int = 6) -> tuple[Any, ...]:
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(2.0, 1.5, size=(n, 3, 4, 5)), dtype=dtype, requires_grad=True)
    g = torch.tensor([0.5, 1.0, 2.0], dtype=dtype, requires_grad=True)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=dtype, requires_grad=True)
    init = mr.init_bn_state if algorithm == "bn" else mr.init_state
    state = init(3, xp=torch, dtype=dtype)
    return x, g, b, state


def _run(step: Any, algorithm: str, dtype: Any, counter: Any = None) -> list[list[Any]]:
    """Two steps with different decays; every output, state field and gradient, per step.

    With ``counter``, the graphs compiled for the first step (dynamo may restart its first
    analysis, e.g. to turn 0-d tensors into graph inputs) must be all there is: the second
    step, with new decay values, compiles nothing.
    """
    x, g, b, state = _inputs(algorithm, dtype)
    record = []
    graphs_after_first_step = None
    for lam, tau in DECAYS:
        for p in (x, g, b):
            p.grad = None
        y, state = step(x, g, b, state, torch.tensor(lam, dtype=dtype), torch.tensor(tau))
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape)).sum().backward()
        record.append([y.detach(), *state, x.grad, g.grad, b.grad])
        if counter is not None:
            assert counter.frame_count >= 1
            if graphs_after_first_step is None:
                graphs_after_first_step = counter.frame_count
            assert counter.frame_count == graphs_after_first_step, "recompiled: decay changed"
    return record


def _compare(got: list[list[Any]], want: list[list[Any]], rtol: float, atol: float) -> None:
    for step_got, step_want in zip(got, want, strict=True):
        for a, e in zip(step_got, step_want, strict=True):
            np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=rtol, atol=atol)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # array-api-compat's lru_cache notes under dynamo
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize(("algorithm", "training", "nonfinite", "cumulative"), CASES, ids=CASE_IDS)
def test_torch_compile_one_graph_across_decay_changes(algorithm, training, nonfinite, cumulative):
    step = _step_fn(algorithm, training, nonfinite, cumulative, txp)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    got = _run(compiled, algorithm, torch.float64, counter)
    assert counter.op_count > 0
    _compare(got, _run(step, algorithm, torch.float64), rtol=1e-12, atol=1e-12)


def test_torch_compile_finds_the_namespace_itself():
    """Without ``xp=``, array-api-compat's namespace lookup is traced into the graph too."""
    step = _step_fn("mbn", True, "propagate", False, None)
    counter = CompileCounterWithBackend("aot_eager")
    got = _run(torch.compile(step, backend=counter, fullgraph=True), "mbn", torch.float64, counter)
    _compare(got, _run(step, "mbn", torch.float64), rtol=1e-12, atol=1e-12)


def test_torch_compile_dynamic_batch_size_one_graph():
    """``dynamic=True``: the count is a symbolic integer; two batch sizes share one graph."""
    step = _step_fn("mbn", True, "propagate", False, txp)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    graphs = []
    for n in (6, 7):  # distinct from the other dims (dynamo duck-sizes equal sizes)
        x, g, b, state = _inputs("mbn", torch.float64, n)
        lam, tau = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.9)
        y, new = compiled(x, g, b, state, lam, tau)
        y_eager, new_eager = step(x.detach(), g, b, state, lam, tau)
        np.testing.assert_allclose(y.detach().numpy(), y_eager.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(new.running_var.numpy(), new_eager.running_var.numpy())
        graphs.append(counter.frame_count)
    assert graphs[0] >= 1 and graphs[1] == graphs[0], graphs


@pytest.mark.skipif(shutil.which("cc") is None, reason="inductor on CPU needs a C compiler")
def test_torch_inductor_mbn_training_step():
    step = _step_fn("mbn", True, "skip_update", False, txp)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    got = _run(compiled, "mbn", torch.float32, counter)
    _compare(got, _run(step, "mbn", torch.float32), rtol=2e-5, atol=2e-5)


# -- JAX ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "training", "nonfinite", "cumulative"), CASES, ids=CASE_IDS)
def test_jax_jit_one_trace_across_decay_changes(algorithm, training, nonfinite, cumulative):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    traces = []

    def step(x, g, b, state, lam, tau, dy):
        traces.append(1)
        kw = dict(training=training, nonfinite=nonfinite)
        if algorithm == "bn":
            y, state, ctx = mr.bn_forward(x, state, g, b, decay=None if cumulative else lam, **kw)
        else:
            y, state, ctx = mr.mbn_forward(
                x, state, g, b, lam=lam, tau=None if cumulative else tau, **kw
            )
        return (y, state, *mr.backward(dy, ctx))

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.5, size=(6, 3, 4, 5))
    dy = np.linspace(-1.0, 1.0, x.size).reshape(x.shape)
    g, b = np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.3])
    init = mr.init_bn_state if algorithm == "bn" else mr.init_state
    jitted = jax.jit(step)
    state_j, state_np = init(3, xp=jnp), init(3)
    for lam, tau in DECAYS:
        arrays = (jnp.asarray(x), jnp.asarray(g), jnp.asarray(b))
        out_j = jitted(*arrays, state_j, jnp.asarray(lam), jnp.asarray(tau), jnp.asarray(dy))
        traces_after_jit = len(traces)
        out_np = step(x, g, b, state_np, np.asarray(lam), np.asarray(tau), dy)
        del traces[traces_after_jit:]
        state_j, state_np = out_j[1], out_np[1]
        flat_j = [out_j[0], *out_j[1], *out_j[2:]]
        flat_np = [out_np[0], *out_np[1], *out_np[2:]]
        for a, e in zip(flat_j, flat_np, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-12, atol=1e-12)
    assert len(traces) == 1, "retraced when a decay changed"
