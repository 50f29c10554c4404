"""Fused ``x @ w`` + softmax cross-entropy that never materializes the logits."""

from fusedloss.linear_cross_entropy.api import LinearCrossEntropyAux as LinearCrossEntropyAux
from fusedloss.linear_cross_entropy.api import linear_cross_entropy as linear_cross_entropy
from fusedloss.linear_cross_entropy.xla import XlaConfig as XlaConfig

__all__ = ["LinearCrossEntropyAux", "XlaConfig", "linear_cross_entropy"]
