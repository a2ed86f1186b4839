"""``mbn_torch`` modules: autograd, ``nn.BatchNorm2d`` parity, the core's MBN, checkpoints,
``torch.compile`` without recompiles, ``channels_last`` and input checks."""

from __future__ import annotations

import copy
import doctest
import importlib
import shutil
import warnings

import numpy as np
import pytest

import mbn_ref as mr

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import mbn_torch  # noqa: E402
from mbn_torch import (  # noqa: E402
    DynamicBatchNorm1d,
    DynamicBatchNorm2d,
    DynamicBatchNorm3d,
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
    MomentumBatchNorm3d,
)

SHAPE = (4, 3, 5, 6)


def _batches(dtype, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.normal(1.0 + i, 2.0, size=SHAPE), dtype=dtype) for i in range(n)]


def _dy(shape, dtype):
    n = int(np.prod(shape))
    return torch.linspace(-1, 1, n, dtype=dtype).reshape(shape) ** 3


def _affine(module, dtype):
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=dtype))
        module.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=dtype))


@pytest.mark.parametrize("name", ["mbn_torch", "mbn_torch._function", "mbn_torch.modules"])
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# -- autograd ------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("training", "lam"), [(True, 0.0), (True, 0.5), (False, 0.5)])
def test_gradcheck_float64(training, lam, affine):
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(0.5, 1.5, size=(3, 2, 2, 3)), requires_grad=True)
    w = torch.tensor([0.7, -1.3], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, 0.4], dtype=torch.float64, requires_grad=True)
    state = mr.MBNState(
        torch.tensor([0.3, -0.2], dtype=torch.float64),
        torch.tensor([1.5, 0.8], dtype=torch.float64),
        torch.tensor([0.1, 0.2], dtype=torch.float64),
        torch.tensor([0.9, 1.2], dtype=torch.float64),
        torch.tensor(3),
    )
    lam_t, tau_t = torch.tensor(lam, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)

    def f(x, *params):
        wb = params if affine else (None, None)
        y, _ = mbn_torch.momentum_batch_norm(x, *wb, state, lam_t, tau_t, training=training)
        return y

    inputs = (x, w, b) if affine else (x,)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_batch_statistics(affine):
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.7, -1.3], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, 0.4], dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        wb = params if affine else (None, None)
        return mbn_torch.batch_statistics_norm(x, *wb)

    assert torch.autograd.gradcheck(f, (x, w, b) if affine else (x,), atol=1e-8)


# -- lam = 0 is nn.BatchNorm2d -------------------------------------------------------------


def _train_steps(module, batches, dtype):
    record = []
    for x in batches:
        x = x.clone().requires_grad_(True)
        module.zero_grad()
        y = module(x)
        y.backward(_dy(x.shape, dtype))
        grads = [x.grad] + ([module.weight.grad, module.bias.grad] if module.affine else [])
        state = [module.running_mean, module.running_var, module.num_batches_tracked]
        state = [s.clone() for s in state if s is not None]
        record.append([y.detach().clone(), *[g.clone() for g in grads], *state])
    return record


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_lam0_reproduces_batchnorm2d(momentum, dtype, tol):
    ours = MomentumBatchNorm2d(3, momentum=momentum, dtype=dtype)
    ref = nn.BatchNorm2d(3, momentum=momentum, dtype=dtype)
    _affine(ours, dtype)
    _affine(ref, dtype)
    batches = _batches(dtype)
    got, want = _train_steps(ours, batches, dtype), _train_steps(ref, batches, dtype)
    worst = 0.0
    for step_got, step_want in zip(got, want, strict=True):
        for a, e in zip(step_got, step_want, strict=True):
            assert a.dtype == e.dtype and a.shape == e.shape
            worst = max(worst, float((a.double() - e.double()).abs().max()))
            torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    assert int(ours.num_batches_tracked) == 5
    # evaluation with the inference statistics
    ours.eval()
    ref.eval()
    x = batches[0] * 0.5
    torch.testing.assert_close(ours(x), ref(x), rtol=tol, atol=tol)
    print(f"max |ours - BatchNorm2d| ({dtype}, momentum={momentum}): {worst:.3g}")


def test_track_running_stats_false_is_batchnorm_without_stats():
    ours = MomentumBatchNorm2d(3, track_running_stats=False, dtype=torch.float64, lam=0.5)
    ref = nn.BatchNorm2d(3, track_running_stats=False, dtype=torch.float64)
    assert ours.running_mean is None and ours.moving_mean is None
    batches = _batches(torch.float64, n=2)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(ref, mode)()
        got = _train_steps(ours, batches, torch.float64)  # y, dx, dw, db (no state)
        want = _train_steps(ref, batches, torch.float64)
        for a, e in zip(got, want, strict=True):
            for u, v in zip(a, e, strict=True):
                torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


# -- MBN (lam > 0) is the core's Algorithm 1 -------------------------------------------------


@pytest.mark.parametrize("lam", [0.6, 0.999, 1.0])
def test_mbn_matches_core_trajectory(lam):
    momentum = 0.2
    module = MomentumBatchNorm2d(3, momentum=momentum, dtype=torch.float64, lam=lam)
    _affine(module, torch.float64)
    gamma, beta = module.weight.detach().numpy().copy(), module.bias.detach().numpy().copy()
    state = mr.init_state(3)
    tau = mr.conventions.decay_from_torch(momentum)
    for x in _batches(torch.float64):
        xn = x.numpy()
        y_core, state, ctx = mr.mbn_forward(
            xn, state, gamma, beta, lam=lam, tau=tau, estimator="unbiased"
        )
        dy = _dy(x.shape, torch.float64)
        dx_core, dg_core, db_core = mr.backward(dy.numpy(), ctx)
        xt = x.clone().requires_grad_(True)
        module.zero_grad()
        y = module(xt)
        y.backward(dy)
        pairs = [
            (y.detach(), y_core),
            (xt.grad, dx_core),
            (module.weight.grad, dg_core),
            (module.bias.grad, db_core),
            *[(getattr(module, k), getattr(state, k)) for k in mr.MBNState._fields],
        ]
        for a, e in pairs:
            np.testing.assert_allclose(a.detach().numpy(), e, rtol=1e-12, atol=1e-12)
    module.eval()
    y_eval, _, _ = mr.mbn_forward(xn, state, gamma, beta, training=False)
    np.testing.assert_allclose(module(x).detach().numpy(), y_eval, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lam", [0.0, 0.6])  # PyTorch's kernel (lam = 0), the kernel path
def test_two_forwards_then_one_backward(lam):
    """The second step updates the buffers in place before the first step's backward runs:
    each step's gradient still uses the statistics that normalized its own batch (and no
    in-place write makes autograd refuse the first step's backward)."""
    tau = 0.9
    module = MomentumBatchNorm2d(3, momentum=1 - tau, dtype=torch.float64, lam=lam)
    _affine(module, torch.float64)
    gamma, beta = module.weight.detach().numpy().copy(), module.bias.detach().numpy().copy()
    state, expected, loss = mr.init_state(3), [], 0.0
    xs = [x.clone().requires_grad_(True) for x in _batches(torch.float64, n=2)]
    for i, x in enumerate(xs):
        dy = _dy(x.shape, torch.float64) * (i + 1)
        _, state, ctx = mr.mbn_forward(
            x.detach().numpy(), state, gamma, beta, lam=lam, tau=tau, estimator="unbiased"
        )
        expected.append(mr.backward(dy.numpy(), ctx))
        loss = loss + (module(x) * dy).sum()
    loss.backward()
    for x, (dx, _, _) in zip(xs, expected, strict=True):
        np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        module.weight.grad.numpy(), expected[0][1] + expected[1][1], rtol=1e-12, atol=1e-12
    )


def test_buffers_updated_in_place():
    module = MomentumBatchNorm2d(3, lam=0.5)
    before = {k: v.data_ptr() for k, v in module.named_buffers()}
    module(torch.randn(SHAPE))
    assert {k: v.data_ptr() for k, v in module.named_buffers()} == before
    assert int(module.num_batches_tracked) == 1


def test_momentum_property_and_cumulative_flag():
    module = MomentumBatchNorm2d(3, momentum=0.25)
    assert module.momentum == 0.25 and float(module.inference_decay) == 0.75
    assert not bool(module.cumulative_average)
    module.momentum = None
    assert module.momentum is None and bool(module.cumulative_average)
    module.momentum = 0.1
    assert module.momentum == 0.1 and float(module.inference_decay) == 0.9
    with pytest.raises(ValueError, match="PyTorch momentum"):
        module.momentum = 1.5
    assert module.momentum == 0.1  # unchanged by the error
    module.momentum = None
    with pytest.raises(ValueError, match="PyTorch momentum"):
        module.momentum = -0.5
    assert module.momentum is None
    with pytest.raises(ValueError, match="lam"):
        MomentumBatchNorm2d(3, lam=2.0)


@pytest.mark.parametrize(
    ("cls", "shape"),
    [
        (MomentumBatchNorm1d, (4, 3)),
        (MomentumBatchNorm1d, (4, 3, 7)),
        (MomentumBatchNorm3d, (2, 3, 2, 3, 4)),
    ],
)
def test_1d_3d_match_batchnorm(cls, shape):
    ref_cls = {MomentumBatchNorm1d: nn.BatchNorm1d, MomentumBatchNorm3d: nn.BatchNorm3d}[cls]
    ours, ref = cls(3, dtype=torch.float64), ref_cls(3, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


# -- channels_last -------------------------------------------------------------------------


def test_channels_last_no_copy_of_input():
    module = MomentumBatchNorm2d(3, dtype=torch.float64, lam=0.5)
    ref = copy.deepcopy(module)
    x = torch.randn(SHAPE, dtype=torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x.requires_grad_(True)
    y = module(x_cl)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last)
    # the backward context keeps the caller's tensor itself, not a contiguous copy
    saved = [t for t in y.grad_fn.saved_tensors if t is not None and t.shape == x.shape]
    assert saved and saved[0].data_ptr() == x_cl.data_ptr()
    y.backward(_dy(SHAPE, torch.float64))
    y_ref.backward(_dy(SHAPE, torch.float64))
    torch.testing.assert_close(x_cl.grad, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    for k in mr.MBNState._fields:
        torch.testing.assert_close(getattr(module, k), getattr(ref, k), rtol=1e-12, atol=1e-12)


# -- checkpoints ---------------------------------------------------------------------------


def test_batchnorm2d_state_dict_loads_strict():
    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    _affine(ref, torch.float64)
    for x in _batches(torch.float64, n=3):
        ref(x)
    ours = MomentumBatchNorm2d(3, dtype=torch.float64, lam=0.7, momentum=0.05)
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
        assert torch.equal(getattr(ours, k), getattr(ref, k)), k
    assert torch.equal(ours.moving_mean, ref.running_mean)
    assert torch.equal(ours.moving_var, ref.running_var)
    assert float(ours.lam) == 0.7 and ours.momentum == 0.05  # the module's own decays
    ours.eval()
    ref.eval()
    x = _batches(torch.float64, n=1, seed=5)[0]
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_batchnorm2d_state_dict_nested_and_bad_key_fails():
    ref = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    ours = nn.Sequential(nn.Conv2d(3, 3, 1), MomentumBatchNorm2d(3))
    ours.load_state_dict(ref.state_dict(), strict=True)
    bad = dict(ref.state_dict())
    bad["1.unknown"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="unknown"):
        ours.load_state_dict(bad, strict=True)


def test_state_dict_round_trip_bit_exact():
    a = MomentumBatchNorm2d(3, lam=0.3, momentum=None)
    for x in _batches(torch.float32, n=2):
        a(x)
    b = MomentumBatchNorm2d(3)
    b.load_state_dict(a.state_dict(), strict=True)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and va.dtype == vb.dtype and torch.equal(va, vb), ka
    assert b.momentum is None and float(b.lam) == pytest.approx(0.3)


# -- torch.compile -------------------------------------------------------------------------


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


def _compiled_trajectory(backend, dtype, tol, *, dynamic=False):
    """Five training steps and one evaluation, eager twin vs compiled module, with ``lam``
    and the momentum changed before every step (``None`` once: the cumulative flag; ``lam``
    0 once: the eager twin then runs BN's kernel, the compiled one the MBN kernel path).

    Returns the compiled frame counts after each call."""
    cls = DynamicBatchNorm2d if dynamic else MomentumBatchNorm2d
    eager = cls(3, dtype=dtype, momentum=0.1)
    _affine(eager, dtype)
    compiled_module = copy.deepcopy(eager)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(compiled_module, backend=counter, fullgraph=True)
    momenta = [0.1, 0.15, None, 0.2, 0.3]
    lams = [0.5, 0.0, 0.7, 0.8, 0.9]
    names = (
        ["running_mean", "running_var", "num_batches_tracked"] if dynamic else mr.MBNState._fields
    )
    counts = []
    for step, x in enumerate(_batches(dtype)):
        for m in (eager, compiled_module):
            if not dynamic:
                m.lam.fill_(lams[step])
            m.momentum = momenta[step]
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = eager(xe), compiled(xc)
        dy = _dy(x.shape, dtype)
        ye.backward(dy)
        yc.backward(dy)
        torch.testing.assert_close(yc, ye, rtol=tol, atol=tol)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=tol, atol=tol)
        for p in ("weight", "bias"):
            g_c, g_e = getattr(compiled_module, p).grad, getattr(eager, p).grad
            torch.testing.assert_close(g_c, g_e, rtol=tol, atol=tol)
            getattr(compiled_module, p).grad = getattr(eager, p).grad = None
        for k in names:
            torch.testing.assert_close(
                getattr(compiled_module, k), getattr(eager, k), rtol=tol, atol=tol
            )
        counts.append(counter.frame_count)
    eager.eval()
    compiled_module.eval()
    x = _batches(dtype, n=1, seed=9)[0]
    torch.testing.assert_close(compiled(x), eager(x), rtol=tol, atol=tol)
    return counts


@pytest.mark.usefixtures("_fresh_dynamo")
def test_compile_fullgraph_lam_and_momentum_changes_do_not_recompile():
    counts = _compiled_trajectory("aot_eager", torch.float64, 1e-12)
    assert counts[0] >= 1
    assert counts == [counts[0]] * len(counts), f"recompiled: {counts}"
    print(f"aot_eager graphs after each step: {counts}")


@pytest.mark.usefixtures("_fresh_dynamo")
def test_compile_dynamic_batchnorm_momentum_changes_do_not_recompile():
    counts = _compiled_trajectory("aot_eager", torch.float64, 1e-12, dynamic=True)
    assert counts[0] >= 1
    assert counts == [counts[0]] * len(counts), f"recompiled: {counts}"


@pytest.mark.skipif(shutil.which("cc") is None, reason="inductor on CPU needs a C compiler")
@pytest.mark.usefixtures("_fresh_dynamo")
def test_compile_inductor_training_trajectory():
    counts = _compiled_trajectory("inductor", torch.float32, 2e-5)
    assert counts == [counts[0]] * len(counts), f"recompiled: {counts}"
    print(f"inductor graphs after each step: {counts}")


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "shape", "message"),
    [
        (MomentumBatchNorm1d, (4,), r"expected 2D or 3D input \(got 1D input\)"),
        (MomentumBatchNorm1d, (2, 3, 4, 5), r"expected 2D or 3D input \(got 4D input\)"),
        (MomentumBatchNorm2d, (4, 3), r"expected 4D input \(got 2D input\)"),
        (MomentumBatchNorm3d, (4, 3, 2, 2), r"expected 5D input \(got 4D input\)"),
        (MomentumBatchNorm2d, (4, 5, 2, 2), r"expected input with 3 channels .* 5 channels"),
    ],
)
def test_bad_input_raises_and_state_unchanged(cls, shape, message):
    module = cls(3, lam=0.5)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        module(torch.randn(shape))
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_loads_with_weights_only(tmp_path):
    a = MomentumBatchNorm2d(3, lam=0.3, momentum=None)
    a(torch.randn(SHAPE))
    path = tmp_path / "mbn.pt"
    torch.save(a.state_dict(), path)
    b = MomentumBatchNorm2d(3)
    b.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def test_reset_running_stats():
    m = MomentumBatchNorm2d(3, lam=0.5)
    m(torch.randn(SHAPE) + 3)
    m.reset_running_stats()
    fresh = MomentumBatchNorm2d(3, lam=0.5)
    for k in mr.MBNState._fields:
        assert torch.equal(getattr(m, k), getattr(fresh, k)), k
    with torch.no_grad():
        m.weight.fill_(3.0)
    m.reset_parameters()
    assert torch.equal(m.weight, fresh.weight) and torch.equal(m.bias, fresh.bias)
    assert "lam=0.5" in repr(m) and "momentum=0.1" in repr(m)


def test_docs_page_python_block_runs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "torch.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/torch.md", "exec"), {})


# -- the fused path (torch.batch_norm) and BN with a dynamic momentum ------------------------


class _CountBatchNorm(torch.overrides.TorchFunctionMode):
    """Counts calls of PyTorch's fused kernel (``torch.batch_norm``/``native_batch_norm``)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.batch_norm, torch.native_batch_norm):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _count_core_calls(monkeypatch, *names):
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(mr, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(mr, name, counted)
    return calls


@pytest.mark.parametrize(
    ("lam", "nonfinite", "dtype", "kernels", "path"),
    [
        (0.0, "propagate", torch.float32, 1, None),  # BN: nn.BatchNorm2d's very kernel
        (0.5, "propagate", torch.float32, 1, "kernel_terms"),  # BN kernels + the core's terms
        (0.5, "propagate", torch.float64, 1, "kernel_terms"),
        (0.5, "skip_update", torch.float32, 0, "mbn_forward"),  # the policy needs the core
        (0.0, "raise", torch.float32, 0, "mbn_forward"),
        (0.5, "propagate", torch.bfloat16, 0, "mbn_forward"),  # half precision on the CPU
    ],
)
def test_each_training_call_takes_its_path(monkeypatch, lam, nonfinite, dtype, kernels, path):
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    module = MomentumBatchNorm2d(3, lam=lam, nonfinite=nonfinite, dtype=state_dtype)
    x = torch.randn(SHAPE).to(dtype)
    calls = _count_core_calls(monkeypatch, "mbn_forward", "kernel_terms")
    with _CountBatchNorm() as mode:
        module(x)
    assert mode.calls == kernels
    assert calls == {k: int(k == path) for k in calls}


def test_input_of_another_dtype_than_the_state_takes_the_core(monkeypatch):
    module = MomentumBatchNorm2d(3, lam=0.5)  # float32 state
    calls = _count_core_calls(monkeypatch, "mbn_forward", "kernel_terms")
    module(torch.randn(SHAPE, dtype=torch.float64))
    assert calls == {"mbn_forward": 1, "kernel_terms": 0}


def test_evaluation_runs_the_kernel_whatever_lam():
    module = MomentumBatchNorm2d(3, lam=0.5).eval()
    with _CountBatchNorm() as mode:
        module(torch.randn(SHAPE))
    assert mode.calls == 1


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_and_core_paths_give_the_core_trajectory(momentum):
    """lam = 0 (BN's kernel), 0.5 (MBN on the kernels), 0 twice: every number is the core's."""
    dtype = torch.float64
    module = MomentumBatchNorm2d(3, momentum=momentum, dtype=dtype)
    _affine(module, dtype)
    gamma, beta = module.weight.detach().numpy().copy(), module.bias.detach().numpy().copy()
    state = mr.init_state(3)
    tau = None if momentum is None else 1 - momentum
    for lam, x in zip([0.0, 0.5, 0.0, 0.0], _batches(dtype, n=4), strict=True):
        module.lam.fill_(lam)
        y_core, state, ctx = mr.mbn_forward(
            x.numpy(), state, gamma, beta, lam=lam, tau=tau, estimator="unbiased"
        )
        dy = _dy(x.shape, dtype)
        dx_core, dg_core, db_core = mr.backward(dy.numpy(), ctx)
        xt = x.clone().requires_grad_(True)
        module.zero_grad()
        y = module(xt)
        y.backward(dy)
        pairs = [
            (y.detach(), y_core),
            (xt.grad, dx_core),
            (module.weight.grad, dg_core),
            (module.bias.grad, db_core),
            *[(getattr(module, k), getattr(state, k)) for k in mr.MBNState._fields],
        ]
        for a, e in pairs:
            np.testing.assert_allclose(a.detach().numpy(), e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    ("cls", "ref_cls", "shape"),
    [
        (DynamicBatchNorm2d, nn.BatchNorm2d, SHAPE),
        (DynamicBatchNorm1d, nn.BatchNorm1d, (6, 3)),
        (DynamicBatchNorm1d, nn.BatchNorm1d, (4, 3, 5)),
        (DynamicBatchNorm3d, nn.BatchNorm3d, (2, 3, 2, 3, 4)),
    ],
)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_dynamic_batchnorm_reproduces_batchnorm(cls, ref_cls, shape, momentum, dtype, tol):
    ours, ref = cls(3, momentum=momentum, dtype=dtype), ref_cls(3, momentum=momentum, dtype=dtype)
    _affine(ours, dtype)
    _affine(ref, dtype)
    rng = np.random.default_rng(3)
    batches = [torch.tensor(rng.normal(i, 2.0, size=shape), dtype=dtype) for i in range(5)]
    for a_step, e_step in zip(
        _train_steps(ours, batches, dtype), _train_steps(ref, batches, dtype), strict=True
    ):
        for a, e in zip(a_step, e_step, strict=True):
            assert a.dtype == e.dtype
            torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(batches[0]), ref(batches[0]), rtol=tol, atol=tol)


def test_dynamic_batchnorm_momentum_is_runtime_state_against_the_core():
    """A momentum changed every step (the cumulative average once) gives the core's state."""
    module = DynamicBatchNorm2d(3, dtype=torch.float64)
    state = mr.init_bn_state(3)
    for momentum, x in zip([0.1, 0.5, None, 0.05], _batches(torch.float64, n=4), strict=True):
        module.momentum = momentum
        decay = None if momentum is None else 1 - momentum
        y_core, state, _ = mr.bn_forward(x.numpy(), state, decay=decay, estimator="unbiased")
        np.testing.assert_allclose(module(x).detach().numpy(), y_core, rtol=1e-12, atol=1e-12)
        for k in mr.BNState._fields:
            np.testing.assert_allclose(getattr(module, k).numpy(), getattr(state, k), rtol=1e-12)


def test_dynamic_batchnorm_checkpoints():
    ref = nn.BatchNorm2d(3)
    ref(torch.randn(SHAPE) + 2)
    ours = DynamicBatchNorm2d(3, momentum=None)
    ours.load_state_dict(ref.state_dict(), strict=True)  # a BatchNorm2d checkpoint
    assert ours.momentum is None  # the decays keep the module's own values
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    again = DynamicBatchNorm2d(3)
    again.load_state_dict(ours.state_dict(), strict=True)
    assert again.momentum is None
    assert sorted(ours.state_dict()) == sorted(
        [*ref.state_dict(), "inference_decay", "cumulative_average"]
    )


def test_empty_batch_changes_nothing():
    """PyTorch counts an empty batch (and its running statistics become NaN); ours do not."""
    for module in (MomentumBatchNorm2d(3, lam=0.5), MomentumBatchNorm2d(3), DynamicBatchNorm2d(3)):
        module(torch.randn(SHAPE))
        before = {k: v.clone() for k, v in module.state_dict().items()}
        y = module(torch.randn(0, 3, 5, 6))
        assert y.shape == (0, 3, 5, 6)
        for k, v in module.state_dict().items():
            assert torch.equal(v, before[k]), k


# -- bad input: PyTorch-style messages, nothing changed --------------------------------------


def _assert_unchanged(module, before):
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all(), k


@pytest.mark.parametrize("cls", [MomentumBatchNorm2d, DynamicBatchNorm2d])
@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda m: m(torch.ones(SHAPE, dtype=torch.int64)), TypeError, "floating-point input"),
        (lambda m: m(torch.randn(3)), ValueError, r"expected 4D input \(got 1D input\)"),
        (lambda m: m(torch.randn(1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
        (lambda m: m(torch.randn(4, 2, 2, 2)), ValueError, "expected input with 3 channels"),
    ],
)
def test_bad_input_messages(cls, make, error, message):
    module = cls(3)
    module(torch.randn(SHAPE))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error, match=message):
        make(module)
    _assert_unchanged(module, before)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_one_value_per_channel(lam):
    """Training: refused whatever lam (the unbiased running_var needs two values; with lam = 0
    the batch alone normalizes); evaluation: fine, as in PyTorch."""
    module = MomentumBatchNorm1d(3, lam=lam)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        module(torch.randn(1, 3))
    assert int(module.num_batches_tracked) == 0
    module.eval()
    assert module(torch.randn(1, 3)).shape == (1, 3)


@pytest.mark.parametrize(
    ("name", "value"),
    [("lam", 1.5), ("lam", -0.1), ("lam", float("nan")), ("inference_decay", 2.0)],
)
def test_decay_set_out_of_range_is_refused_at_the_next_call(name, value):
    module = MomentumBatchNorm2d(3, lam=0.5)
    module(torch.randn(SHAPE))
    getattr(module, name).fill_(value)  # bypasses every setter: the module checks it
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{name} must be a decay .* in \[0, 1\]"):
        module(torch.randn(SHAPE))
    _assert_unchanged(module, before)
    getattr(module, name).fill_(0.5)
    module(torch.randn(SHAPE))  # fine again


def test_host_decay_read_once_per_change(monkeypatch):
    """The eager module reads its decays on the host only after they changed."""
    from mbn_torch import modules

    reads = []
    original = modules._HostDecay.read

    def spy(self, buffer, name):
        before = self._version
        value = original(self, buffer, name)
        if self._version != before:
            reads.append(name)
        return value

    monkeypatch.setattr(modules._HostDecay, "read", spy)
    module = MomentumBatchNorm2d(3, lam=0.5)
    for _ in range(3):
        module(torch.randn(SHAPE))
    assert sorted(reads) == ["inference_decay", "lam"]
    module.lam.fill_(0.6)
    module(torch.randn(SHAPE))
    assert sorted(reads) == ["inference_decay", "lam", "lam"]


def _nan_batch():
    x = torch.randn(SHAPE)
    x[0, 1, 0, 0] = float("nan")
    return x


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_nan_input_under_each_policy(lam):
    # propagate (PyTorch's behaviour): the channel's statistics become NaN
    module = MomentumBatchNorm2d(3, lam=lam)
    module(_nan_batch())
    assert module.running_mean[1].isnan() and not module.running_mean[0].isnan()
    # skip_update: the output is NaN where the statistics are, the state is unchanged
    module = MomentumBatchNorm2d(3, lam=lam, nonfinite="skip_update")
    module(torch.randn(SHAPE))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module(_nan_batch())
    _assert_unchanged(module, before)
    # raise: a clear error, nothing changed
    module = MomentumBatchNorm2d(3, lam=lam, nonfinite="raise")
    module(torch.randn(SHAPE))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(mr.NonFiniteError, match="NaN or Inf"):
        module(_nan_batch())
    _assert_unchanged(module, before)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        MomentumBatchNorm2d(3, nonfinite="ignore")


@pytest.mark.parametrize("momentum", [0.2, None])
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_state_after_a_nan_batch_follows_the_core(lam, momentum):
    """``propagate``, then a finite batch: every buffer is the core's, NaN for NaN. Eq. 8
    keeps the moving statistics NaN at every ``lam`` (``lam*NaN`` is NaN even at 0), on
    PyTorch's kernel at ``lam = 0`` (update rate 1) as on the core, with a fixed decay and
    with the cumulative average."""
    module = MomentumBatchNorm2d(3, lam=lam, momentum=momentum, dtype=torch.float64)
    state = mr.init_state(3)
    batches = [_nan_batch().double(), _batches(torch.float64, n=1)[0]]
    for x in batches:
        module(x)
        n = int(state.num_batches_tracked)
        tau = 0.8 if momentum else n / (n + 1)  # the cumulative average's decay
        _, state, _ = mr.mbn_forward(x.numpy(), state, lam=lam, tau=tau, estimator="unbiased")
    assert module.moving_mean[1].isnan() and module.running_var[1].isnan()
    for key in mr.MBNState._fields:
        np.testing.assert_allclose(
            getattr(module, key).numpy(), getattr(state, key), rtol=1e-12, err_msg=key
        )


def test_wrong_checkpoint_loads_nothing_of_the_module():
    module = MomentumBatchNorm2d(3, lam=0.5)
    module(torch.randn(SHAPE))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    bad = MomentumBatchNorm2d(3, lam=0.2)
    bad(torch.randn(SHAPE) + 5)
    sd = bad.state_dict()
    sd["running_var"] = torch.ones(4)  # a wrong shape among good keys
    with pytest.raises(RuntimeError, match=r"size mismatch for running_var(.|\n)*nothing of it"):
        module.load_state_dict(sd)
    _assert_unchanged(module, before)
    sd = bad.state_dict()
    sd["moving_mean"] = 3.0  # not a tensor
    with pytest.raises(RuntimeError, match="moving_mean: expected a tensor"):
        module.load_state_dict(sd)
    _assert_unchanged(module, before)


# -- AMP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "cls_lam", [(MomentumBatchNorm2d, 0.5), (MomentumBatchNorm2d, 0.0), (DynamicBatchNorm2d, None)]
)
def test_autocast(autocast_dtype, cls_lam):
    """Autocast: the output in the autocast dtype, statistics in float32, the saved
    activation in the input's dtype, values as float32 computes them from the same input."""
    cls, lam = cls_lam
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    module = cls(4) if lam is None else cls(4, lam=lam)
    twin = copy.deepcopy(module)
    x = torch.randn(4, 3, 8, 8)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=autocast_dtype),
    ):
        h = conv(x)
        y = module(h)
    assert h.dtype == y.dtype == autocast_dtype
    assert all(getattr(module, k).dtype == torch.float32 for k in ("running_mean", "running_var"))
    activations = [t for t in saved if t.shape == h.shape]
    assert activations and all(t.dtype == autocast_dtype for t in activations)
    want = twin(h.detach().float())
    torch.testing.assert_close(y.float(), want, rtol=0, atol=0.05)
    torch.testing.assert_close(module.running_var, twin.running_var, rtol=1e-5, atol=1e-6)
    y.float().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
