"""A third-party BN/MBN implementation (:mod:`.tinynorm`) and its conformance adapter
(:mod:`.adapter`): the worked example of ``docs/conformance.md``."""
