"""Every row of docs/spec.md §9 that concerns BN/MBN: what each bad input gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import to_numpy

import mbn_ref as mr


def _x(shape=(4, 3, 2), seed=0):
    return np.random.default_rng(seed).normal(size=shape)


def _bn(x, **kw):
    return mr.bn_forward(x, mr.init_bn_state(x.shape[kw.get("axis", 1)]), **kw)


def _mbn(x, **kw):
    return mr.mbn_forward(x, mr.init_state(x.shape[kw.get("axis", 1)]), **kw)


FORWARDS = {"bn": _bn, "mbn": _mbn}


# -- shapes and axes -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), ()])
def test_fewer_than_two_dims(shape):
    x = np.ones(shape)
    for f in (lambda: mr.bn_forward(x, None), lambda: mr.mbn_forward(x, mr.init_state(1))):
        with pytest.raises(
            ValueError,
            match=r"at least 2 dims.*shape " + repr(shape).replace("(", r"\(").replace(")", r"\)"),
        ):
            f()


@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_parameter_channel_count_mismatch(name):
    x = _x((4, 3, 2))
    kw = {name: np.ones(5)}
    for forward in (
        lambda: mr.bn_forward(x, None, **kw),
        lambda: mr.mbn_forward(x, mr.init_state(3), **kw),
    ):
        with pytest.raises(ValueError) as e:
            forward()
        msg = str(e.value)
        for fragment in (name, "(5,)", "(4, 3, 2)", "3 channels", "axis 1", "expected shape (3,)"):
            assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize("field", ["running_mean", "running_var"])
def test_bn_state_channel_count_mismatch_names_the_field(field):
    x = _x((4, 3))
    state = mr.init_bn_state(3)._replace(**{field: np.ones(4)})
    with pytest.raises(
        ValueError,
        match=rf"{field} has shape \(4,\).*\(4, 3\).*expected "
        r"shape \(3,\)",
    ):
        mr.bn_forward(x, state)


@pytest.mark.parametrize("field", ["moving_mean", "moving_var", "running_mean", "running_var"])
def test_mbn_state_channel_count_mismatch_names_the_field(field):
    x = _x((4, 3, 5), seed=1)
    state = mr.init_state(3)._replace(**{field: np.zeros((3, 1))})
    with pytest.raises(ValueError, match=rf"{field} has shape \(3, 1\)"):
        mr.mbn_forward(x, state, lam=0.5)


def test_channels_last_mismatch_reports_the_axis():
    x = _x((4, 5, 3))
    with pytest.raises(ValueError, match=r"input of shape \(4, 5, 3\) has 3 channels on axis 2"):
        mr.bn_forward(x, mr.init_bn_state(5), axis=-1)


@pytest.mark.parametrize("axis", [3, -4, 10])
def test_axis_out_of_range(axis):
    x = _x((4, 3, 2))
    for forward in (
        lambda: mr.bn_forward(x, mr.init_bn_state(3), axis=axis),
        lambda: mr.bn_forward(x, None, axis=axis),
        lambda: mr.mbn_forward(x, mr.init_state(3), axis=axis),
    ):
        with pytest.raises(ValueError, match=rf"axis {axis} is out of range.*\(4, 3, 2\)"):
            forward()


# -- dtypes ----------------------------------------------------------------------------------


def test_integer_and_bool_inputs_are_type_errors(xp):
    for dtype in (xp.int32, xp.int64, xp.bool):
        x = xp.ones((4, 3), dtype=dtype)
        with pytest.raises(TypeError, match="real floating dtype"):
            mr.bn_forward(x, None)
        with pytest.raises(TypeError, match="real floating dtype"):
            mr.mbn_forward(x, mr.init_state(3, xp=xp), lam=0.5)


def test_integer_dy_is_a_type_error():
    _, _, ctx = mr.bn_forward(_x(), None)
    with pytest.raises(TypeError, match="dy"):
        mr.bn_backward(np.ones((4, 3, 2), dtype=np.int64), ctx)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 3\)"):
        mr.bn_backward(np.ones((4, 3)), ctx)


# -- hyper-parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_decays_outside_unit_interval(bad):
    x = _x()
    with pytest.raises(ValueError, match=r"decay must be a decay \(weight on history\) in"):
        mr.bn_forward(x, mr.init_bn_state(3), decay=bad)
    with pytest.raises(ValueError, match=r"lam must be a decay \(weight on history\) in"):
        mr.mbn_forward(x, mr.init_state(3), lam=bad)
    with pytest.raises(ValueError, match=r"tau must be a decay .* update rate u"):
        mr.mbn_forward(x, mr.init_state(3), tau=bad)


@pytest.mark.parametrize("bad", [True, "0.9", np.bool_(False)])
def test_decays_of_the_wrong_type(bad):
    with pytest.raises(TypeError, match="decay must be a real number"):
        mr.bn_forward(_x(), mr.init_bn_state(3), decay=bad)
    with pytest.raises(TypeError, match="lam must be a real number"):
        mr.mbn_forward(_x(), mr.init_state(3), lam=bad)


def test_decay_arrays_must_be_0d():
    with pytest.raises(ValueError, match=r"scalar decay .* shape \(3,\)"):
        mr.mbn_forward(_x(), mr.init_state(3), lam=np.full(3, 0.5))


def test_lam_none_is_rejected():
    with pytest.raises(ValueError, match="lam must be a decay"):
        mr.mbn_forward(_x(), mr.init_state(3), lam=None)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
@pytest.mark.parametrize("kind", list(FORWARDS))
def test_eps_must_be_positive(kind, eps):
    with pytest.raises(ValueError, match=r"eps must be (> 0|finite)"):
        FORWARDS[kind](_x(), eps=eps)
    with pytest.raises(TypeError, match="eps must be a real number"):
        FORWARDS[kind](_x(), eps="1e-5")


@pytest.mark.parametrize("kind", list(FORWARDS))
def test_unknown_policy_and_estimator(kind):
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        FORWARDS[kind](_x(), nonfinite="ignore")
    with pytest.raises(ValueError, match="estimator must be one of"):
        FORWARDS[kind](_x(), estimator="sample")


# -- one value per channel -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)])
def test_bn_training_with_one_value_per_channel(shape):
    x = _x(shape)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        mr.bn_forward(x, mr.init_bn_state(3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        mr.bn_forward(x, None, training=False)  # no running stats: the batch normalizes
    # evaluation with running statistics is fine
    y, _, _ = mr.bn_forward(x, mr.init_bn_state(3), training=False)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-15)


def test_mbn_lam_zero_with_one_value_per_channel():
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*lam = 0"):
        mr.mbn_forward(_x((1, 3)), mr.init_state(3), lam=0.0)


def test_mbn_array_lam_is_never_read_on_the_host():
    """A decay held as an array (runtime state, possibly a tracer or on a GPU) is not read to
    check the one-value rule (docs/spec.md §9): with lam = 0 the batch's zero variance
    normalizes and the output is beta, finite, as a compiled graph would compute it."""
    beta = np.array([0.5, -1.0, 2.0])
    y, state, _ = mr.mbn_forward(_x((1, 3)), mr.init_state(3), None, beta, lam=np.asarray(0.0))
    np.testing.assert_array_equal(y, beta[None, :])
    assert int(state.num_batches_tracked) == 1


@pytest.mark.parametrize("lam", [0.5, 0.9375])
def test_mbn_lam_positive_accepts_one_value_per_channel(lam):
    x = _x((1, 3, 1), seed=2)
    state = mr.init_state(3)
    y, new, ctx = mr.mbn_forward(x, state, lam=lam, tau=0.9)
    v = x[0, :, 0]
    mu = (1 - lam) * v
    var = lam * 1.0  # var_B = 0
    np.testing.assert_allclose(y[0, :, 0], (v - mu) / np.sqrt(var + 1e-5), rtol=1e-14)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(new.moving_mean, mu, rtol=1e-15)
    np.testing.assert_allclose(new.moving_var, var, rtol=1e-15)
    np.testing.assert_allclose(new.running_mean, 0.1 * v, rtol=1e-15)
    np.testing.assert_allclose(new.running_var, 0.9, rtol=1e-15)
    assert int(new.num_batches_tracked) == 1
    dx, _, _ = mr.mbn_backward(np.ones_like(x), ctx)
    assert np.all(np.isfinite(dx))
    with pytest.raises(ValueError, match=r"unbiased.*at least 2 values"):
        mr.mbn_forward(x, state, lam=lam, estimator="unbiased")


# -- empty batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0), (0, 3)])
def test_empty_batch_gives_empty_output_and_keeps_state(xp, shape):
    x = xp.zeros(shape, dtype=xp.float32)
    gamma, beta = xp.asarray([1.0, 2.0, 3.0]), xp.asarray([0.0, 1.0, 0.0])
    gamma, beta = xp.astype(gamma, xp.float32), xp.astype(beta, xp.float32)
    bn_state = mr.init_bn_state(3, xp=xp, dtype=xp.float32)
    mbn_state = mr.init_state(3, xp=xp, dtype=xp.float32)
    before_bn = [to_numpy(v).copy() for v in bn_state]
    before_mbn = [to_numpy(v).copy() for v in mbn_state]
    for lam in (0.0, 0.5):
        y, st, ctx = mr.mbn_forward(x, mbn_state, gamma, beta, lam=lam)
        assert tuple(y.shape) == shape and y.dtype == xp.float32
        for a, b in zip(st, before_mbn, strict=True):
            np.testing.assert_array_equal(to_numpy(a), b)
        dx, dg, db = mr.mbn_backward(xp.zeros(shape, dtype=xp.float32), ctx)
        assert tuple(dx.shape) == shape and dx.dtype == xp.float32
        np.testing.assert_array_equal(to_numpy(dg), 0.0)
        np.testing.assert_array_equal(to_numpy(db), 0.0)
    y, st, ctx = mr.bn_forward(x, bn_state, gamma, beta, decay=None)
    assert tuple(y.shape) == shape and y.dtype == xp.float32
    for a, b in zip(st, before_bn, strict=True):
        np.testing.assert_array_equal(to_numpy(a), b)
    dx, dg, db = mr.bn_backward(xp.zeros(shape, dtype=xp.float32), ctx)
    assert tuple(dx.shape) == shape
    np.testing.assert_array_equal(to_numpy(dg), 0.0)
    np.testing.assert_array_equal(to_numpy(db), 0.0)


# -- NaN / Inf -------------------------------------------------------------------------------


def _poisoned(xp, bad=float("nan")):
    x_np = _x((5, 3, 4), seed=3)
    x_np[2, 0, 1] = bad
    return x_np, xp.asarray(x_np)


def _started(kind, xp):
    """A state that has seen one clean batch (so 'unchanged' is not just the init values)."""
    x = xp.asarray(_x((5, 3, 4), seed=4))
    if kind == "bn":
        return mr.bn_forward(x, mr.init_bn_state(3, xp=xp, dtype=xp.float64), decay=0.8)[1]
    return mr.mbn_forward(x, mr.init_state(3, xp=xp, dtype=xp.float64), lam=0.5, tau=0.8)[1]


def _step(kind, x, state, **kw):
    if kind == "bn":
        return mr.bn_forward(x, state, decay=0.8, **kw)
    return mr.mbn_forward(x, state, lam=0.5, tau=0.8, **kw)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # IEEE inf-inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", ["bn", "mbn"])
def test_nonfinite_propagate_and_skip_update(xp, kind, bad):
    _, x = _poisoned(xp, bad)
    state = _started(kind, xp)
    before = [to_numpy(v).copy() for v in state]

    y_p, st_p, _ = _step(kind, x, state, nonfinite="propagate")
    y_p = to_numpy(y_p)
    assert np.all(np.isnan(y_p[:, 0]))  # the poisoned channel
    assert np.all(np.isfinite(y_p[:, 1:]))
    assert np.isnan(to_numpy(st_p.running_mean)[0]) or np.isinf(to_numpy(st_p.running_mean)[0])
    assert np.isnan(to_numpy(st_p.running_var)[0])
    assert np.all(np.isfinite(to_numpy(st_p.running_var)[1:]))
    assert int(st_p.num_batches_tracked) == 2

    y_s, st_s, _ = _step(kind, x, state, nonfinite="skip_update")
    y_s = to_numpy(y_s)
    np.testing.assert_array_equal(y_s[:, 1:], y_p[:, 1:])  # output as usual
    assert np.all(np.isnan(y_s[:, 0]))
    for name, a, b in zip(state._fields, st_s, before, strict=True):
        np.testing.assert_array_equal(to_numpy(a), b, err_msg=name)  # bit-identical
    assert int(st_s.num_batches_tracked) == 1

    # a clean batch afterwards updates as usual under skip_update
    clean = xp.asarray(_x((5, 3, 4), seed=5))
    _, st_c, _ = _step(kind, clean, st_s, nonfinite="skip_update")
    _, st_ref, _ = _step(kind, clean, state)
    for name, a, b in zip(state._fields, st_c, st_ref, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=name)


@pytest.mark.parametrize("kind", ["bn", "mbn"])
def test_skip_update_makes_no_host_sync_with_torch(kind, monkeypatch):
    """The skip decision stays on the device (torch.where on a 0-d flag): no tensor is read
    back to Python during the call."""
    import array_api_compat.torch as tx

    _, x = _poisoned(tx)
    state = _started(kind, tx)
    before = [v.clone() for v in state]

    def sync(*args, **kwargs):
        raise AssertionError("host sync: a tensor was read on the host")

    for method in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, sync)
    y, st, _ = _step(kind, x, state, nonfinite="skip_update")
    monkeypatch.undo()

    assert isinstance(y, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in st)
    for a, b in zip(st, before, strict=True):
        assert torch.equal(a, b)
    # the check is live: the 'raise' policy must read the flag and trips the same trap
    for method in ("__bool__", "item"):
        monkeypatch.setattr(torch.Tensor, method, sync)
    with pytest.raises(AssertionError, match="host sync"):
        _step(kind, x, state, nonfinite="raise")


@pytest.mark.parametrize("kind", ["bn", "mbn"])
def test_nonfinite_raise(xp, kind):
    _, x = _poisoned(xp)
    state = _started(kind, xp)
    before = [to_numpy(v).copy() for v in state]
    with pytest.raises(mr.NonFiniteError, match="1 of 3 channels") as e:
        _step(kind, x, state, nonfinite="raise")
    assert isinstance(e.value, ValueError)
    for a, b in zip(state, before, strict=True):
        np.testing.assert_array_equal(to_numpy(a), b)
    with pytest.raises(mr.NonFiniteError):
        _step(kind, x, state, nonfinite="raise", training=False)
    # finite batches pass under 'raise'
    _step(kind, xp.asarray(_x((5, 3, 4), seed=6)), state, nonfinite="raise")


# -- state -----------------------------------------------------------------------------------


def test_state_is_a_namedtuple():
    assert mr.BNState._fields == ("running_mean", "running_var", "num_batches_tracked")
    assert mr.MBNState._fields == (
        "moving_mean",
        "moving_var",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    )


@pytest.mark.parametrize("counter", [np.asarray(1.0), np.asarray([1]), np.asarray(True)])
def test_bad_num_batches_tracked(counter):
    x = _x()
    with pytest.raises(ValueError, match="num_batches_tracked must be a 0-d integer"):
        mr.bn_forward(x, mr.init_bn_state(3)._replace(num_batches_tracked=counter))
    with pytest.raises(ValueError, match="num_batches_tracked must be a 0-d integer"):
        mr.mbn_forward(x, mr.init_state(3)._replace(num_batches_tracked=counter))


@pytest.mark.parametrize("field", ["running_var", "moving_mean"])
def test_state_with_wrong_dtype_names_the_field(field):
    """docs/spec.md §9: a state with a wrong dtype is a ValueError naming the key."""
    state = mr.init_state(3)
    state = state._replace(**{field: np.ones(3, dtype=np.int64)})
    with pytest.raises(ValueError, match=field):
        mr.mbn_forward(_x(), state, lam=0.5)


def test_state_of_the_wrong_kind_names_the_fields():
    """A BN state handed to MBN (or the reverse) is a wrong-key error, not a silent mix-up."""
    with pytest.raises(ValueError, match="moving_mean"):
        mr.mbn_forward(_x(), mr.init_bn_state(3), lam=0.5)
    with pytest.raises(ValueError, match="running_mean"):
        mr.bn_forward(_x(), mr.init_state(3))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_init_state_needs_a_positive_integer(bad):
    with pytest.raises(ValueError, match="num_features"):
        mr.init_bn_state(bad)
    with pytest.raises(ValueError, match="num_features"):
        mr.init_state(bad)


def test_init_state_rejects_integer_dtype():
    with pytest.raises(TypeError, match="real floating"):
        mr.init_bn_state(3, dtype=np.int64)


def test_numpy_scalars_are_validated_like_python_numbers() -> None:
    """np.float32 hyper-parameters are host scalars: accepted when valid, rejected when not."""
    x = np.random.default_rng(0).normal(size=(4, 3))
    y32, _, _ = mr.bn_forward(x, mr.init_bn_state(3), eps=np.float32(1e-5), decay=np.float32(0.9))
    y, _, _ = mr.bn_forward(x, mr.init_bn_state(3), eps=1e-5, decay=0.9)
    np.testing.assert_allclose(y32, y, rtol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        mr.bn_forward(x, mr.init_bn_state(3), decay=np.float32(1.5))
    with pytest.raises(ValueError, match="lam"):
        mr.mbn_forward(x, mr.init_state(3), lam=np.float64(-0.1))
    with pytest.raises(ValueError, match="eps"):
        mr.bn_forward(x, None, eps=np.float32(0.0))
