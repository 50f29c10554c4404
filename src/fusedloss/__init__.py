"""fusedloss: fast, memory-lean loss functions for JAX."""

from importlib.metadata import PackageNotFoundError, version

from fusedloss import objectives as objectives
from fusedloss import post_training as post_training
from fusedloss._reduce import reduce_loss as reduce_loss
from fusedloss._softmax_ce import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from fusedloss.classification import hinge_loss as hinge_loss
from fusedloss.classification import multiclass_hinge_loss as multiclass_hinge_loss
from fusedloss.classification import multiclass_perceptron_loss as multiclass_perceptron_loss
from fusedloss.classification import multiclass_sparsemax_loss as multiclass_sparsemax_loss
from fusedloss.classification import nll_loss as nll_loss
from fusedloss.classification import perceptron_loss as perceptron_loss
from fusedloss.classification import perplexity as perplexity
from fusedloss.classification import poly_loss_cross_entropy as poly_loss_cross_entropy
from fusedloss.classification import safe_softmax_cross_entropy as safe_softmax_cross_entropy
from fusedloss.classification import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from fusedloss.classification import sigmoid_focal_loss as sigmoid_focal_loss
from fusedloss.classification import smooth_labels as smooth_labels
from fusedloss.classification import softmax_cross_entropy as softmax_cross_entropy
from fusedloss.classification import sparsemax_loss as sparsemax_loss
from fusedloss.divergences import generalized_kl_divergence as generalized_kl_divergence
from fusedloss.divergences import jensen_shannon_divergence as jensen_shannon_divergence
from fusedloss.divergences import kl_divergence as kl_divergence
from fusedloss.divergences import kl_divergence_with_log_targets as kl_divergence_with_log_targets
from fusedloss.heads._ce_head import LinearCrossEntropyAux as LinearCrossEntropyAux
from fusedloss.heads.cross_entropy import linear_cross_entropy as linear_cross_entropy
from fusedloss.heads.distillation import LinearDistillationAux as LinearDistillationAux
from fusedloss.heads.distillation import linear_distillation_loss as linear_distillation_loss
from fusedloss.heads.distillation import (
    linear_topk_distillation_loss as linear_topk_distillation_loss,
)
from fusedloss.heads.log_probs import linear_log_probs as linear_log_probs
from fusedloss.heads.pallas_gpu import PallasGpuConfig as PallasGpuConfig
from fusedloss.heads.pallas_tpu import PallasTpuConfig as PallasTpuConfig
from fusedloss.heads.sharded import (
    sharded_linear_cross_entropy as sharded_linear_cross_entropy,
)
from fusedloss.heads.sharded import (
    sharded_linear_distillation_loss as sharded_linear_distillation_loss,
)
from fusedloss.heads.sharded import (
    sharded_linear_log_probs as sharded_linear_log_probs,
)
from fusedloss.heads.sharded import (
    sharded_linear_topk_distillation_loss as sharded_linear_topk_distillation_loss,
)
from fusedloss.heads.sharded import (
    vocab_parallel_linear_cross_entropy as vocab_parallel_linear_cross_entropy,
)
from fusedloss.heads.transposed import Transposed as Transposed
from fusedloss.heads.xla import XlaConfig as XlaConfig
from fusedloss.objectives import accumulate_gradients as accumulate_gradients
from fusedloss.objectives import causal_lm_objective as causal_lm_objective
from fusedloss.objectives import classification_objective as classification_objective
from fusedloss.post_training import KTOAux as KTOAux
from fusedloss.post_training import PolicyGradientAux as PolicyGradientAux
from fusedloss.post_training import PreferenceAux as PreferenceAux
from fusedloss.post_training import aggregate_loss as aggregate_loss
from fusedloss.post_training import kl_penalty as kl_penalty
from fusedloss.post_training import kto_loss as kto_loss
from fusedloss.post_training import linear_kto_loss as linear_kto_loss
from fusedloss.post_training import linear_policy_gradient_loss as linear_policy_gradient_loss
from fusedloss.post_training import linear_preference_loss as linear_preference_loss
from fusedloss.post_training import policy_gradient_loss as policy_gradient_loss
from fusedloss.post_training import preference_loss as preference_loss
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
    "KTOAux",
    "LinearCrossEntropyAux",
    "LinearDistillationAux",
    "PallasGpuConfig",
    "PallasTpuConfig",
    "PolicyGradientAux",
    "PreferenceAux",
    "Transposed",
    "XlaConfig",
    "absolute_error",
    "accumulate_gradients",
    "aggregate_loss",
    "causal_lm_objective",
    "classification_objective",
    "cosine_distance",
    "cosine_similarity",
    "generalized_kl_divergence",
    "hinge_loss",
    "huber_loss",
    "jensen_shannon_divergence",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "kl_penalty",
    "kto_loss",
    "l2_loss",
    "l2_regularization",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_kto_loss",
    "linear_log_probs",
    "linear_policy_gradient_loss",
    "linear_preference_loss",
    "linear_topk_distillation_loss",
    "log_cosh",
    "multiclass_hinge_loss",
    "multiclass_perceptron_loss",
    "multiclass_sparsemax_loss",
    "nll_loss",
    "objectives",
    "perceptron_loss",
    "perplexity",
    "policy_gradient_loss",
    "poly_loss_cross_entropy",
    "post_training",
    "preference_loss",
    "reduce_loss",
    "safe_softmax_cross_entropy",
    "sharded_linear_cross_entropy",
    "sharded_linear_distillation_loss",
    "sharded_linear_log_probs",
    "sharded_linear_topk_distillation_loss",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "smooth_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "sparsemax_loss",
    "squared_error",
    "vocab_parallel_linear_cross_entropy",
]
