"""mbn_tf: planned, see DESIGN.md."""
