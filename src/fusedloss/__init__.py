"""fusedloss: fast, memory-lean loss functions for JAX."""

from importlib.metadata import PackageNotFoundError, version

from fusedloss._reduce import reduce_loss as reduce_loss

try:
    __version__ = version("fusedloss")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "reduce_loss",
]
