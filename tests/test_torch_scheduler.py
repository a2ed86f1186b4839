"""``mbn_torch.scheduler.MomentumScheduler``: the paper's Eq. 11/12 per epoch and per
iteration, any schedule, the plateau and gradient-noise controllers (the gradient never goes
to the host), checkpoints that resume bit for bit, bad input, and ``torch.compile`` without
recompiles."""

from __future__ import annotations

import copy
import io
import math
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from mbn_ref import schedules  # noqa: E402
from mbn_ref.schedules import GradientNoiseController, PlateauController  # noqa: E402
from mbn_torch import modules as mbn_modules  # noqa: E402
from mbn_torch.modules import (  # noqa: E402
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
    MomentumBatchNorm3d,
)
from mbn_torch.scheduler import MomentumScheduler  # noqa: E402

DynamicBatchNorm2d = getattr(mbn_modules, "DynamicBatchNorm2d", None)
needs_dynamic = pytest.mark.skipif(
    DynamicBatchNorm2d is None, reason="mbn_torch.modules has no DynamicBatchNorm2d yet"
)

F64 = torch.float64


# -- models --------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, dtype=F64)
        self.norm = MomentumBatchNorm2d(3, dtype=F64, momentum=None)  # the flag gets cleared
        self.inner = nn.ModuleDict({"norm3d": MomentumBatchNorm3d(3, dtype=F64)})

    def forward(self, x):
        y = torch.relu(self.norm(self.conv(x)))
        return self.inner["norm3d"](y.unsqueeze(2)).squeeze(2)


class Nested(nn.Module):
    """MBN 1d/2d/3d at several depths (and dynamic BN where it exists)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        extra = [DynamicBatchNorm2d(3, dtype=F64)] if DynamicBatchNorm2d is not None else []
        self.tail = nn.Sequential(*extra, nn.Flatten(), nn.Linear(3 * 4 * 4, 5, dtype=F64))
        self.head = MomentumBatchNorm1d(5, dtype=F64)

    def forward(self, x):
        return self.head(self.tail(self.block(x)))


def nested(seed: int = 0) -> Nested:
    torch.manual_seed(seed)
    return Nested()


def ours(model):
    return [m for m in model.modules() if hasattr(m, "inference_decay")]


def mbns(model):
    return [m for m in model.modules() if isinstance(m, mbn_modules._MomentumBatchNorm)]


def assert_applied(model, lam, tau, cumulative=False):
    """Every MBN module holds ``lam``, every module of ours ``tau`` (exactly, float64)."""
    assert mbns(model)
    for m in mbns(model):
        assert float(m.lam) == lam, (m, float(m.lam), lam)
    for m in ours(model):
        assert bool(m.cumulative_average) is cumulative
        if tau is not None:
            assert float(m.inference_decay) == tau


def same(a, b):
    """Equal state dicts: same keys, equal Python values, equal tensors (dtype included)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def train_step(model, opt, x):
    opt.zero_grad()
    loss = (model(x) ** 2).mean() + model(x).sum() * 0.01
    loss.backward()
    opt.step()
    return loss.item()


def batches(n, seed=1):
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.normal(0.5, 1.5, size=(4, 2, 4, 4)), dtype=F64) for _ in range(n)]


# -- the paper's defaults ------------------------------------------------------------------


def test_paper_defaults_per_epoch_on_every_module():
    model = nested()
    total, m = 10, 2
    sched = MomentumScheduler(model, batch_size=m, total_epochs=total)
    tau = schedules.mbn_tau(batch_size=m)
    assert tau == 0.85 ** (2 / 32)
    for epoch in range(1, total + 3):  # the paper's 1-indexed epoch; past T it stays at lam(T)
        lam = schedules.mbn_lambda(epoch, total_epochs=total, batch_size=m)
        assert sched.last_step == sched.count == epoch - 1
        assert sched.get_last_lam() == lam and sched.get_last_tau() == tau
        assert_applied(model, lam, tau)
        sched.step()
    assert sched.get_last_lam() == 1 - m / 32  # lam(T)
    assert len(mbns(model)) == 3 and len(ours(model)) == 3 + (DynamicBatchNorm2d is not None)


def test_paper_defaults_per_iteration_in_fractional_epochs():
    model = nested()
    total, m, k = 4, 4, 5
    per_epoch = MomentumScheduler(copy.deepcopy(model), batch_size=m, total_epochs=total)
    sched = MomentumScheduler(model, batch_size=m, total_epochs=total, steps_per_epoch=k)
    eq11 = schedules.mbn_lambda_schedule(total_epochs=total, batch_size=m)
    seen = []
    for step in range(total * k + 1):
        assert sched.count == step / k
        lam = eq11(step / k)
        assert lam == schedules.mbn_lambda(1 + step / k, total_epochs=total, batch_size=m)
        assert_applied(model, lam, schedules.mbn_tau(batch_size=m))
        if step % k == 0:  # at every epoch boundary: the per-epoch value
            assert lam == per_epoch.get_last_lam()
            per_epoch.step()
        seen.append(sched.get_last_lam())
        sched.step()
    assert seen == sorted(seen) and len(set(seen[: (total - 1) * k + 1])) == (total - 1) * k + 1


def test_other_paper_constants():
    model = nested()
    MomentumScheduler(model, batch_size=8, total_epochs=3, ideal_batch_size=64, tau0=0.9)
    assert_applied(model, 0.0, schedules.mbn_tau(batch_size=8, ideal_batch_size=64, tau0=0.9))


# -- any schedule --------------------------------------------------------------------------

SCHEDULES = {
    "constant": 0.7,
    "linear": schedules.linear(0.1, 0.9, num_steps=6),
    "cosine": schedules.cosine(0.0, 0.95, num_steps=5),
    "exponential": schedules.exponential(0.99, 0.9, end=0.5),
    "piecewise": schedules.piecewise_constant([2, 5], [0.2, 0.5, 0.8]),
    "join": schedules.join([schedules.constant(0.3), schedules.linear(0.3, 0.6, 3)], [3]),
    "update-rate": schedules.from_update_rate(schedules.linear(0.9, 0.1, num_steps=4)),
    "lam-cumulative": schedules.cumulative(),  # for lam, an ordinary schedule c/(c+1)
    "lambda": lambda count: 0.5 + 0.05 * math.sin(count),
}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps_per_epoch", [None, 3])
def test_any_schedule_for_lam_and_tau(name, steps_per_epoch):
    source = SCHEDULES[name]
    fn = source if callable(source) else schedules.constant(source)
    tau_source = schedules.linear(0.8, 0.99, num_steps=4)
    model = nested()
    sched = MomentumScheduler(model, lam=source, tau=tau_source, steps_per_epoch=steps_per_epoch)
    for step in range(9):
        count = step if steps_per_epoch is None else step / steps_per_epoch
        assert sched.count == count
        assert sched.get_last_lam() == fn(count) and sched.get_last_tau() == tau_source(count)
        assert_applied(model, fn(count), tau_source(count))
        sched.step()


def test_cumulative_tau_is_the_modules_flag():
    """tau=schedules.cumulative(): the exact cumulative average of every batch."""
    model = MomentumBatchNorm2d(2, dtype=F64, momentum=0.3)
    sched = MomentumScheduler(model, lam=0.0, tau=schedules.cumulative())
    assert model.momentum is None and sched.get_last_tau() is None
    means = []
    for x in batches(3):
        means.append(x.mean(dim=(0, 2, 3)))
        model(x)
        sched.step()
        assert bool(model.cumulative_average)
    torch.testing.assert_close(model.running_mean, torch.stack(means).mean(0), rtol=0, atol=1e-15)
    assert sched.state_dict()["tau"] is None


def test_keep_leaves_the_modules_alone():
    model = nested()
    for m in mbns(model):
        m.lam.fill_(0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sched = MomentumScheduler(model, lam="keep", tau="keep")
    sched.step()
    assert sched.get_last_lam() is None and sched.get_last_tau() is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    sched = MomentumScheduler(model, lam="keep", tau=0.5)
    assert_applied(model, 0.25, 0.5)


def test_a_changed_buffer_is_written_again_an_unchanged_one_is_not():
    model = nested()
    sched = MomentumScheduler(model, lam=0.5, tau=0.9)
    norm = model.block.norm
    versions = (norm.lam._version, norm.inference_decay._version)
    sched.step()  # same values, untouched buffers: no write (the modules' host cache holds)
    assert (norm.lam._version, norm.inference_decay._version) == versions
    norm.lam.fill_(0.1)
    model.head.momentum = None
    sched.step()
    assert_applied(model, 0.5, 0.9)
    model.float()  # new buffer tensors (float32): written at the next step
    sched.step()
    assert norm.lam.dtype == torch.float32 and float(norm.lam) == np.float32(0.5)


# -- controllers ---------------------------------------------------------------------------


def test_plateau_controller_with_step_metric():
    metrics = [1.0, 0.9, 0.95, 0.8, 0.85, 0.86, 0.7]
    ctl = PlateauController(initial=0.9, step_up=0.02, step_down=0.01)
    model = nested()
    sched = MomentumScheduler(model, lam=ctl, batch_size=4)
    assert_applied(model, 0.9, schedules.mbn_tau(batch_size=4))
    state = ctl.init()
    for i, v in enumerate(metrics):
        state = ctl.update(state, v)
        sched.step(torch.tensor(v, dtype=F64) if i % 2 else v)  # a 0-d tensor is read once
        assert sched.get_last_lam() == state.decay
        assert_applied(model, state.decay, schedules.mbn_tau(batch_size=4))
    assert sched.state_dict()["lam_controller"] == ctl.state_to_dict(state)
    with pytest.raises(ValueError, match=r"step\(metric\)"):
        sched.step()
    plain = MomentumScheduler(nested(), lam=0.5, tau=0.9)
    with pytest.raises(ValueError, match="PlateauController"):
        plain.step(0.3)


def test_plateau_controller_on_tau_of_dynamic_bn_only():
    if DynamicBatchNorm2d is None:
        pytest.skip("mbn_torch.modules has no DynamicBatchNorm2d yet")
    model = nn.Sequential(nn.Conv2d(2, 3, 1), DynamicBatchNorm2d(3))
    sched = MomentumScheduler(model, tau=PlateauController())  # no MBN: lam is not driven
    sched.step(1.0)
    assert sched.get_last_lam() is None and float(model[1].inference_decay) == 0.91
    assert model[1].momentum == pytest.approx(0.09)


def set_grads(params, rng):
    for i, p in enumerate(params):
        p.grad = torch.tensor(0.1 * (i + 1) + rng.standard_normal(p.shape), dtype=p.dtype)


def noise_run(sched, params, steps, seed=3):
    rng = np.random.default_rng(seed)
    decays, flats = [], []
    for _ in range(steps):
        set_grads(params, rng)
        flats.append(np.concatenate([p.grad.numpy().ravel() for p in params]))
        sched.step()
        decays.append(sched.get_last_lam())
    return decays, flats


@pytest.mark.parametrize("subset", [False, True], ids=["all-parameters", "parameters="])
def test_gradient_noise_controller_matches_the_numpy_core(subset):
    ctl = GradientNoiseController(batch_size=4, alpha=0.2, warmup_steps=3)
    model = nested()
    params = [p for p in model.parameters() if p.requires_grad]
    if subset:
        params = params[::2]
    kwargs = {"parameters": iter(params)} if subset else {}
    sched = MomentumScheduler(model, lam=ctl, tau=0.9, **kwargs)
    assert_applied(model, 0.9, 0.9)  # the controller's initial decay
    decays, flats = noise_run(sched, params, 12)
    state, ref = ctl.init(), []
    for g in flats:
        state = ctl.update(state, g)
        ref.append(state.decay)
    assert len(set(ref[3:])) > 5
    np.testing.assert_allclose(decays, ref, rtol=0, atol=1e-12)
    assert_applied(model, decays[-1], 0.9)
    moments = sched.state_dict()["lam_controller"]
    assert isinstance(moments["mean"], torch.Tensor) and moments["mean"].dtype == F64
    np.testing.assert_array_equal(moments["mean"].numpy(), state.mean)


def test_gradient_noise_never_copies_the_gradient_to_the_host(monkeypatch):
    """Every host conversion of a tensor with more than 8 elements fails during step()."""
    ctl = GradientNoiseController(batch_size=4, alpha=0.2, warmup_steps=2)
    model = nested()
    params = [p for p in model.parameters() if p.requires_grad]
    sched = MomentumScheduler(model, lam=ctl, tau=0.9)
    rng = np.random.default_rng(0)
    originals = {}

    def guard(name):
        original = originals[name] = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if self.numel() > 8:
                raise AssertionError(f"Tensor.{name} of {self.numel()} elements")
            return original(self, *args, **kwargs)

        return guarded

    for _ in range(6):
        set_grads(params, rng)  # (uses numpy, outside the guard)
        with monkeypatch.context() as mp:
            for name in ("numpy", "cpu", "tolist", "__array__"):
                mp.setattr(torch.Tensor, name, guard(name))
            with pytest.raises(AssertionError):
                np.asarray(params[0].grad)  # the guard works
            sched.step()
    assert sched.state_dict()["lam_controller"]["num_updates"] == 6
    assert sched.get_last_lam() != 0.9  # past the warm-up: the sums were read


def test_gradient_noise_missing_grad_changes_nothing():
    model = nested()
    sched = MomentumScheduler(model, lam=GradientNoiseController(batch_size=4), tau=0.9)
    before = sched.state_dict()
    with pytest.raises(RuntimeError, match=r"block\.conv\.weight has no \.grad"):
        sched.step()
    assert same(sched.state_dict(), before) and sched.last_step == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gradient_noise_on_cuda_matches_cpu():
    """CUDA gradients (which NumPy refuses): the same decays, moments on the GPU."""
    ctl = GradientNoiseController(batch_size=4, alpha=0.2, warmup_steps=3)
    cpu_model = nested()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    cpu_sched = MomentumScheduler(cpu_model, lam=ctl, tau=0.9)
    gpu_sched = MomentumScheduler(gpu_model, lam=ctl, tau=0.9)
    cpu_params, gpu_params = list(cpu_model.parameters()), list(gpu_model.parameters())
    rng = np.random.default_rng(2)
    for _ in range(10):
        set_grads(cpu_params, rng)
        for c, g in zip(cpu_params, gpu_params, strict=True):
            g.grad = c.grad.cuda()
        cpu_sched.step()
        gpu_sched.step()
        assert gpu_sched.get_last_lam() == pytest.approx(cpu_sched.get_last_lam(), abs=1e-12)
    assert float(gpu_model.head.lam) == pytest.approx(gpu_sched.get_last_lam(), abs=0)
    state = gpu_sched.state_dict()
    assert state["lam_controller"]["mean"].is_cuda
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    cpu_sched.load_state_dict(torch.load(buffer, weights_only=True))  # moments on the GPU...
    assert cpu_sched.state_dict()["lam_controller"]["mean"].device.type == "cpu"  # ...moved


# -- checkpoints ---------------------------------------------------------------------------

CONFIGS = {
    "paper-per-iteration": lambda: {"batch_size": 4, "total_epochs": 3, "steps_per_epoch": 2},
    "plateau": lambda: {"lam": PlateauController(step_up=0.03), "tau": schedules.cumulative()},
    "gradient-noise": lambda: {
        "lam": GradientNoiseController(batch_size=4, alpha=0.3, warmup_steps=2),
        "tau": PlateauController(initial=0.95, max_decay=0.99, min_decay=0.9),
    },
}


def run(config, model, opt, sched, xs):
    decays = []
    for x in xs:
        loss = train_step(model, opt, x)
        needs_metric = any(isinstance(v, PlateauController) for v in config.values())
        sched.step(loss) if needs_metric else sched.step()
        decays.append((sched.get_last_lam(), sched.get_last_tau()))
    return decays


def fresh(config):
    model = nested(seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, MomentumScheduler(model, **config)


@pytest.mark.parametrize("name", CONFIGS)
def test_interrupted_and_resumed_run_equals_uninterrupted(name):
    config = CONFIGS[name]()
    xs = batches(8)
    model, opt, sched = fresh(config)
    full_decays = run(config, model, opt, sched, xs)
    full_state = model.state_dict()

    model, opt, sched = fresh(config)
    first = run(config, model, opt, sched, xs[:4])
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "mbn": sched.state_dict()}, buffer
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model, opt, sched = fresh(config)  # applies the count-0 values...
    sched.load_state_dict(checkpoint["mbn"])  # ...undone here, before the model's state loads
    lam, tau = checkpoint["mbn"]["lam"], checkpoint["mbn"]["tau"]
    assert (lam, tau) == first[-1] and sched.last_step == 4
    assert_applied(model, lam, tau, cumulative=tau is None)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    rest = run(config, model, opt, sched, xs[4:])
    assert first + rest == full_decays  # bit for bit
    assert len({d for d, _ in full_decays}) > 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, full_state[key]), key


def test_gradient_noise_moments_are_tensors_in_the_checkpoint():
    model, opt, sched = fresh(CONFIGS["gradient-noise"]())
    d0 = sched.state_dict()["lam_controller"]
    assert d0["num_updates"] == 0 and d0["mean"].shape == (0,)
    run(CONFIGS["gradient-noise"](), model, opt, sched, batches(2))
    d = sched.state_dict()
    n = sum(p.numel() for p in model.parameters())
    assert d["lam_controller"]["mean"].shape == (n,)
    assert set(d) == {"last_step", "lam", "tau", "lam_controller", "tau_controller"}
    # everything else is plain Python
    assert all(
        type(v) in (int, float, type(None), dict) for k, v in d.items() if k != "lam_controller"
    )
    # the JSON form (lists) loads too, onto the parameters' device
    ctl_dict = dict(d["lam_controller"], mean=d["lam_controller"]["mean"].tolist())
    ctl_dict["var"] = d["lam_controller"]["var"].tolist()
    _, _, other = fresh(CONFIGS["gradient-noise"]())
    other.load_state_dict({**d, "lam_controller": ctl_dict})
    assert torch.equal(other.state_dict()["lam_controller"]["mean"], d["lam_controller"]["mean"])


# -- bad input -----------------------------------------------------------------------------


def test_model_without_our_modules():
    with pytest.raises(ValueError, match="convert_to_mbn"):
        MomentumScheduler(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), lam=0.5, tau=0.9)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        MomentumScheduler([MomentumBatchNorm1d(2)], lam=0.5, tau=0.9)


@needs_dynamic
def test_lam_for_a_model_without_mbn():
    model = nn.Sequential(DynamicBatchNorm2d(2))
    with pytest.raises(ValueError, match="no MomentumBatchNorm"):
        MomentumScheduler(model, lam=0.5, tau=0.9)
    assert MomentumScheduler(model, batch_size=2).get_last_lam() is None  # lam=None: unused


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lam": 1.5, "tau": 0.9}, ValueError, r"\[0, 1\]"),
        ({"lam": True, "tau": 0.9}, TypeError, "lam must be"),
        ({"lam": "cumulative", "tau": 0.9}, ValueError, "schedules.cumulative"),
        ({"lam": object(), "tau": 0.9}, TypeError, "schedule"),
        ({"lam": lambda c: 1.5, "tau": 0.9}, ValueError, "schedule's value at count 0"),
        ({"lam": lambda c: None, "tau": 0.9}, TypeError, "lam"),
        ({"tau": 0.9, "batch_size": 4}, ValueError, "total_epochs"),
        ({"lam": 0.5}, ValueError, "batch_size"),
        ({"batch_size": 0, "total_epochs": 3}, ValueError, "batch_size"),
        ({"batch_size": 4, "total_epochs": 3, "tau0": 1.0}, ValueError, "tau0"),
        ({"lam": 0.5, "tau": 0.9, "steps_per_epoch": 0}, ValueError, "steps_per_epoch"),
        ({"lam": 0.5, "tau": 0.9, "steps_per_epoch": 2.5}, TypeError, "steps_per_epoch"),
        ({"lam": 0.5, "tau": 0.9, "parameters": []}, ValueError, "GradientNoiseController"),
        (
            {"lam": GradientNoiseController(batch_size=2), "tau": 0.9, "parameters": []},
            ValueError,
            "no parameters",
        ),
    ],
)
def test_bad_arguments_change_no_module(kwargs, error, match):
    model = nested()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        MomentumScheduler(model, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_schedule_leaving_01_later_raises_and_changes_nothing():
    model = nested()
    tau_ctl = PlateauController()
    sched = MomentumScheduler(model, lam=lambda c: 0.5 + 0.4 * c, tau=tau_ctl)  # 1.3 at count 2
    sched.step(1.0)
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before = sched.state_dict()
    with pytest.raises(ValueError, match=r"lam \(the schedule's value at count 2\).*1\.3"):
        sched.step(0.5)
    assert same(sched.state_dict(), before) and sched.last_step == 1  # plateau state not advanced
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k]), k


def good_state():
    model, opt, sched = fresh(CONFIGS["gradient-noise"]())
    run(CONFIGS["gradient-noise"](), model, opt, sched, batches(3))
    return sched.state_dict()


def bad_moments(state, how):
    d = dict(state["lam_controller"])
    d["mean"] = {"short": d["mean"][:-1], "nan": d["mean"] * math.nan}[how]
    if how == "short":
        d["var"] = d["var"][:-1]
    return {**state, "lam_controller": d}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: {k: v for k, v in s.items() if k != "tau"}, "missing key 'tau'"),
        (lambda s: {**s, "epoch": 3}, "unknown key 'epoch'"),
        (lambda s: {**s, "last_step": -1}, "last_step"),
        (lambda s: {**s, "last_step": 2.0}, "last_step"),
        (lambda s: {**s, "last_step": True}, "last_step"),
        (lambda s: {**s, "lam": 1.5}, "'lam'"),
        (lambda s: {**s, "lam": "0.5"}, "'lam'"),
        (lambda s: {**s, "lam": 0.123}, "is not the decay of 'lam_controller'"),
        (lambda s: {**s, "tau_controller": None}, "'tau_controller' is None"),
        (lambda s: {**s, "lam_controller": {**s["lam_controller"], "decay": 2.0}}, "'decay'"),
        (lambda s: {**s, "tau_controller": {"decay": 0.9}}, "missing key 'best'"),
        (lambda s: bad_moments(s, "short"), "elements"),
        (lambda s: bad_moments(s, "nan"), "non-finite"),
        (lambda s: [1, 2], "dict"),
    ],
)
def test_bad_state_dict_loads_nothing(change, match):
    model, opt, sched = fresh(CONFIGS["gradient-noise"]())
    run(CONFIGS["gradient-noise"](), model, opt, sched, batches(1, seed=9))
    before = sched.state_dict()
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        sched.load_state_dict(change(good_state()))
    after = sched.state_dict()
    assert after["last_step"] == before["last_step"] == 1
    assert after["lam_controller"]["mean"] is before["lam_controller"]["mean"]
    assert after["tau_controller"] == before["tau_controller"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k]), k


def test_state_dict_of_another_configuration():
    state = MomentumScheduler(nested(), lam=0.5, tau=schedules.cumulative()).state_dict()
    sched = MomentumScheduler(nested(), lam=PlateauController(), tau=0.9)
    with pytest.raises(ValueError, match="'lam_controller' is None"):
        sched.load_state_dict(state)
    with pytest.raises(ValueError, match="key 'tau' must be None"):
        MomentumScheduler(nested(), lam=0.5, tau=schedules.cumulative()).load_state_dict(
            {**state, "tau": 0.9}
        )


# -- torch.compile -------------------------------------------------------------------------


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


class Small(nn.Module):
    def __init__(self, dtype, dynamic):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, dtype=dtype)
        self.mbn = MomentumBatchNorm2d(3, dtype=dtype)
        self.dbn = DynamicBatchNorm2d(3, dtype=dtype) if dynamic else nn.Identity()

    def forward(self, x):
        return self.dbn(torch.relu(self.mbn(self.conv(x))))


def compiled_against_eager(backend, dtype, tol, dynamic, steps=5):
    torch.manual_seed(0)
    eager = Small(dtype, dynamic)
    twin = copy.deepcopy(eager)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(twin, backend=counter, fullgraph=True)

    def scheduler(model):  # lam and the momentum change at every step
        lam = schedules.linear(0.1, 0.9, num_steps=steps)
        return MomentumScheduler(model, lam=lam, tau=schedules.linear(0.5, 0.95, steps))

    s_eager, s_compiled = scheduler(eager), scheduler(compiled)
    counts, lams = [], []
    for x in batches(steps, seed=4):
        x = x.to(dtype)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = eager(xe), compiled(xc)
        dy = torch.linspace(-1, 1, ye.numel(), dtype=dtype).reshape(ye.shape) ** 3
        ye.backward(dy)
        yc.backward(dy)
        torch.testing.assert_close(yc, ye, rtol=tol, atol=tol)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=tol, atol=tol)
        for (name, a), b in zip(twin.named_buffers(), eager.buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
        for a, b in zip(twin.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)
        counts.append(counter.frame_count)
        s_eager.step()
        s_compiled.step()
        lams.append(float(twin.mbn.lam))
    assert len(set(lams)) == steps and float(twin.mbn.inference_decay) == 0.95
    return counts


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize(
    "dynamic",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                DynamicBatchNorm2d is None, reason="mbn_torch.modules has no DynamicBatchNorm2d yet"
            ),
        ),
    ],
    ids=["mbn", "mbn+dynamic-bn"],
)
def test_compile_fullgraph_scheduler_never_recompiles(dynamic):
    counts = compiled_against_eager("aot_eager", F64, 1e-12, dynamic)
    assert counts[0] >= 1
    assert counts == [counts[0]] * len(counts), f"recompiled: {counts}"


@pytest.mark.skipif(shutil.which("cc") is None, reason="inductor on CPU needs a C compiler")
@pytest.mark.usefixtures("_fresh_dynamo")
def test_compile_inductor_scheduler_never_recompiles():
    counts = compiled_against_eager(
        "inductor", torch.float32, 1e-4, DynamicBatchNorm2d is not None, steps=3
    )
    assert counts == [counts[0]] * len(counts), f"recompiled: {counts}"


# -- the documentation ---------------------------------------------------------------------


def test_docs_examples_run():
    """The python blocks of docs/schedules.md's PyTorch section, in order, in one namespace."""
    import pathlib
    import re

    text = pathlib.Path(__file__).parents[1].joinpath("docs", "schedules.md").read_text()
    section = text[text.index("## PyTorch: `mbn_torch.MomentumScheduler`") :]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 5
    torch.manual_seed(0)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/schedules.md", "exec"), namespace)
    scheduler = namespace["scheduler"]
    assert scheduler.last_step == 8 and scheduler.get_last_lam() is not None
    assert namespace["model"][1].momentum == pytest.approx(1 - scheduler.get_last_tau())
