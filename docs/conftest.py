"""The pages' code blocks run as doctests (``--doctest-glob``) with the test suite's JAX
settings: 8 host CPU devices (the multi-device examples build their meshes on them),
strict dtype promotion and no rank promotion. They are tests/conftest.py's, run here
too because pytest loads a conftest only for the tests below its folder."""

import runpy
from pathlib import Path

# The mkdocs hooks import mkdocs, which the test environment need not have.
collect_ignore = ["hooks"]

runpy.run_path(str(Path(__file__).resolve().parents[1] / "tests" / "conftest.py"))
