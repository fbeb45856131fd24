"""CPF, Consistent Penalizing Field proxy loss (related-methods.md §4.1).

Read from ``cloudlc/CPF/criteria/cpf.py`` (no paper text retrieved):
  cos = normalize(x) @ normalize(P).T                              [B, C]
  TP  = 2 sum_i relu(cos[i, y_i]) + b
  L_P = sum_i (1 - cos[i, y_i]) sg(exp(s_p (1 - cos[i, y_i])))
  L_N = sum_{i, c != y_i, cos[i, c] > tau} (cos[i, c] - psi) sg(exp(s_n (cos[i, c] - mu)))
  loss = 1 - TP / (TP + L_P + L_N)
Sums (not means) over the batch; sg = stop-gradient (the exponential weights
carry no gradient); the negative mask ``cos > tau`` is a hard threshold.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deml_jax.losses.binomial import as_float, check_mask, safe_l2_normalize
from deml_jax.losses.pairwise import check_labels

# related-methods.md §4.2, `Running Scripts CPF.sh` (per dataset) and `parameters.py` (defaults,
# used for the datasets the paper's scripts do not cover, e.g. In-Shop).
_CODE_DEFAULTS = dict(tau=0.2, psi=0.2, s_p=1.0, s_n=1.0, mu=0.0, b=2.0)
CPF_DEFAULTS = {
    "cub200": dict(tau=0.38, psi=0.2, s_p=9.0, s_n=9.0, mu=0.0, b=2.0),
    "cars196": dict(tau=0.38, psi=0.2, s_p=9.0, s_n=9.0, mu=0.0, b=2.0),
    "sop": dict(tau=0.38, psi=0.2, s_p=3.0, s_n=8.0, mu=1.0, b=2.0),
    "default": _CODE_DEFAULTS,
}


def cpf_defaults(dataset):
    """The related-methods.md §4.2 hyper-parameters for ``dataset`` (code defaults for any other name)."""
    return dict(CPF_DEFAULTS.get(dataset, CPF_DEFAULTS["default"]))


def _check_label_range(labels, n_classes):
    """Labels must index the proxies; checked when their values are known (not under jit)."""
    if isinstance(labels, jax.core.Tracer):
        return
    lab = np.asarray(labels)
    if lab.size and (lab.min() < 0 or lab.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}) (one proxy per class), "
                         f"got values in [{lab.min()}, {lab.max()}]")


def cpf_loss(embeddings, labels, proxies, *, tau, psi, s_p, s_n, mu, b, mask=None):
    """CPF loss (related-methods.md §4.1), see the module docstring.

    Args:
      embeddings: [B, D] any float dtype (normalised inside).
      labels: int [B], class indices into ``proxies``.
      proxies: [C, D] learned class proxies (normalised inside).
      tau, psi, s_p, s_n, mu, b: related-methods.md §4.1 (see ``CPF_DEFAULTS`` for related-methods.md §4.2's values).
      mask: optional bool [B]; False rows add nothing to TP, L_P, L_N.

    Returns:
      (loss, aux), aux: cpf_tp, cpf_pos (L_P), cpf_neg (L_N), n_active_neg
      (counted (i, c) negatives), mean_pos_cos (over valid rows). A fully
      masked batch gives 0.
    """
    x = as_float(embeddings, "embeddings")
    p = as_float(proxies, "proxies")
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [B, D], got shape {x.shape}")
    if p.ndim != 2 or p.shape[1] != x.shape[1]:
        raise ValueError(f"proxies must be [C, {x.shape[1]}] (classes, embedding dim), "
                         f"got shape {p.shape}")
    bsz, n_classes = x.shape[0], p.shape[0]
    labels = check_labels(labels, bsz)
    _check_label_range(labels, n_classes)
    valid = check_mask(mask, bsz)
    dtype = jnp.promote_types(x.dtype, p.dtype)
    cos = safe_l2_normalize(x).astype(dtype) @ safe_l2_normalize(p).astype(dtype).T
    is_pos = jax.nn.one_hot(labels, n_classes, dtype=jnp.bool_) & valid[:, None]
    is_neg = ~jax.nn.one_hot(labels, n_classes, dtype=jnp.bool_) & valid[:, None] & (cos > tau)
    sg = jax.lax.stop_gradient
    cos_pos = jnp.sum(jnp.where(is_pos, cos, 0.0), axis=1)                     # [B]
    tp = 2.0 * jnp.sum(jnp.where(valid, jax.nn.relu(cos_pos), 0.0)) + b
    w_pos = sg(jnp.exp(s_p * (1.0 - cos_pos)))
    l_pos = jnp.sum(jnp.where(valid, (1.0 - cos_pos) * w_pos, 0.0))
    w_neg = sg(jnp.exp(s_n * (cos - mu)))
    l_neg = jnp.sum(jnp.where(is_neg, (cos - psi) * w_neg, 0.0))
    loss = 1.0 - tp / (tp + l_pos + l_neg)
    n_valid = jnp.maximum(jnp.sum(valid).astype(dtype), 1.0)
    aux = {
        "cpf_tp": tp, "cpf_pos": l_pos, "cpf_neg": l_neg,
        "n_active_neg": jnp.sum(is_neg).astype(dtype),
        "mean_pos_cos": jnp.sum(jnp.where(valid, cos_pos, 0.0)) / n_valid,
    }
    return loss, jax.tree_util.tree_map(sg, aux)
