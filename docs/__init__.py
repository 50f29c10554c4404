"""Not a package to import: this file makes pytest import docs/conftest.py as
``docs.conftest``, so that it does not take the module name ``conftest`` of
tests/conftest.py (which the doctest collector imports by that name)."""
