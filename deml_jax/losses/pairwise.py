"""Fixed-shape helpers shared by the pair losses of the neighbouring methods.

Used by contrastive, triplet, energy_confusion and abe (related-methods.md §2-§4).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from deml_jax.losses.binomial import check_mask


def check_labels(labels, batch, name="labels"):
    """Return ``labels`` as an int array [batch]; raise naming ``name`` otherwise."""
    labels = jnp.asarray(labels)
    if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be int [{batch}], got {labels.dtype} {labels.shape}")
    return labels


def pair_masks(labels, mask):
    """Symmetric masks [B, B] over ordered pairs i != k of valid rows: (pos, neg).

    ``mask`` is None or bool [B]; rows with mask False join no pair.
    """
    b = labels.shape[0]
    valid = check_mask(mask, b)
    off_diag = ~jnp.eye(b, dtype=bool)
    pair = off_diag & valid[:, None] & valid[None, :]
    same = labels[:, None] == labels[None, :]
    return pair & same, pair & ~same


def upper(m):
    """Keep only i < k of a [..., B, B] bool mask (each unordered pair once)."""
    b = m.shape[-1]
    return m & jnp.triu(jnp.ones((b, b), dtype=bool), k=1)


def sq_dists(x, valid):
    """Squared Euclidean distances [..., B, B] of rows of x [..., B, D], clamped >= 0.

    Rows are centred on the (stop-gradient) mean of the valid rows before the
    Gram form ``|a|^2 + |b|^2 - 2 a.b``: distances are translation invariant,
    so the value and the gradient are unchanged while the cancellation error
    of large-offset inputs (unnormalised embeddings) goes away.
    """
    w = valid.astype(x.dtype)[..., :, None]
    count = jnp.maximum(jnp.sum(w, axis=-2, keepdims=True), 1.0)
    centre = jnp.sum(x * w, axis=-2, keepdims=True) / count
    xc = x - jax.lax.stop_gradient(centre)
    sq = jnp.sum(jnp.square(xc), axis=-1)
    gram = jnp.einsum("...id,...kd->...ik", xc, xc)
    return jnp.maximum(sq[..., :, None] + sq[..., None, :] - 2.0 * gram, 0.0)


def safe_sqrt(x, tiny=1e-12):
    """sqrt with a zero (not NaN/inf) gradient at x <= tiny."""
    ok = x > tiny
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, x, 1.0)), 0.0)


def random_partners(key, candidates, num):
    """Bool [B, B]: up to ``num`` partners per row drawn uniformly from ``candidates``.

    Gumbel top-k over each row's candidate mask (sampling without replacement,
    fixed shape); a row with fewer than ``num`` candidates takes all of them.
    """
    b = candidates.shape[-1]
    k = min(int(num), b)
    g = jax.random.gumbel(key, candidates.shape, dtype=jnp.float32)
    scores = jnp.where(candidates, g, -jnp.inf)
    vals, idx = jax.lax.top_k(scores, k)                       # [B, k]
    hit = jax.nn.one_hot(idx, b, dtype=jnp.float32) * (vals > -jnp.inf)[..., None]
    return jnp.sum(hit, axis=-2) > 0.5                         # [B, B]


def masked_mean(values, m):
    """Mean of ``values`` over the bool mask ``m`` (0 when m is empty)."""
    n = jnp.sum(m).astype(values.dtype)
    return jnp.sum(jnp.where(m, values, 0.0)) / jnp.maximum(n, 1.0)


def require_key(key, what):
    if key is None:
        raise ValueError(f"{what} needs a jax.random key: pass key=jax.random.key(...)"
                         " (got key=None)")
    return key
