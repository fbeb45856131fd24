"""Loss functions of DeML: pure ``(inputs..., *, hyper-parameters) -> (loss, aux)``.

deml-reference.md §5 (released code) and §14.1 (reconstructed adversary).
"""
from deml_jax.losses.binomial import binomial_deviance, safe_l2_normalize
from deml_jax.losses.diversity import adversary_loss, hinge_diversity
from deml_jax.losses.regularizers import activation_loss, row_norm_penalty

__all__ = [
    "activation_loss",
    "adversary_loss",
    "binomial_deviance",
    "hinge_diversity",
    "row_norm_penalty",
    "safe_l2_normalize",
]
