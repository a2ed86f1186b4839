"""The shipped conformance suite, run against any implementation through its Adapter.

Run it with pytest::

    pytest --pyargs mbn_conformance.suite --mbn-impl my_package.adapter:make_adapter
    pytest --pyargs mbn_conformance.suite --mbn-backend numpy

``test_golden`` runs every golden case of the committed vectors; ``test_properties`` runs the
hypothesis properties of :mod:`mbn_conformance.properties`. Options, skips and expected
failures come from the plugin :mod:`mbn_conformance.pytest_plugin`.
"""
