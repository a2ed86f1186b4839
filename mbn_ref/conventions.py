"""Conventions, named and converted explicitly (SPEC §1).

"Momentum" means two opposite things in the wild:

* a **decay** ``d`` is the weight on history, ``s <- d*s + (1-d)*batch``: the paper's
  ``lam`` and ``tau``, Keras', Flax's and ONNX's ``momentum``;
* an **update rate** ``u = 1 - d`` is the weight on the new batch: PyTorch's ``momentum``
  and seed 003's ``alpha``.

The core speaks decays only; these converters are the one place where the two meet.
The running-variance **estimator** is either the biased ``1/m`` variance (the paper,
Keras, Flax, ONNX) or the unbiased ``1/(m-1)`` one (PyTorch); normalization always uses the
biased variance.

>>> decay_from_torch(0.1)
0.9
>>> torch_from_decay(0.99)
0.01
>>> FRAMEWORKS["torch"].decay(0.1)
0.9
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "FRAMEWORKS",
    "Estimator",
    "FrameworkConvention",
    "biased_from_unbiased",
    "decay_from_keras",
    "decay_from_torch",
    "decay_from_update_rate",
    "keras_from_decay",
    "torch_from_decay",
    "unbiased_from_biased",
    "update_rate_from_decay",
    "validate_decay",
    "validate_estimator",
]

Estimator = Literal["biased", "unbiased"]
"""How a batch's variance enters the running (inference) variance."""

ESTIMATORS: tuple[Estimator, ...] = ("biased", "unbiased")


def _complement(value: float, name: str) -> float:
    validate_decay(value, name)
    # round to 15 significant digits so that 1 - 0.9 reads 0.1, not 0.09999999999999998
    return float(f"{1.0 - value:.15g}")


def validate_decay(value: float, name: str = "decay") -> float:
    """``value`` if it is a number in ``[0, 1]``, else ``ValueError`` (SPEC §9).

    >>> validate_decay(1.5)
    Traceback (most recent call last):
        ...
    ValueError: decay must be in [0, 1], got 1.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def validate_estimator(estimator: str) -> Estimator:
    """``estimator`` if it names a running-variance estimator, else ``ValueError``."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return estimator  # type: ignore[return-value]


def decay_from_update_rate(update_rate: float) -> float:
    """Decay ``1 - u`` for an update rate ``u`` (weight on the new batch)."""
    return _complement(update_rate, "update rate")


def update_rate_from_decay(decay: float) -> float:
    """Update rate ``1 - d`` for a decay ``d`` (weight on history)."""
    return _complement(decay, "decay")


def decay_from_torch(momentum: float) -> float:
    """Decay for PyTorch's ``momentum`` (an update rate; ``None``, the cumulative average,
    has no fixed decay and is ``decay=None`` in the core).

    >>> decay_from_torch(0.1)
    0.9
    """
    return decay_from_update_rate(momentum)


def torch_from_decay(decay: float) -> float:
    """PyTorch's ``momentum`` (an update rate) for a decay.

    >>> torch_from_decay(0.9)
    0.1
    """
    return update_rate_from_decay(decay)


def decay_from_keras(momentum: float) -> float:
    """Keras' ``momentum`` already is a decay: returned validated, unchanged."""
    return validate_decay(momentum, "Keras momentum")


def keras_from_decay(decay: float) -> float:
    """Keras' ``momentum`` for a decay: the same number."""
    return validate_decay(decay)


def unbiased_from_biased(var: Any, m: int) -> Any:
    """Unbiased variance ``var * m/(m-1)`` from a biased one over ``m`` values (``m >= 2``).

    >>> unbiased_from_biased(2.0, 4)
    2.6666666666666665
    """
    if m < 2:
        raise ValueError(f"the unbiased variance needs at least 2 values, got m={m}")
    return var * (m / (m - 1))


def biased_from_unbiased(var: Any, m: int) -> Any:
    """Biased variance ``var * (m-1)/m`` from an unbiased one over ``m`` values (``m >= 2``).

    >>> biased_from_unbiased(2.6666666666666665, 4)
    2.0
    """
    if m < 2:
        raise ValueError(f"the unbiased variance needs at least 2 values, got m={m}")
    return var * ((m - 1) / m)


@dataclass(frozen=True)
class FrameworkConvention:
    """How one framework spells BN's hyper-parameters, mapped to the core's decays."""

    name: str
    momentum_is: Literal["decay", "update_rate"]
    default_momentum: float | None
    running_var: Estimator
    default_eps: float
    eps_placement: str
    cumulative_average: str

    def decay(self, momentum: float) -> float:
        """The core's decay for this framework's ``momentum`` value."""
        if self.momentum_is == "update_rate":
            return decay_from_update_rate(momentum)
        return validate_decay(momentum, f"{self.name} momentum")

    def momentum(self, decay: float) -> float:
        """This framework's ``momentum`` value for the core's decay."""
        if self.momentum_is == "update_rate":
            return update_rate_from_decay(decay)
        return validate_decay(decay)


FRAMEWORKS: dict[str, FrameworkConvention] = {
    c.name: c
    for c in (
        FrameworkConvention("mbn_ref", "decay", 0.9, "biased", 1e-5, "inside sqrt", "decay=None"),
        FrameworkConvention("paper", "decay", None, "biased", 1e-5, "inside sqrt", "none"),
        FrameworkConvention(
            "torch", "update_rate", 0.1, "unbiased", 1e-5, "inside sqrt", "momentum=None"
        ),
        FrameworkConvention("keras", "decay", 0.99, "biased", 1e-3, "inside sqrt", "none"),
        FrameworkConvention("flax", "decay", 0.99, "biased", 1e-5, "inside sqrt", "none"),
        FrameworkConvention("onnx", "decay", 0.9, "biased", 1e-5, "inside sqrt", "none"),
    )
}
"""Each framework's BN conventions (the docs' conventions table is generated from this)."""
