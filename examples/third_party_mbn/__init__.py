"""The worked example of ``docs/conformance.md``: a third-party BN/MBN and its adapter.

The implementation is :mod:`.tinynorm`, its conformance adapter :mod:`.adapter`.
"""
