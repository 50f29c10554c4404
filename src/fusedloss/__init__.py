"""fusedloss: fast, memory-lean loss functions for JAX."""

from importlib.metadata import PackageNotFoundError, version

from fusedloss._reduce import reduce_loss as reduce_loss
from fusedloss._softmax_ce import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from fusedloss.divergences import generalized_kl_divergence as generalized_kl_divergence
from fusedloss.divergences import jensen_shannon_divergence as jensen_shannon_divergence
from fusedloss.divergences import kl_divergence as kl_divergence
from fusedloss.divergences import kl_divergence_with_log_targets as kl_divergence_with_log_targets
from fusedloss.linear_cross_entropy import LinearCrossEntropyAux as LinearCrossEntropyAux
from fusedloss.linear_cross_entropy import XlaConfig as XlaConfig
from fusedloss.linear_cross_entropy import linear_cross_entropy as linear_cross_entropy
from fusedloss.regression import absolute_error as absolute_error
from fusedloss.regression import cosine_distance as cosine_distance
from fusedloss.regression import cosine_similarity as cosine_similarity
from fusedloss.regression import huber_loss as huber_loss
from fusedloss.regression import l2_loss as l2_loss
from fusedloss.regression import log_cosh as log_cosh
from fusedloss.regression import squared_error as squared_error
from fusedloss.regularization import l2_regularization as l2_regularization

try:
    __version__ = version("fusedloss")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "LinearCrossEntropyAux",
    "XlaConfig",
    "absolute_error",
    "cosine_distance",
    "cosine_similarity",
    "generalized_kl_divergence",
    "huber_loss",
    "jensen_shannon_divergence",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "l2_loss",
    "l2_regularization",
    "linear_cross_entropy",
    "log_cosh",
    "reduce_loss",
    "softmax_cross_entropy_with_integer_labels",
    "squared_error",
]
