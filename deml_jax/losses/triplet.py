"""Triplet loss with hard or random negatives (related-methods.md §2.5, ECAML baseline).

On L2-normalised embeddings with the cosine similarity s, in the form of
ECAML's ``RankHardLoss`` first term, ``[m - s(a, p) + s(a, n)]_+`` (m = 0.1 there).
Here every valid (anchor, positive) pair a != p of the batch is a triplet and
gets ONE negative n of the anchor's:
  - ``"hard"``: the anchor's hardest negative (largest s(a, n));
  - ``"random"``: uniform among the anchor's negatives, drawn per (a, p) with a key.
This is a simplification of RankHardLoss (which keeps neg_num = 120 violating
negatives, half hard and half random, and adds the symmetric ``s(p, n)`` term).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from deml_jax.losses.binomial import _learner_stack, check_mask, safe_l2_normalize
from deml_jax.losses.pairwise import check_labels, masked_mean, pair_masks, require_key

# related-methods.md §2.5: RankHardLoss margin in the ECAML prototxts.
TRIPLET_MARGIN = 0.1
NEGATIVES = ("hard", "random")


def triplet_loss(embeddings, labels, *, margin=TRIPLET_MARGIN, negatives="hard",
                 key=None, mask=None):
    """Mean over triplets of ``max(0, margin - s(a, p) + s(a, n))`` (see module doc).

    The triplets are the ordered valid pairs (a, p), a != p, same label, whose
    anchor has at least one valid negative. For [M, B, D] input the loss is the
    mean over the M learners (hard negatives are mined per learner; random
    negatives are shared by the learners).

    Args:
      embeddings: [B, D] or [M, B, D], any float dtype (normalised inside).
      labels: int [B].
      margin: m, on the cosine similarity.
      negatives: "hard" or "random".
      key: jax.random key, required for negatives="random".
      mask: optional bool [B]; False rows are neither anchor, positive nor negative.

    Returns:
      (loss, aux), aux: n_triplets, frac_active (triplets with a positive hinge),
      mean_pos_sim, mean_neg_sim (s(a, p) and the chosen s(a, n) over triplets).
      A batch without a triplet gives 0.
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if negatives == "random":
        key = require_key(key, 'triplet_loss(negatives="random")')
    y = _learner_stack(embeddings)
    b = y.shape[1]
    labels = check_labels(labels, b)
    valid = check_mask(mask, b)
    pos, neg = pair_masks(labels, valid)                       # [B, B] symmetric
    yhat = safe_l2_normalize(y)
    sim = jnp.einsum("mid,mkd->mik", yhat, yhat)               # [M, B, B]
    n_neg_a = jnp.sum(neg, axis=1)                             # [B]
    if negatives == "hard":
        s_an = jnp.max(jnp.where(neg, sim, -jnp.inf), axis=2)  # [M, B]
        s_an = jnp.where(n_neg_a > 0, s_an, 0.0)[:, :, None]   # same for every p
    else:
        # Negatives of each anchor listed first (stable order), then pick the
        # k-th of them with k uniform in [0, n_neg(a)) for every (a, p).
        order = jnp.argsort(~neg, axis=1, stable=True)         # [B, B]
        u = jax.random.uniform(key, (b, b), dtype=jnp.float32)
        k = jnp.minimum(jnp.floor(u * n_neg_a[:, None]).astype(jnp.int32),
                        jnp.maximum(n_neg_a[:, None] - 1, 0))
        idx = jnp.take_along_axis(order, k, axis=1)            # [B(a), B(p)] -> n
        s_an = jnp.take_along_axis(sim, jnp.broadcast_to(idx, sim.shape), axis=2)
    trip = pos & (n_neg_a > 0)[:, None]                        # [B(a), B(p)]
    hinge = jnp.maximum(margin - sim + s_an, 0.0)              # [M, B, B]
    per = jnp.mean(hinge, axis=0)
    loss = masked_mean(per, trip)
    aux = {
        "n_triplets": jnp.sum(trip).astype(y.dtype),
        "frac_active": masked_mean(jnp.mean((hinge > 0).astype(y.dtype), axis=0), trip),
        "mean_pos_sim": masked_mean(jnp.mean(sim, axis=0), trip),
        "mean_neg_sim": masked_mean(jnp.mean(jnp.broadcast_to(s_an, sim.shape), axis=0), trip),
    }
    return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, aux)
