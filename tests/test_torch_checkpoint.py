"""``mbn_torch.save_checkpoint``/``load_checkpoint``: resume bit for bit, all or nothing."""

from __future__ import annotations

import doctest

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import mbn_torch  # noqa: E402
from mbn_torch import checkpoint  # noqa: E402


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        mbn_torch.MomentumBatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        mbn_torch.DynamicBatchNorm1d(5),
    )


def _train(model, sched, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(2, 3, 6, 6, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()


def _state(model, sched):
    return {**model.state_dict(), **{f"sched.{k}": v for k, v in sched.state_dict().items()}}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_doctest():
    assert doctest.testmod(checkpoint).failed == 0


def test_resume_is_bit_exact(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = mbn_torch.MomentumScheduler(model, batch_size=2, total_epochs=6)
    _train(model, sched, opt, 3, seed=1)
    mbn_torch.save_checkpoint(tmp_path / "ck.pt", model, sched, epoch=3, opt=opt.state_dict())
    _train(model, sched, opt, 3, seed=2)  # the uninterrupted run

    resumed = _model(seed=99)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1)
    sched2 = mbn_torch.MomentumScheduler(resumed, batch_size=2, total_epochs=6)
    extra = mbn_torch.load_checkpoint(tmp_path / "ck.pt", resumed, sched2)
    assert extra["epoch"] == 3
    opt2.load_state_dict(extra["opt"])
    _train(resumed, sched2, opt2, 3, seed=2)
    _assert_same(_state(resumed, sched2), _state(model, sched))


@pytest.mark.parametrize("damage", ["shape", "unknown_key", "missing_key", "scheduler"])
def test_bad_checkpoint_changes_nothing(tmp_path, damage):
    source = _model(seed=1)
    sched_source = mbn_torch.MomentumScheduler(source, batch_size=2, total_epochs=6)
    _train(source, sched_source, torch.optim.SGD(source.parameters(), lr=0.1), 2, seed=3)
    payload = {
        "model": source.state_dict(),
        "momentum_scheduler": sched_source.state_dict(),
        "extra": {},
    }
    if damage == "shape":
        payload["model"]["4.weight"] = torch.zeros(5, 7)  # after every MBN key but one
    elif damage == "unknown_key":
        payload["model"]["1.surprise"] = torch.zeros(1)
    elif damage == "missing_key":
        del payload["model"]["5.running_var"]
    else:
        payload["momentum_scheduler"]["last_step"] = -4
    torch.save(payload, tmp_path / "bad.pt")

    model = _model(seed=2)
    sched = mbn_torch.MomentumScheduler(model, batch_size=2, total_epochs=6)
    _train(model, sched, torch.optim.SGD(model.parameters(), lr=0.1), 1, seed=4)
    before = {
        k: (v.clone() if isinstance(v, torch.Tensor) else v)
        for k, v in _state(model, sched).items()
    }
    error = ValueError if damage == "scheduler" else RuntimeError
    with pytest.raises(error):
        mbn_torch.load_checkpoint(tmp_path / "bad.pt", model, sched)
    _assert_same(_state(model, sched), before)


def test_not_a_checkpoint(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match=r"not a checkpoint of mbn_torch\.save_checkpoint"):
        mbn_torch.load_checkpoint(tmp_path / "sd.pt", model)
    mbn_torch.save_checkpoint(tmp_path / "ck.pt", model)
    sched = mbn_torch.MomentumScheduler(model, batch_size=2, total_epochs=6)
    with pytest.raises(ValueError, match="no scheduler state"):
        mbn_torch.load_checkpoint(tmp_path / "ck.pt", model, sched)
    assert mbn_torch.load_checkpoint(tmp_path / "ck.pt", model) == {}
