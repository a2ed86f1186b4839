"""Data-parallel training with MBN on ``torch.distributed`` (``train.py``)."""
