"""Decay schedules and adaptive controllers (docs/spec.md §4).

Every value here is a **decay** ``d`` (weight on history: ``s <- d*s + (1-d)*batch``), the
paper's ``lam`` and ``tau``; PyTorch's ``momentum`` is the update rate ``1 - d``.

- :mod:`.paper`: the paper's Eq. 11 (:func:`mbn_lambda`, 1-indexed epoch ``t`` as printed;
  :func:`mbn_lambda_schedule`, 0-indexed count) and Eq. 12 (:func:`mbn_tau`).
- :mod:`.basic`: generic validated factories of :class:`Schedule` (``count -> decay`` of the
  0-indexed count of completed epochs or steps).
- :mod:`.controllers`: adaptive controllers with exactly restorable state.

>>> from mbn_ref import schedules
>>> lam = schedules.mbn_lambda_schedule(total_epochs=200, batch_size=2)
>>> lam(199) == schedules.mbn_lambda(200, total_epochs=200, batch_size=2) == 1 - 2 / 32
True
"""

from __future__ import annotations

from ._types import Schedule
from .basic import (
    constant,
    cosine,
    cumulative,
    exponential,
    from_update_rate,
    join,
    linear,
    piecewise_constant,
)
from .controllers import (
    GradientNoiseController,
    GradientNoiseState,
    PlateauController,
    PlateauState,
)
from .paper import (
    PAPER_DEFAULTS_SEC_4_2,
    PAPER_DEFAULTS_SEC_5_2,
    PaperDefaults,
    default_lam_schedule,
    default_tau_schedule,
    mbn_lambda,
    mbn_lambda_schedule,
    mbn_tau,
)

__all__ = [
    "PAPER_DEFAULTS_SEC_4_2",
    "PAPER_DEFAULTS_SEC_5_2",
    "GradientNoiseController",
    "GradientNoiseState",
    "PaperDefaults",
    "PlateauController",
    "PlateauState",
    "Schedule",
    "constant",
    "cosine",
    "cumulative",
    "default_lam_schedule",
    "default_tau_schedule",
    "exponential",
    "from_update_rate",
    "join",
    "linear",
    "mbn_lambda",
    "mbn_lambda_schedule",
    "mbn_tau",
    "piecewise_constant",
]
