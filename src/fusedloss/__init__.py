"""fusedloss: fast, memory-lean loss functions for JAX."""

from importlib.metadata import PackageNotFoundError, version

from fusedloss._reduce import reduce_loss as reduce_loss
from fusedloss._softmax_ce import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from fusedloss.linear_cross_entropy import LinearCrossEntropyAux as LinearCrossEntropyAux
from fusedloss.linear_cross_entropy import XlaConfig as XlaConfig
from fusedloss.linear_cross_entropy import linear_cross_entropy as linear_cross_entropy

try:
    __version__ = version("fusedloss")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "LinearCrossEntropyAux",
    "XlaConfig",
    "linear_cross_entropy",
    "reduce_loss",
    "softmax_cross_entropy_with_integer_labels",
]
