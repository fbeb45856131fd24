"""Binomial-deviance loss of the released ``BinomialLoss`` layer (docs/reference.md §5.1).

Also holds the small input helpers shared by the losses of this package
(safe L2 normalisation, float32 promotion, label/mask checks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# §5.1 BinomialLossParameter defaults (the layer's, = U512's). DeML's prototxt
# sets cost_n = 35; the caller passes that from its config.
ALPHA = 2.0
BETA = 0.5
COST_POS = 1.0
COST_NEG = 25.0
SHRINKAGE = 0.06
# Below this norm a vector has no usable direction (value of torch's F.normalize eps).
NORM_EPS = 1e-12


def as_float(x, name):
    """Promote ``x`` to at least float32 (bf16/f16 -> f32; f64 kept for x64 tests)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def safe_l2_normalize(x, *, axis=-1, eps=NORM_EPS):
    """``x / ||x||`` along ``axis``; vectors with norm <= eps map to 0.

    Caffe's Normalization layer has no epsilon (§3.6, §5.2). Here a (near-)zero
    vector gives 0 with a zero gradient instead of NaN; every other vector gets
    the exact value and gradient.

    Args:
      x: floating array [..., D] (any float dtype; result has x's dtype).
    """
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    ok = sq > eps * eps
    inv = jnp.where(ok, jax.lax.rsqrt(jnp.where(ok, sq, jnp.ones_like(sq))), 0.0)
    return x * inv.astype(x.dtype)


def check_mask(mask, batch, name="mask"):
    """Return a bool [batch] validity mask (all True when ``mask`` is None)."""
    if mask is None:
        return jnp.ones((batch,), dtype=bool)
    mask = jnp.asarray(mask)
    if mask.shape != (batch,) or mask.dtype != jnp.bool_:
        raise ValueError(
            f"{name} must be bool [{batch}], got {mask.dtype} {mask.shape}")
    return mask


def _learner_stack(embeddings):
    """[B, D] or [M, B, D] -> float [M, B, D]."""
    y = as_float(embeddings, "embeddings")
    if y.ndim == 2:
        y = y[None]
    if y.ndim != 3:
        raise ValueError(
            f"embeddings must be [B, D] or [M, B, D], got shape {y.shape}")
    return y


def _pair_sets(labels, valid):
    """Masks over (i, k) [B, B]: all valid pairs i<k, same-label, positives, negatives."""
    b = labels.shape[0]
    upper = jnp.asarray(np.triu(np.ones((b, b), dtype=bool), k=1))
    pair = upper & valid[:, None] & valid[None, :]
    same = labels[:, None] == labels[None, :]
    return pair, same, pair & same, pair & ~same


def binomial_deviance(embeddings, labels, *, alpha=ALPHA, beta=BETA,
                      cost_pos=COST_POS, cost_neg=COST_NEG,
                      shrinkage=SHRINKAGE, mask=None):
    """Binomial deviance over all pairs i<k, averaged over M learners (§5.1).

    ``L = (1/M) sum_m sum_{i<k} softplus(g_ik (cos^m_ik - beta)) / w_ik`` with
    ``g = -alpha*cost_pos`` (positive pair) or ``+alpha*cost_neg`` (negative),
    ``w = n_pos`` or ``n_neg``. This is the function whose gradient Caffe
    back-propagates; the value Caffe *prints* is the boosting score in
    ``aux['binomial_display']``. Defaults are the layer's (cost_neg 25 = U512);
    the DeML prototxt uses cost_neg 35.

    Args:
      embeddings: [B, D] or [M, B, D], any float dtype, unnormalised (the
        cosine is taken inside, as in Caffe's backward).
      labels: int [B].
      mask: optional bool [B]; False rows join no pair and no count.

    Returns:
      (loss, aux): float32 scalar loss (float64 only for float64 input) and a
      dict of scalars: binomial_pos, binomial_neg, n_pos, n_neg,
      binomial_display, mean_pos_cos, mean_neg_cos. A batch with no positive
      (negative) pair gets a zero positive (negative) term.
    """
    y = _learner_stack(embeddings)
    labels = jnp.asarray(labels)
    if labels.shape != y.shape[1:2] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be int [{y.shape[1]}], got {labels.dtype} {labels.shape}")
    pair, same, pos, neg = _pair_sets(labels, check_mask(mask, y.shape[1]))
    yhat = safe_l2_normalize(y)
    cos = jnp.einsum("mid,mkd->mik", yhat, yhat)               # [M, B, B]
    n_pos, n_neg = pos.sum().astype(y.dtype), neg.sum().astype(y.dtype)
    gamma = jnp.where(same, -alpha * cost_pos, alpha * cost_neg).astype(y.dtype)
    # Safe divisors: a missing pair type contributes an all-masked (zero) sum.
    w = jnp.where(same, jnp.maximum(n_pos, 1.0), jnp.maximum(n_neg, 1.0))
    per_pair = jnp.mean(jax.nn.softplus(gamma * (cos - beta)), axis=0) / w
    loss_pos = jnp.sum(jnp.where(pos, per_pair, 0.0))
    loss_neg = jnp.sum(jnp.where(neg, per_pair, 0.0))
    # §5.1 reported value: s = 0.5 + shrinkage * sum_m (-g)(cos - beta),
    # printed as sum_{i<k} softplus(-s) / w (not the optimised function).
    s = 0.5 + shrinkage * jnp.sum(-gamma * (cos - beta), axis=0)
    display = jnp.sum(jnp.where(pair, jax.nn.softplus(-s) / w, 0.0))
    mean_cos = jnp.mean(cos, axis=0)
    aux = {
        "binomial_pos": loss_pos, "binomial_neg": loss_neg,
        "n_pos": n_pos, "n_neg": n_neg,
        "binomial_display": display,
        "mean_pos_cos": jnp.sum(jnp.where(pos, mean_cos, 0.0)) / jnp.maximum(n_pos, 1.0),
        "mean_neg_cos": jnp.sum(jnp.where(neg, mean_cos, 0.0)) / jnp.maximum(n_neg, 1.0),
    }
    return loss_pos + loss_neg, jax.tree_util.tree_map(jax.lax.stop_gradient, aux)
