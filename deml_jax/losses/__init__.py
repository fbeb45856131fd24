"""Loss functions of DeML: pure ``(inputs..., *, hyper-parameters) -> (loss, aux)``.

docs/reference.md §5 (released code) and §14.1 (reconstructed adversary).
"""
from deml_jax.losses.binomial import binomial_deviance, safe_l2_normalize
from deml_jax.losses.diversity import adversary_loss, adversary_mhn_loss, hinge_diversity
from deml_jax.losses.regularizers import activation_loss, row_norm_penalty
# Neighbouring methods (related-methods.md §2-§4): ABE, ECAML, CPF and base losses.
from deml_jax.losses.abe import abe_divergence
from deml_jax.losses.contrastive import contrastive_loss
from deml_jax.losses.cpf import CPF_DEFAULTS, cpf_defaults, cpf_loss
from deml_jax.losses.energy_confusion import energy_confusion
from deml_jax.losses.triplet import triplet_loss

__all__ = [
    "CPF_DEFAULTS",
    "abe_divergence",
    "contrastive_loss",
    "cpf_defaults",
    "cpf_loss",
    "energy_confusion",
    "triplet_loss",
    "activation_loss",
    "adversary_loss",
    "adversary_mhn_loss",
    "binomial_deviance",
    "hinge_diversity",
    "row_norm_penalty",
    "safe_l2_normalize",
]
