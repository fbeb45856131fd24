"""ABE divergence loss between the M learners (related-methods.md §3.2).

Per image x: ``L_div(x) = sum_{i != j} max(0, m_div - ||f_i(x) - f_j(x)||^2)``
over ordered learner pairs [RECALLED paper form, structure confirmed by two
third-party implementations], averaged over the valid images. For unit vectors
this is ``2 max(0, <f_i, f_j> - (1 - m_div / 2))``: HORDE's cosine threshold 0.5
is m_div = 1, the PyTorch ABE_loss's 0.2 is m_div = 1.6 (related-methods.md §3.2 table).

``all_pairs=True`` is HORDE's variant: learner pairs k != l over ALL ordered
image pairs (n, n'), n = n' included, averaged over the valid image pairs
(HORDE averages over the active entries instead; not reproduced).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from deml_jax.losses.binomial import as_float, check_mask, safe_l2_normalize


def abe_divergence(embeddings, *, margin_div, mask=None, all_pairs=False, normalize=False):
    """ABE divergence (related-methods.md §3.2), see the module docstring.

    Args:
      embeddings: [M, B, D] learner embeddings f_m(x_b) (ABE's are already
        L2-normalised per learner; ``normalize=True`` normalises here).
      margin_div: m_div, on the squared Euclidean distance.
      mask: optional bool [B]; False images join no term and no count.
      all_pairs: HORDE's all-image-pairs variant.

    Returns:
      (loss, aux), aux: div_active (fraction of the counted learner pairs with
      d^2 < m_div), div_mean_sq_dist (their mean d^2). M = 1 or no valid
      image gives 0.
    """
    f = as_float(embeddings, "embeddings")
    if f.ndim != 3:
        raise ValueError(f"embeddings must be [M, B, D] (learners, batch, dim), "
                         f"got shape {f.shape}")
    m, b, _ = f.shape
    valid = check_mask(mask, b)
    if normalize:
        f = safe_l2_normalize(f)
    diff_learner = ~jnp.eye(m, dtype=bool)
    if all_pairs:
        x = f.reshape(m * b, -1)                               # row (k, n)
        sq = jnp.sum(jnp.square(x), axis=-1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
        d2 = jnp.maximum(d2, 0.0).reshape(m, b, m, b)          # [k, n, l, n']
        terms = diff_learner[:, None, :, None] & valid[None, :, None, None] \
            & valid[None, None, None, :]
        n_img = jnp.square(jnp.sum(valid)).astype(f.dtype)
    else:
        diff = f[:, None] - f[None, :]                         # [k, l, B, D]
        d2 = jnp.sum(jnp.square(diff), axis=-1)                # [k, l, B]
        terms = diff_learner[:, :, None] & valid[None, None, :]
        n_img = jnp.sum(valid).astype(f.dtype)
    hinge = jnp.where(terms, jnp.maximum(margin_div - d2, 0.0), 0.0)
    loss = jnp.sum(hinge) / jnp.maximum(n_img, 1.0)
    n_terms = jnp.maximum(jnp.sum(terms).astype(f.dtype), 1.0)
    aux = {
        "div_active": jnp.sum(terms & (d2 < margin_div)).astype(f.dtype) / n_terms,
        "div_mean_sq_dist": jnp.sum(jnp.where(terms, d2, 0.0)) / n_terms,
    }
    return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, aux)
