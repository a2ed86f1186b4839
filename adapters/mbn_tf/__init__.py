"""mbn_tf: the TensorFlow / Keras 3 adapter (planned; its seams: docs/adapters.md)."""
