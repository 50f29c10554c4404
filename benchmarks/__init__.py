"""fusedloss benchmark suite: ``python -m benchmarks --help``.

* :mod:`benchmarks.cases`: real-model heads, sweeps, how each suite scales them.
* :mod:`benchmarks.contenders`: the table of heads (:data:`~benchmarks.contenders.HEADS`),
  their contenders and the one input builder.
* :mod:`benchmarks.harness`: the one timing harness, compile-only temporaries, matmul peak.
* :mod:`benchmarks.suite`: heads x cases x contenders -> records; standard losses.
* :mod:`benchmarks.targets`: compile-only GPU/TPU targets, in their own interpreter.
* :mod:`benchmarks.report`: JSON, tables, plots and the progress bar.
* :mod:`benchmarks.cli`: the command line and its modes.
"""
