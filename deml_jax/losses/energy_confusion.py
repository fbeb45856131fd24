"""ECAML energy-confusion term (related-methods.md §2.2, ``src/energy_confusion.cpp``).

``E = sum_{(i,j) in S} 1/2 ||z_i - z_j||^2 / n_neg`` over a set S of
different-class pairs and ``L_ec = log(E + eps)`` (the layer reports E; log E
is what its backward minimises, related-methods.md §2.2.4). z is the output of the shared-weight
copy of the embedding layer on stop-gradient features (built by the model; the
weight-row-norm regulariser of related-methods.md §2.3 is ``losses.row_norm_penalty``).

The released layer samples R = 10 partners j > i + 1 per anchor from a
pair-ordered list, i.e. different-class partners only (related-methods.md §2.2.5); here the
negatives are sampled explicitly (related-methods.md §2.2 recommended form):
  - ``"random"``: R different-class partners per anchor, without replacement,
    from a jax.random key (anchors with fewer take all they have; the pair
    (i, j) counts once per anchor that drew it);
  - ``"all_neg"``: every different-class pair i < j once (deterministic).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from deml_jax.losses.binomial import as_float, check_mask
from deml_jax.losses.pairwise import (check_labels, pair_masks, random_partners, require_key,
                                      sq_dists, upper)

# related-methods.md §2.6: random_num 10 (R), loss_weight 0.13 (applied by the caller).
EC_PARTNERS = 10
EC_WEIGHT = 0.13
PAIRS = ("all_neg", "random")


def energy_confusion(z, labels, *, pairs="all_neg", num_partners=EC_PARTNERS, key=None,
                     mask=None, eps=1e-12):
    """``log(E + eps)``, E the pair-count-normalised half squared distances (related-methods.md §2.2).

    Args:
      z: [B, D] any float dtype, unnormalised (the confusion branch's output).
      labels: int [B].
      pairs: "all_neg" or "random".
      num_partners: R, partners per anchor for pairs="random".
      key: jax.random key, required for pairs="random".
      mask: optional bool [B]; False rows join no pair and no count.
      eps: added to E inside the log.

    Returns:
      (loss, aux): loss = log(E + eps), or 0 (with zero gradient) when no pair
      is selected (e.g. a single-class batch). aux: ec_energy (E), ec_log
      (= loss), n_neg (different-class pairs i<j, the normaliser),
      n_ec_pairs (pairs summed in E).
    """
    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    if pairs == "random":
        key = require_key(key, 'energy_confusion(pairs="random")')
    z = as_float(z, "z")
    if z.ndim != 2:
        raise ValueError(f"z must be [B, D], got shape {z.shape}")
    b = z.shape[0]
    labels = check_labels(labels, b)
    valid = check_mask(mask, b)
    _, neg = pair_masks(labels, valid)                         # symmetric, i != j
    n_neg = jnp.sum(upper(neg)).astype(z.dtype)
    if pairs == "all_neg":
        sel = upper(neg)
    else:
        sel = random_partners(key, neg, num_partners)
    d2 = sq_dists(z, valid)                                    # [B, B]
    energy = jnp.sum(jnp.where(sel, 0.5 * d2, 0.0)) / jnp.maximum(n_neg, 1.0)
    n_sel = jnp.sum(sel).astype(z.dtype)
    loss = jnp.where(n_sel > 0, jnp.log(energy + eps), 0.0)
    aux = {"ec_energy": energy, "ec_log": loss, "n_neg": n_neg, "n_ec_pairs": n_sel}
    return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, aux)
