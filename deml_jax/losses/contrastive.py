"""Contrastive loss, the ABE metric loss (related-methods.md §3.2).

``L_c = (1 - y) 1/2 d^2 + y 1/2 max(0, m_c - d)^2`` (y = 1 for a different-class
pair), d the Euclidean distance between L2-normalised embeddings [RECALLED paper
form, related-methods.md §3.2; m_c is not known from the paper].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from deml_jax.losses.binomial import _learner_stack, check_mask, safe_l2_normalize
from deml_jax.losses.pairwise import (check_labels, masked_mean, pair_masks, safe_sqrt,
                                      sq_dists, upper)


def contrastive_loss(embeddings, labels, *, margin, mask=None):
    """Contrastive loss over all unordered pairs i<k of valid rows (related-methods.md §3.2).

    ``L = (1/n_pairs) [ sum_pos 1/2 d_ik^2 + sum_neg 1/2 max(0, margin - d_ik)^2 ]``,
    ``d_ik = ||x^_i - x^_k||`` with x^ the L2-normalised embeddings (a zero vector
    maps to 0), ``n_pairs = n_pos + n_neg``. For [M, B, D] input the loss is the
    MEAN over the M learners (ABE sums the per-learner losses: multiply by M).

    Args:
      embeddings: [B, D] or [M, B, D], any float dtype (normalised inside).
      labels: int [B].
      margin: m_c, on the Euclidean distance of unit vectors (in [0, 2]).
      mask: optional bool [B]; False rows join no pair and no count.

    Returns:
      (loss, aux), aux: contrastive_pos, contrastive_neg (their shares of the
      loss), n_pos, n_neg (pair counts), frac_active_neg (negatives with
      d < margin), mean_pos_dist, mean_neg_dist. A batch without any pair
      gives 0.
    """
    y = _learner_stack(embeddings)
    b = y.shape[1]
    labels = check_labels(labels, b)
    valid = check_mask(mask, b)
    pos, neg = pair_masks(labels, valid)
    pos, neg = upper(pos), upper(neg)
    yhat = safe_l2_normalize(y)
    d2 = sq_dists(yhat, valid)                                  # [M, B, B]
    d = safe_sqrt(d2)
    n_pos, n_neg = pos.sum().astype(y.dtype), neg.sum().astype(y.dtype)
    n_pairs = jnp.maximum(n_pos + n_neg, 1.0)
    pos_term = jnp.mean(0.5 * d2, axis=0)
    neg_term = jnp.mean(0.5 * jnp.square(jnp.maximum(margin - d, 0.0)), axis=0)
    loss_pos = jnp.sum(jnp.where(pos, pos_term, 0.0)) / n_pairs
    loss_neg = jnp.sum(jnp.where(neg, neg_term, 0.0)) / n_pairs
    mean_d = jnp.mean(d, axis=0)
    active = jnp.mean((d < margin).astype(y.dtype), axis=0)
    aux = {
        "contrastive_pos": loss_pos, "contrastive_neg": loss_neg,
        "n_pos": n_pos, "n_neg": n_neg,
        "frac_active_neg": masked_mean(active, neg),
        "mean_pos_dist": masked_mean(mean_d, pos),
        "mean_neg_dist": masked_mean(mean_d, neg),
    }
    return loss_pos + loss_neg, jax.tree_util.tree_map(jax.lax.stop_gradient, aux)
