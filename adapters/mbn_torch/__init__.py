"""mbn_torch: planned, see DESIGN.md."""
