"""Conformance adapters for the frameworks' own batch normalization.

Each module holds one adapter and a ``make`` factory for ``mbn-ref conformance --impl``:
``torch_bn`` (``torch.nn.BatchNorm*d``), ``onnx_bn`` (ONNX's reference operator),
``keras_bn`` and ``keras_sync_bn`` (Keras 3's ``BatchNormalization``, plain and
``synchronized=True``), ``flax_bn`` (``flax.linen.BatchNorm``). ``docs/frameworks.md`` tells
what the suite finds in each.
"""
