"""Learner-diversity objectives: the released hinge constraint and the adversary loss.

* ``hinge_diversity``: Caffe ContrastiveLoss with all-zero labels between the
  L2-normalised learners of one branch (docs/reference.md §5.2).
* ``adversary_loss``: objective of the reconstructed adversary regressors
  (§14.1; models/adversary.py builds the predictions behind a GRL).
* ``adversary_mhn_loss``: objective of the shared MHN-form adversary
  (related-methods.md §1.3; models/adversary.py ``AdversaryMHN``).
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

from deml_jax.losses.binomial import as_float, check_mask, safe_l2_normalize

# §5.2: ContrastiveLoss margin in the prototxt; 1e-4 is the constant Caffe adds
# to the distance in the backward (contrastive_loss_layer.cu).
MARGIN = 2.0
CAFFE_GRAD_EPS = 1e-4
ADVERSARY_FORMS = ("regression", "correlation")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _distance(diff, grad_eps):
    """``||diff||`` over the last axis with Caffe's derivative diff / (d + grad_eps)."""
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1))


@_distance.defjvp
def _distance_jvp(grad_eps, primals, tangents):
    (diff,), (diff_dot,) = primals, tangents
    d = _distance(diff, grad_eps)
    denom = d + grad_eps
    ok = denom > 0
    # d = 0 with grad_eps = 0: the direction is undefined and diff is 0, so the
    # derivative is taken as 0 (what Caffe's formula gives for any eps > 0).
    ratio = jnp.where(ok, 1.0 / jnp.where(ok, denom, 1.0), 0.0)
    return d, jnp.sum(diff * diff_dot, axis=-1) * ratio


def hinge_diversity(embeddings, *, margin=MARGIN, grad_eps=CAFFE_GRAD_EPS,
                    mask=None):
    """Sum over learner pairs j<k of Caffe's all-dissimilar contrastive loss (§5.2).

    ``L_jk = (1/(2N)) sum_n max(0, margin - d_n)^2``,
    ``d_n = ||yhat_j,n - yhat_k,n||`` on L2-normalised learners; N = valid rows.
    The caller applies the prototxt loss weight 0.2.

    Gradient: with the default ``grad_eps = 1e-4`` the derivative of d is
    ``diff / (d + 1e-4)`` exactly as Caffe's backward (relative difference
    1e-4/d from the true gradient, i.e. < 1e-3 once d > 0.1) and is finite, 0,
    at d = 0. ``grad_eps = 0`` gives the exact gradient (still 0 at d = 0).

    Args:
      embeddings: [J, B, D] any float dtype, the J learners of one branch.
      mask: optional bool [B]; False rows are excluded from sums and from N.

    Returns:
      (loss, aux): scalar (J = 1 gives 0); aux holds ``hinge_{j}_{k}`` per pair
      (0-based learner indices) and ``mean_pair_cos`` over pairs and rows.
    """
    y = as_float(embeddings, "embeddings")
    if y.ndim != 3:
        raise ValueError(f"embeddings must be [J, B, D], got shape {y.shape}")
    n_learners, batch, _ = y.shape
    valid = check_mask(mask, batch)
    n_valid = jnp.maximum(valid.sum().astype(y.dtype), 1.0)
    yhat = safe_l2_normalize(y)
    total = jnp.zeros((), y.dtype)
    cos_sum = jnp.zeros((), y.dtype)
    aux = {}
    pairs = list(itertools.combinations(range(n_learners), 2))
    for j, k in pairs:
        d = _distance(yhat[j] - yhat[k], grad_eps)
        hinge = jnp.square(jnp.maximum(margin - d, 0.0))
        pair_loss = jnp.sum(jnp.where(valid, hinge, 0.0)) / (2.0 * n_valid)
        cos = jnp.sum(yhat[j] * yhat[k], axis=-1)
        cos_sum = cos_sum + jnp.sum(jnp.where(valid, cos, 0.0)) / n_valid
        aux[f"hinge_{j}_{k}"] = pair_loss
        total = total + pair_loss
    aux["mean_pair_cos"] = jax.lax.stop_gradient(cos_sum / max(len(pairs), 1))
    return total, aux


def adversary_loss(predictions, targets, *, mask=None, form="regression"):
    """Loss that the adversary regressors MINIMISE (§14.1).

    The learners see this loss only through the gradient-reversal layer inside
    ``AdversaryRegressors``, so they receive ``-lambda`` times its gradient,
    i.e. they ascend it: they become hard to predict from one another.
    Targets are always treated as constants (stop_gradient).

    * ``'regression'``: ``mean_{p, valid n} ||pred_p,n - target_p,n||^2``
      (squared error summed over D, averaged over the P pairs and N rows).
    * ``'correlation'``: BIER-style (the repo's BIERAdvLoss leftover, §9.2):
      ``C = mean_{p, valid n, d} (pred_p,n,d * target_p,n,d)^2`` and the loss
      is ``-C``: the adversary maximises the squared correlation, the learners
      (through the GRL) minimise it.

    Args:
      predictions, targets: [P, B, D] floats (P ordered pairs; P = 0 gives 0).
      mask: optional bool [B].
      form: 'regression' or 'correlation'.

    Returns:
      (loss, aux) with aux 'adversary_mse' or 'adversary_corr' (the positive C).
    """
    pred = as_float(predictions, "predictions")
    tgt = jax.lax.stop_gradient(as_float(targets, "targets"))
    if pred.ndim != 3 or pred.shape != tgt.shape:
        raise ValueError("predictions and targets must both be [P, B, D], got "
                         f"{pred.shape} and {tgt.shape}")
    if form not in ADVERSARY_FORMS:
        raise ValueError(f"form must be one of {ADVERSARY_FORMS}, got {form!r}")
    n_pairs, batch, dim = pred.shape
    valid = check_mask(mask, batch)
    denom = jnp.maximum(valid.sum().astype(pred.dtype), 1.0) * max(n_pairs, 1)
    if form == "regression":
        per_row = jnp.sum(jnp.square(pred - tgt), axis=-1)          # [P, B]
        mse = jnp.sum(jnp.where(valid, per_row, 0.0)) / denom
        return mse, {"adversary_mse": mse}
    per_row = jnp.sum(jnp.square(pred * tgt), axis=-1)              # [P, B]
    corr = jnp.sum(jnp.where(valid, per_row, 0.0)) / (denom * dim)
    return -corr, {"adversary_corr": corr}


def adversary_mhn_loss(mapped, *, mask=None):
    """Loss that the shared MHN-form adversary MINIMISES (related-methods.md §1.3).

    ``L = (2 / (J (J-1))) sum_{j<k} mean_n ||z_j,n - z_k,n||_2``: the plain
    (not squared) distance between the adversary's maps of the same image under
    learners j and k, averaged over valid rows and over the J(J-1)/2 pairs.
    ``models.adversary.AdversaryMHN`` produces ``z`` behind a gradient-reversal
    layer, so the adversary descends on L while the learners ascend on it.
    The distance is safe at 0 (value 0, derivative 0 instead of NaN).

    Args:
      mapped: [J, B, H] float, the adversary outputs of one branch.
      mask: optional bool [B]; False rows are excluded from the means.

    Returns:
      (loss, aux): scalar, 0 for J = 1; aux ``adversary_mhn_distance`` = L.
    """
    z = as_float(mapped, "mapped")
    if z.ndim != 3:
        raise ValueError(f"mapped must be [J, B, H], got shape {z.shape}")
    n_learners, batch, _ = z.shape
    valid = check_mask(mask, batch)
    n_valid = jnp.maximum(valid.sum().astype(z.dtype), 1.0)
    pairs = list(itertools.combinations(range(n_learners), 2))
    total = jnp.zeros((), z.dtype)
    for j, k in pairs:
        d = _distance(z[j] - z[k], 0.0)                               # [B]
        total = total + jnp.sum(jnp.where(valid, d, 0.0)) / n_valid
    loss = total / max(len(pairs), 1)
    return loss, {"adversary_mhn_distance": jax.lax.stop_gradient(loss)}
