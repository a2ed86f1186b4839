"""The caller's arrays are never written (docs/spec.md §7).

Every input (data, parameters, state, gradients, a saved context's arrays) is a read-only
NumPy array here, so an in-place write anywhere in the core raises instead of passing
silently: the core updates only the temporaries it creates itself.
"""

from __future__ import annotations

import numpy as np
import pytest

import mbn_ref as mr
from mbn_ref import distributed


def _frozen(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


def _frozen_state(state):
    return type(state)(*(_frozen(v) for v in state))


@pytest.mark.parametrize("nonfinite", ["propagate", "skip_update"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_bn_and_mbn_never_write_their_inputs(dtype, training, nonfinite):
    rng = np.random.default_rng(0)
    x = _frozen(rng.normal(3.0, 2.0, size=(4, 3, 5)).astype(dtype))
    dy = _frozen(rng.normal(size=x.shape).astype(dtype))
    g, b = _frozen(np.array([0.5, 1.0, 2.0])), _frozen(np.array([0.1, 0.0, -0.1]))
    kw = dict(training=training, nonfinite=nonfinite)
    before = [v.copy() for v in (x, dy, g, b)]
    outputs = [
        mr.bn_forward(x, _frozen_state(mr.init_bn_state(3)), g, b, decay=_frozen(0.9), **kw),
        mr.bn_forward(x, None, g, b, **kw),
        mr.mbn_forward(x, _frozen_state(mr.init_state(3)), g, b, lam=_frozen(0.5), **kw),
        mr.mbn_forward(x, _frozen_state(mr.init_state(3)), g, b, lam=0.75, tau=None, **kw),
    ]
    for _, _, ctx in outputs:
        arrays, static = ctx.split()
        frozen = [None if a is None else _frozen(a) for a in arrays]
        frozen_ctx = mr.NormContext.join(frozen, static)
        mr.backward(dy, frozen_ctx)
    for a, copy in zip((x, dy, g, b), before, strict=True):
        np.testing.assert_array_equal(a, copy)


def test_synchronized_forward_and_backward_never_write_their_inputs():
    rng = np.random.default_rng(1)
    shards = [_frozen(rng.normal(size=(n, 3))) for n in (2, 0, 3)]
    state = _frozen_state(mr.init_state(3))
    ys, _, ctxs = distributed.sync_mbn_forward(shards, state, lam=0.5)
    distributed.sync_backward([_frozen(np.ones_like(y)) for y in ys], ctxs)
    _, _, var = distributed.merge_moments([2, 3], [_frozen([1.0]), _frozen([2.0])],
                                          [_frozen([0.5]), _frozen([1.5])])
    assert float(var[0]) > 0
