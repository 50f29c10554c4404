"""Post-training objectives on the fused head: policy gradient and preference.

Each objective's math is a public function of per-token log-probabilities (from any
source); its ``linear_*`` twin composes it with one fused log-probs pass on the head.
"""

from fusedloss.post_training.policy_gradient import DEFAULT_AGGREGATION as DEFAULT_AGGREGATION
from fusedloss.post_training.policy_gradient import PolicyGradientAux as PolicyGradientAux
from fusedloss.post_training.policy_gradient import aggregate_loss as aggregate_loss
from fusedloss.post_training.policy_gradient import kl_penalty as kl_penalty
from fusedloss.post_training.policy_gradient import (
    linear_policy_gradient_loss as linear_policy_gradient_loss,
)
from fusedloss.post_training.policy_gradient import policy_gradient_loss as policy_gradient_loss
from fusedloss.post_training.preference import KTOAux as KTOAux
from fusedloss.post_training.preference import PreferenceAux as PreferenceAux
from fusedloss.post_training.preference import kto_loss as kto_loss
from fusedloss.post_training.preference import linear_kto_loss as linear_kto_loss
from fusedloss.post_training.preference import linear_preference_loss as linear_preference_loss
from fusedloss.post_training.preference import preference_loss as preference_loss

__all__ = [
    "DEFAULT_AGGREGATION",
    "KTOAux",
    "PolicyGradientAux",
    "PreferenceAux",
    "aggregate_loss",
    "kl_penalty",
    "kto_loss",
    "linear_kto_loss",
    "linear_policy_gradient_loss",
    "linear_preference_loss",
    "policy_gradient_loss",
    "preference_loss",
]
