"""fusedloss benchmark suite: ``python -m benchmarks --help``; ``benchmarks/README.md``."""
