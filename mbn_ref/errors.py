"""Exceptions the core raises beyond the built-in ``ValueError``/``TypeError``."""

from __future__ import annotations


class NonFiniteError(ValueError, FloatingPointError):
    """A batch held NaN or Inf and the ``nonfinite`` policy is ``"raise"`` (docs/spec.md §9)."""
