"""The ``python -m DiffusionCore`` command line (see :mod:`DiffusionCore.cli.main`)."""
