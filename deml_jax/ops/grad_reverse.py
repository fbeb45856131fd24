"""Gradient reversal layer (GRL) and its DANN-style scale schedule.

Reproduces the Caffe ``GradientsReverse`` layer of the released code
(docs/reference.md §9.1), which the authors ship for the paper's "original
adversary network"; we use it for the reconstructed adversary (§14.1).

* Forward: identity.
* Backward: ``dL/dx = -lambda_p * dL/dy``.
* ``lambda_p = 2 / (1 + exp(-gamma * p)) - 1`` with
  ``p = min(progress, 100000) / (iter_size * max_iter)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# §9.1: GradientReverseParameter defaults / the layer's hard-coded counter cap.
DANN_GAMMA = 10.0          # `gama` default
DANN_PROGRESS_CAP = 100000  # `progress_ = min(progress_, 100000)` in Forward


@jax.custom_vjp
def _reverse(x, scale):
    return x


def _reverse_fwd(x, scale):
    return x, scale


def _reverse_bwd(scale, g):
    # Cotangent in each leaf's own dtype (bf16 in -> bf16 cotangent); the scale
    # is a schedule value, not something to learn, so its cotangent is zero.
    flipped = jax.tree_util.tree_map(
        lambda gi: (-scale * gi).astype(gi.dtype), g)
    return flipped, jnp.zeros_like(scale)


_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def gradient_reversal(x, scale):
    """Identity forward, ``-scale * g`` backward (docs/reference.md §9.1, §14.1).

    Args:
      x: a floating array of any shape and float dtype, or a pytree of them.
      scale: scalar (Python number or array, may be traced). It is converted to
        a float32 array, so changing it between calls of a jitted function does
        not retrace. Receives a zero cotangent.

    Returns:
      ``x`` unchanged (same pytree, shapes and dtypes).

    Raises:
      TypeError: a leaf of ``x`` is not floating.
      ValueError: ``scale`` is not a scalar.
    """
    for leaf in jax.tree_util.tree_leaves(x):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"gradient_reversal: x must hold floating arrays, got dtype {dtype}")
    scale = jnp.asarray(scale, dtype=jnp.float32)
    if scale.ndim != 0:
        raise ValueError(
            f"gradient_reversal: scale must be a scalar, got shape {scale.shape}")
    return _reverse(x, scale)


def dann_lambda(step, total_steps, *, gamma=DANN_GAMMA, iter_size=1,
                max_progress=DANN_PROGRESS_CAP):
    """DANN reversal scale of the Caffe GradientsReverse layer (§9.1).

    ``lambda = 2 / (1 + exp(-gamma * p)) - 1``,
    ``p = min(step, max_progress) / (iter_size * total_steps)``.

    Caffe increments its ``progress_`` counter in Forward (before the Backward
    that reads it), so the first training iteration already uses progress 1:
    a 0-based training loop reproducing Caffe exactly passes ``step + 1``.
    As in Caffe, ``p`` itself is not clipped to 1 (only the counter is capped
    at 100000); lambda saturates at 1 anyway (0.99991 at p = 1 for gamma 10).

    Args:
      step: forward-pass counter, int or float, scalar, may be traced.
      total_steps: Caffe ``max_iter`` (default 10000 in the layer's proto; the
        caller passes its training length). Must be > 0.
      gamma: Caffe ``gama`` (default 10).
      iter_size: Caffe ``iter_size`` (forward passes per update; default 1).
      max_progress: cap on the counter (hard-coded 100000 in Caffe).

    Returns:
      float32 scalar in [0, 1).
    """
    for name, value in (("total_steps", total_steps), ("iter_size", iter_size)):
        if isinstance(value, (int, float)) and value <= 0:
            raise ValueError(f"dann_lambda: {name} must be > 0, got {value}")
    progress = jnp.minimum(jnp.asarray(step, jnp.float32), max_progress)
    p = progress / (jnp.float32(iter_size) * jnp.float32(total_steps))
    return 2.0 / (1.0 + jnp.exp(-gamma * p)) - 1.0
