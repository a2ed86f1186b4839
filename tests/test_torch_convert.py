"""``mbn_torch.convert_to_mbn`` / ``convert_to_batchnorm``: BN parity at ``lam = 0``, the round
trip, ``momentum=None``, parameter identity, modes, ``torch.compile`` and bad input."""

from __future__ import annotations

import copy
import doctest

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import mbn_torch  # noqa: E402
import mbn_torch.convert  # noqa: E402
from mbn_torch import (  # noqa: E402
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
    MomentumBatchNorm3d,
    convert_to_batchnorm,
    convert_to_mbn,
)
from mbn_torch.distributed import SyncMomentumBatchNorm  # noqa: E402

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class Block(nn.Module):
    def __init__(self, momentum):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=momentum)
        self.inner = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4, momentum=momentum, affine=False))

    def forward(self, x):
        return self.inner(self.bn(self.conv(x)))


def _model(momentum=0.1, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        Block(momentum),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5, momentum=momentum),
    ).double()
    with torch.no_grad():  # non-trivial affine parameters and statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(3)
    return model


def _batches(n=3):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64) + i for i in range(n)]


def _step(model, x):
    y = model(x)
    (y**3).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return y.detach(), grads


def _bn_state(model):
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in BN_KEYS}


def _assert_state_close(a, b, tol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=k)


def test_doctests():
    result = doctest.testmod(mbn_torch.convert, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("momentum", [0.1, None])
def test_lam0_matches_batchnorm_training_and_eval(momentum):
    ref = _model(momentum)
    mbn = convert_to_mbn(copy.deepcopy(ref), lam=0.0)
    kinds = [type(m) for m in mbn.modules()]
    assert kinds.count(MomentumBatchNorm2d) == 3 and kinds.count(MomentumBatchNorm1d) == 1
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mbn.modules())
    for x in _batches():
        y_ref, g_ref = _step(ref, x)
        y_mbn, g_mbn = _step(mbn, x)
        torch.testing.assert_close(y_mbn, y_ref, atol=1e-12, rtol=0)
        for a, b in zip(g_mbn, g_ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        _assert_state_close(_bn_state(mbn), ref.state_dict())
    ref.eval()
    mbn.eval()
    x = _batches(1)[0]
    torch.testing.assert_close(mbn(x), ref(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_round_trip(momentum):
    ref = _model(momentum)
    for x in _batches(2):  # statistics that have moved
        ref(x)
    mbn = convert_to_mbn(copy.deepcopy(ref), lam=0.7)
    for m in mbn.modules():
        if isinstance(m, MomentumBatchNorm2d | MomentumBatchNorm1d):
            assert m.momentum == momentum and float(m.lam) == 0.7
            # the training statistics start from the inference statistics
            torch.testing.assert_close(m.moving_mean, m.running_mean, atol=0, rtol=0)
            torch.testing.assert_close(m.moving_var, m.running_var, atol=0, rtol=0)
    back = convert_to_batchnorm(copy.deepcopy(mbn))
    assert [type(m) for m in back.modules()] == [type(m) for m in ref.modules()]
    for a, b in zip(back.modules(), ref.modules(), strict=True):
        if isinstance(a, nn.modules.batchnorm._BatchNorm):
            assert (a.momentum, a.eps, a.affine, a.track_running_stats) == (
                b.momentum,
                b.eps,
                b.affine,
                b.track_running_stats,
            )
    ref_state, back_state = ref.state_dict(), back.state_dict()
    assert list(back_state) == list(ref_state)
    for k in ref_state:
        assert back_state[k].dtype == ref_state[k].dtype
        assert torch.equal(back_state[k], ref_state[k]), k
    x = _batches(1)[0]
    for m in (ref, mbn, back):
        m.eval()
    torch.testing.assert_close(mbn(x), ref(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(back(x), ref(x), atol=1e-12, rtol=0)


def test_back_after_mbn_training_keeps_inference_statistics():
    mbn = convert_to_mbn(_model(None), lam=0.9)
    for x in _batches():
        _step(mbn, x)
    back = convert_to_batchnorm(copy.deepcopy(mbn))
    _assert_state_close(back.state_dict(), _bn_state(mbn), tol=0)
    mbn.eval()
    back.eval()
    x = _batches(1)[0]
    torch.testing.assert_close(back(x), mbn(x), atol=1e-12, rtol=0)
    assert all(m.momentum is None for m in back.modules() if isinstance(m, nn.BatchNorm2d))


def test_parameters_shared_like_convert_sync_batchnorm():
    ref = _model()
    ref[1].weight.requires_grad_(False)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    assert sync[1].weight.requires_grad is False
    params, stats = list(ref.parameters()), [ref[1].running_mean, ref[1].num_batches_tracked]
    mbn = convert_to_mbn(ref)
    # the same Parameter objects, in the same order (an optimizer built before still works)
    assert all(a is b for a, b in zip(mbn.parameters(), params, strict=True))
    assert mbn[1].running_mean is stats[0] and mbn[1].num_batches_tracked is stats[1]
    assert mbn[1].moving_mean.data_ptr() != stats[0].data_ptr()
    assert mbn[1].weight.requires_grad is False and mbn[1].bias.requires_grad is True
    back = convert_to_batchnorm(mbn)
    assert all(a is b for a, b in zip(back.parameters(), params, strict=True))
    assert back[1].running_mean is stats[0]
    assert back[1].weight.requires_grad is False


def test_root_is_replaced_and_attributes_copied():
    bn = nn.BatchNorm3d(2, eps=1e-3, momentum=0.25, dtype=torch.float64).eval()
    bn.qconfig = "q"
    out = convert_to_mbn(bn, lam=0.5)
    assert type(out) is MomentumBatchNorm3d and out is not bn
    assert (out.eps, out.momentum, float(out.lam), out.training) == (1e-3, 0.25, 0.5, False)
    assert out.qconfig == "q"
    assert out.weight.dtype == out.running_mean.dtype == out.moving_var.dtype == torch.float64
    back = convert_to_batchnorm(out)
    assert type(back) is nn.BatchNorm3d and back.momentum == 0.25 and not back.training
    assert back.qconfig == "q" and back.eps == 1e-3


@pytest.mark.parametrize(("affine", "track"), [(False, True), (True, False), (False, False)])
def test_affine_and_track_running_stats_flags(affine, track):
    ref = nn.Sequential(nn.BatchNorm1d(3, affine=affine, track_running_stats=track))
    mbn = convert_to_mbn(copy.deepcopy(ref))
    assert (mbn[0].affine, mbn[0].track_running_stats) == (affine, track)
    x = torch.randn(6, 3)
    torch.testing.assert_close(mbn(x), ref(x))
    back = convert_to_batchnorm(mbn)
    assert (back[0].affine, back[0].track_running_stats) == (affine, track)
    assert list(back.state_dict()) == list(ref.state_dict())


def test_training_mode_kept_per_module():
    ref = _model()
    ref[3].eval()  # only the nested block in evaluation mode
    mbn = convert_to_mbn(copy.deepcopy(ref))
    assert [m.training for m in mbn.modules()] == [m.training for m in ref.modules()]
    back = convert_to_batchnorm(mbn)
    assert [m.training for m in back.modules()] == [m.training for m in ref.modules()]


def test_non_batchnorm_modules_untouched():
    ref = _model()
    children = {name: m for name, m in ref.named_modules() if not name.endswith("bn")}
    mbn = convert_to_mbn(ref)
    assert mbn is ref  # the root is not a batch norm: converted in place
    for name, m in mbn.named_modules():
        if not isinstance(m, MomentumBatchNorm2d | MomentumBatchNorm1d):
            assert m is children[name]


def test_sync_batchnorm_becomes_sync_mbn_keeping_process_group():
    group = object()  # stands for a ProcessGroup: only carried over, never used here
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4, momentum=None, process_group=group)
    ).double()
    ref = copy.deepcopy(model)
    out = convert_to_mbn(model, lam=0.0)
    assert type(out[1]) is SyncMomentumBatchNorm
    assert out[1].process_group is group and out[1].momentum is None
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    # without a process group both are BN on this batch
    torch.testing.assert_close(out(x), ref(x), atol=1e-12, rtol=0)
    _assert_state_close(_bn_state(out), ref.state_dict())
    back = convert_to_batchnorm(out)
    assert type(back[1]) is nn.SyncBatchNorm and back[1].process_group is group
    assert back[1].momentum is None
    _assert_state_close(back.state_dict(), ref.state_dict(), tol=0)
    root = convert_to_mbn(nn.SyncBatchNorm(2, eps=1e-3), lam=0.5)
    assert type(root) is SyncMomentumBatchNorm and root.process_group is None
    assert (root.eps, float(root.lam)) == (1e-3, 0.5)
    assert root(torch.randn(3, 2, 2, 2, 2)).shape == (3, 2, 2, 2, 2)  # any rank >= 2
    assert type(convert_to_batchnorm(root)) is nn.SyncBatchNorm


def test_sync_batchnorm_per_device_with_sync_ndim():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4, momentum=None))
    ref = copy.deepcopy(model)
    out = convert_to_mbn(model, sync_ndim=2)
    assert type(out[1]) is MomentumBatchNorm2d and out[1].momentum is None
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(out(x), ref(x))  # SyncBatchNorm without a process group
    assert type(convert_to_mbn(nn.SyncBatchNorm(2), sync_ndim=3)) is MomentumBatchNorm3d
    assert type(convert_to_mbn(nn.SyncBatchNorm(2), sync_ndim=1)) is MomentumBatchNorm1d
    assert type(convert_to_batchnorm(out)[1]) is nn.BatchNorm2d  # per-device: plain BN back


def test_convert_sync_batchnorm_then_mbn_gives_sync_mbn():
    """The documented way to synchronized MBN from a model with plain BatchNorm*d."""
    ref = _model()
    sync = convert_to_mbn(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref)), lam=0.3)
    kinds = [type(m) for m in sync.modules()]
    assert kinds.count(SyncMomentumBatchNorm) == 4 and MomentumBatchNorm2d not in kinds
    assert all(float(m.lam) == 0.3 for m in sync.modules() if type(m) is SyncMomentumBatchNorm)


def test_bad_input_leaves_model_unchanged():
    model = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm1d(2, bias=False))
    with pytest.raises(ValueError, match="bias=False"):
        convert_to_mbn(model)
    assert type(model[0]) is nn.BatchNorm2d
    with pytest.raises(TypeError, match="LazyBatchNorm2d"):
        convert_to_mbn(nn.Sequential(nn.BatchNorm2d(2), nn.LazyBatchNorm2d()))
    with pytest.raises(ValueError):
        convert_to_mbn(nn.BatchNorm2d(2), lam=1.5)
    with pytest.raises(ValueError, match="sync_ndim"):
        convert_to_mbn(nn.BatchNorm2d(2), sync_ndim=4)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compile_fullgraph_one_step():
    torch._dynamo.reset()
    ref = _model()
    mbn = convert_to_mbn(copy.deepcopy(ref), lam=0.0)
    compiled = torch.compile(mbn, fullgraph=True, backend="aot_eager")
    x = _batches(1)[0]
    y_ref, g_ref = _step(ref, x)
    y, g = _step(compiled, x)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    _assert_state_close(_bn_state(mbn), ref.state_dict())
    torch._dynamo.reset()
