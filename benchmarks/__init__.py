"""fusedloss benchmark suite: ``python -m benchmarks --help``.

Modules, one job each:

* :mod:`benchmarks.shapes`: named real-model heads, sweeps, per-backend scaling.
* :mod:`benchmarks.contenders`: fusedloss implementations, the optax baseline,
  jax-cce and tokamax, each skipped with a reason when it cannot run.
* :mod:`benchmarks.measure`: timing, compiled temp bytes, device peak, matmul peak.
* :mod:`benchmarks.runner`: cases x contenders x modes -> flat result records.
* :mod:`benchmarks.standard`: standard losses against their optax twins.
* :mod:`benchmarks.report`, :mod:`benchmarks.plots`, :mod:`benchmarks.console`:
  JSON / markdown, PNG plots, progress bar and console tables.
* :mod:`benchmarks.cli`: the command line.
"""
