"""The shipped conformance suite, run against any implementation through its Adapter.

Run it with pytest::

    pytest --pyargs mbn_conformance.suite --mbn-impl my_package.adapter:make_adapter
    pytest --pyargs mbn_conformance.suite --mbn-backend numpy

``test_golden`` runs every golden case of the committed vectors, ``test_checks`` the
refusals of bad input and the checks of an implementation's own scheduler, and
``test_properties`` the hypothesis properties of :mod:`mbn_conformance.properties`. The
checks, their skips and expected failures come from :func:`mbn_conformance.checks.checks`
through the plugin :mod:`mbn_conformance.pytest_plugin`, which only renders them.
"""
