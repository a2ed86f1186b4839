"""mbn_torch: the PyTorch adapter (planned; its seams: docs/adapters.md)."""
