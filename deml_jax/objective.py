"""The DeML training objective as trained by the released code (docs/reference.md §5.4).

For one loss scope (a device's sub-batch, or the global batch)::

    L = sum_b [ L_bin^b + w_div * L_div^b + w_act * L_act^b ]  +  sum_b R_b
        (+ w_adv * sum_b L_adv^b + sum_b R_adv^b   for diversity='adversary')
        (+ w_mhn * sum_b L_mhn^b                    for diversity='adversary_mhn',
           related-methods.md §1.3: the shared adversary's mean learner-pair distance)

``R_b`` (the FC row-norm regulariser, §5.3) is added unweighted; because every
device adds it and the gradients are averaged, it appears exactly once (§5.4).
"""

from __future__ import annotations

import jax.numpy as jnp

from deml_jax.losses import (activation_loss, adversary_loss, adversary_mhn_loss,
                             binomial_deviance, hinge_diversity, row_norm_penalty)
from deml_jax.models.adversary import adversary_row_norm_penalty
from deml_jax.ops import dann_lambda

DIVERSITY_KINDS = ("hinge", "adversary", "adversary_mhn", "none")
ADVERSARY_MHN_SCHEDULES = ("constant", "dann")


def reversal_scale(cfg, step, total_steps):
    """The gradient-reversal scale lambda fed to the model as ``grl_scale``.

    DANN schedule of the Caffe GradientsReverse layer (§9.1, gamma
    ``cfg.adversary_gamma``), except for ``diversity='adversary_mhn'`` with
    ``cfg.adversary_mhn_schedule='constant'``: lambda = 1, as MHN (related-methods.md
    related-methods.md §1.3). ``step`` is Caffe's 1-based forward counter (the train step passes step + 1).
    """
    if cfg.diversity == "adversary_mhn":
        if cfg.adversary_mhn_schedule not in ADVERSARY_MHN_SCHEDULES:
            raise ValueError("config.loss.adversary_mhn_schedule must be one of "
                             f"{ADVERSARY_MHN_SCHEDULES}, got {cfg.adversary_mhn_schedule!r}")
        if cfg.adversary_mhn_schedule == "constant":
            return jnp.float32(1.0)
    return dann_lambda(step, total_steps, gamma=cfg.adversary_gamma)


def deml_loss(outputs, labels, params, cfg, *, mask=None):
    """Total DeML loss.

    Args:
      outputs: the dict of :class:`deml_jax.models.DeML` (``embeddings``
        ``[I, J, B, D]``, ``act`` ``[I, B, D]``, optional ``adversary``,
        ``adversary_mhn``).
      labels: int ``[B]``.
      params: the model's ``params`` collection (for the regularisers).
      cfg: ``config.loss`` (configs/common.py).
      mask: optional bool ``[B]``; False rows take part in no pair.

    Returns:
      ``(loss, aux)``; aux holds each weighted part and the binomial display value.
    """
    if cfg.diversity not in DIVERSITY_KINDS:
        raise ValueError(f"config.loss.diversity must be one of {DIVERSITY_KINDS}, "
                         f"got {cfg.diversity!r}")
    parts, displays = {}, {}
    for b in range(outputs["embeddings"].shape[0]):
        branch_parts, branch_aux = _branch_terms(outputs, b, labels, params, cfg, mask)
        for k, v in branch_parts.items():
            parts[k] = parts.get(k, jnp.float32(0.0)) + v
        for k, v in branch_aux.items():
            displays.setdefault(k, []).append(v)
    loss = sum(parts.values())
    aux = {k: jnp.mean(jnp.stack(v)) for k, v in displays.items()}  # branch means
    aux.update(parts)
    aux["loss"] = loss
    return loss, aux


def _branch_terms(outputs, b, labels, params, cfg, mask):
    """Weighted loss terms of branch ``b`` and its display values."""
    emb = outputs["embeddings"][b]
    branch = params[f"branch_{b}"]
    bin_loss, bin_aux = binomial_deviance(
        emb, labels, alpha=cfg.alpha, beta=cfg.beta, cost_pos=cfg.cost_pos,
        cost_neg=cfg.cost_neg, shrinkage=cfg.shrinkage, mask=mask)
    parts = {"binomial": bin_loss}
    aux = {"binomial_display": bin_aux["binomial_display"],
           "mean_pos_cos": bin_aux["mean_pos_cos"], "mean_neg_cos": bin_aux["mean_neg_cos"]}
    if cfg.diversity == "hinge" and emb.shape[0] > 1:
        div, _ = hinge_diversity(emb, margin=cfg.margin, mask=mask)
        parts["diversity"] = cfg.diversity_weight * div
    if cfg.diversity == "adversary" and "adversary" in outputs:
        pred, target = outputs["adversary"]
        adv, _ = adversary_loss(pred[b], target[b], mask=mask, form=cfg.adversary_form)
        parts["adversary"] = cfg.adversary_weight * adv
        parts["adversary_row_norm"] = adversary_row_norm_penalty(
            branch["adversary"], cfg.adversary_row_norm_lambda)
    if cfg.diversity == "adversary_mhn" and "adversary_mhn" in outputs:  # J > 1 only
        adv, adv_aux = adversary_mhn_loss(outputs["adversary_mhn"][b], mask=mask)
        parts["adversary_mhn"] = cfg.adversary_mhn_weight * adv
        aux["adversary_mhn_distance"] = adv_aux["adversary_mhn_distance"]
    if cfg.act_weight:
        act, _ = activation_loss(outputs["act"][b], mask=mask)
        parts["activation"] = cfg.act_weight * act
    if cfg.row_norm_lambda:
        parts["row_norm"] = row_norm_penalty(branch["embed"]["kernel"], lam=cfg.row_norm_lambda)
    return parts, aux
