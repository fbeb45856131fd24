"""DeML(I, J) (docs/reference.md §0-§6): the hybrid-attention model and its objective.

Model: :class:`deml_jax.models.DeML` from ``config.model``.  Objective: the
released total loss (deml_jax/objective.py, §5.4) and, with
``config.loss.confusion='ecaml'``, ECAML's energy-confusion term on each
branch's ``act`` output (related-methods.md §1.5: DeML's ``fc_embedding_a`` is
``W_b`` on ``stop_gradient`` of learner 1's pooled features, the structure of
ECAML's confusion branch, §2.1).  DeML's embedding layer has no bias.  The
activation loss keeps its own weight (``--config.loss.act_weight=0`` to let
the confusion term replace it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deml_jax import methods
from deml_jax.models import build_model as _build_deml
from deml_jax.objective import deml_loss, reversal_scale

CONFUSION_KINDS = ("none", "ecaml")


def build_model(config):
    kwargs = {}
    if "adversary_mhn_hidden" in config.loss:  # diversity='adversary_mhn' (related-methods.md §1.3)
        kwargs["adversary_mhn_hidden"] = config.loss.adversary_mhn_hidden
    return _build_deml(config.model, config.dataset.mean_bgr, config.loss.diversity,
                       config.dataset.augmentation, **kwargs)


def confusion_term(z, labels, cfg, *, key=None, mask=None):
    """``ec_weight * energy_confusion(z)`` (related-methods.md §2.2) and its aux.

    ``cfg`` is ``config.loss`` (``ec_weight``, ``ec_pairs`` 'random' | 'all_neg',
    ``ec_partners`` R).  'random' needs ``key``.
    """
    from deml_jax.losses.energy_confusion import energy_confusion
    if cfg.ec_pairs == "random" and key is None:
        raise ValueError("config.loss.ec_pairs='random' needs a PRNG key for the objective")
    ec, ec_aux = energy_confusion(z, labels, pairs=cfg.ec_pairs, num_partners=cfg.ec_partners,
                                  key=key, mask=mask)
    return cfg.ec_weight * ec, ec_aux


def check_confusion(cfg):
    kind = cfg.get("confusion", "none")
    if kind not in CONFUSION_KINDS:
        raise ValueError(f"config.loss.confusion must be one of {CONFUSION_KINDS}, got {kind!r}")
    return kind


def objective(outputs, labels, params, config, *, mask=None, key=None):
    """The DeML loss (§5.4) + optional ``ec_weight * sum_b EC(act_b)``."""
    cfg = config.loss
    loss, aux = deml_loss(outputs, labels, params, cfg, mask=mask)
    if check_confusion(cfg) == "ecaml":
        total = jnp.float32(0.0)
        for b in range(outputs["act"].shape[0]):
            k = None if key is None else jax.random.fold_in(key, b)
            term, _ = confusion_term(outputs["act"][b], labels, cfg, key=k, mask=mask)
            total = total + term
        aux = dict(aux, confusion=total)
        loss = loss + total
        aux["loss"] = loss
    return loss, aux


def load_pretrained(params, batch_stats, converted):
    """The "3nets" initialisation (§3.2): every branch trunk gets a copy."""
    from deml_jax.models import weights
    params = weights.replicate_into_branches(params, converted["params"])
    if "batch_stats" in converted:
        batch_stats = weights.replicate_into_branches(batch_stats, converted["batch_stats"])
    return params, batch_stats


def model_kwargs(state, config):
    # Caffe counts the forward pass before the backward reads it (§9.1).
    return {"grl_scale": reversal_scale(config.loss, state["step"] + 1, config.total_steps)}


# Batch axes of the train outputs: embeddings [I, J, B, D], act [I, B, D],
# adversary (pred, target) each [I, P, B, D], adversary_mhn [I, J, B, H].
BATCH_AXES = {"embeddings": 2, "act": 1, "adversary": 2, "adversary_mhn": 2}

METHOD = methods.register(methods.Method(
    name="deml", build_model=build_model, objective=objective,
    load_pretrained=load_pretrained, batch_axes=BATCH_AXES, model_kwargs=model_kwargs,
    summary="DeML(I,J): object + channel attention learners (CVPR 2019, released code)"))
