"""Examples (importable as ``examples.*`` from the repository root)."""
