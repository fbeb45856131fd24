"""BIER-style activation loss and FC row-norm regulariser (docs/reference.md §5.3)."""
from __future__ import annotations

import jax.numpy as jnp

from deml_jax.losses.binomial import as_float, check_mask

# §5.3: `lamda: 0.5` set on fc_embedding_a in the DeML prototxt (proto default 100).
ROW_NORM_LAMBDA = 0.5


def activation_loss(z, *, mask=None):
    """Caffe ActLoss with one bottom (§5.3): ``mean_n ||z_n||^2 / C``.

    ``z = W_b . stop_grad(p_b1)`` is formed by the model (the prototxt's
    ``propagate_down: 0``); the caller applies the loss weight 0.014.

    Args:
      z: [N, C] any float dtype.
      mask: optional bool [N]; the mean runs over valid rows only.

    Returns:
      (loss, aux) with aux 'act' (the same value).
    """
    z = as_float(z, "z")
    if z.ndim != 2:
        raise ValueError(f"z must be [N, C], got shape {z.shape}")
    valid = check_mask(mask, z.shape[0])
    per_row = jnp.sum(jnp.square(z), axis=-1) / z.shape[1]
    n_valid = jnp.maximum(valid.sum().astype(z.dtype), 1.0)
    loss = jnp.sum(jnp.where(valid, per_row, 0.0)) / n_valid
    return loss, {"act": loss}


def row_norm_penalty(kernel, *, lam=ROW_NORM_LAMBDA):
    """``R = (lam / N_out) sum_r (||w_r||^2 - 1)^2`` (§5.3, Caffe ``act_init``).

    Caffe's W_b is [N_out, N_in] and w_r are its rows; a Flax Dense kernel is
    [in, out], so w_r are the kernel's COLUMNS and N_out = kernel.shape[1].
    Its gradient, ``4 (lam/N_out)(||w_r||^2 - 1) w_r``, is exactly what Caffe
    adds to the weight diff, unweighted by any loss weight: add R to the
    objective as is.

    Args:
      kernel: [in, out] float.

    Returns:
      float scalar (float32 for float32/bf16 kernels).
    """
    w = as_float(kernel, "kernel")
    if w.ndim != 2:
        raise ValueError(f"kernel must be [in, out], got shape {w.shape}")
    sq_norms = jnp.sum(jnp.square(w), axis=0)                     # [out]
    return lam / w.shape[1] * jnp.sum(jnp.square(sq_norms - 1.0))
