"""Momentum schedules (SPEC §4): placeholder, filled in by the schedules work."""
