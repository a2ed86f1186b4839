"""mbn_conformance: planned, see DESIGN.md."""
