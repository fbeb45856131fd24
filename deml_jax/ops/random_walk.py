"""Random-walk object attention over the positions of a feature map.

docs/reference.md §4 steps 2-4 (Caffe ``ProposalCrop``): a graph whose nodes are
the ``H * W`` positions of a feature map, edge weights = feature distance x
spatial Gaussian, column-normalised into a transition matrix, and a fixed number
of power-iteration steps from the uniform distribution.

Everything is batched matrix algebra (no vmap of Python loops), fixed shapes,
float32 math whatever the input dtype; ``num_steps`` is static under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# §4 step 4: "exactly 10 iterations" (ProposalCrop hard-codes the loop count).
NUM_STEPS = 10
# §4 step 2: eps = 0.15 * n (ProposalCrop: `ems = 0.15 * N`), i.e. 1.05 for n = 7.
SIGMA_RATIO = 0.15

_HIGHEST = jax.lax.Precision.HIGHEST  # TPU/GPU would otherwise use bf16 passes.


def spatial_kernel(height: int, width: int, sigma_ratio: float = SIGMA_RATIO) -> np.ndarray:
    """Gaussian of the grid distance between positions, float64 ``[H*W, H*W]``.

    Node ``q = r * W + c`` (row-major, = NumPy reshape of an NHWC map, §4 step 2).
    ``eps = sigma_ratio * H``: Caffe assumes square maps and uses the map side
    ``n``; for ``H != W`` we take the height (documented choice, not in Caffe).
    Computed on the host in float64 like Caffe's double ``std::exp``.
    """
    eps = sigma_ratio * height
    rows, cols = np.divmod(np.arange(height * width), width)
    sq = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    return np.exp(-sq / (2.0 * eps * eps))


def _safe_sqrt(x):
    """sqrt with a finite (zero) gradient at 0; callers stop_gradient anyway."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def pairwise_distances(feats):
    """Euclidean distances between all positions, ``[B, N, C] -> [B, N, N]`` float32.

    Gram-matrix form (a [B, N, N, C] difference tensor would be 100x larger).
    Features are centred per sample first: distances are translation invariant
    and centring shrinks the norms, hence the cancellation error of
    ``|a|^2 + |b|^2 - 2ab``.  The squared distance is clamped at 0 before sqrt.
    """
    feats = feats - jnp.mean(feats, axis=1, keepdims=True)
    sq = jnp.sum(feats * feats, axis=-1)
    gram = jnp.einsum("bnc,bmc->bnm", feats, feats, precision=_HIGHEST)
    d2 = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * gram, 0.0)
    n = feats.shape[1]
    d2 = jnp.where(jnp.eye(n, dtype=bool), 0.0, d2)  # exact zero diagonal (§4 step 2)
    return _safe_sqrt(d2)


def transition_matrix(features, sigma_ratio: float = SIGMA_RATIO):
    """Column-stochastic ``P [B, N, N]`` and degrees ``[B, N]`` (§4 steps 2-3).

    ``P[q, q'] = D[q, q'] / sum_q'' D[q'', q']``.  A column of zeros (a position
    whose features equal every other's, e.g. a constant map) would be 0/0 = NaN
    in Caffe; here it becomes a self-loop (``P[q', q'] = 1``, degree 1), so a
    constant map keeps the uniform start exactly.
    """
    b, h, w, c = features.shape
    feats = features.astype(jnp.float32).reshape(b, h * w, c)
    kernel = jnp.asarray(spatial_kernel(h, w, sigma_ratio), jnp.float32)
    weights = pairwise_distances(feats) * kernel
    degree = jnp.sum(weights, axis=1)  # column sums, [B, N]
    isolated = degree <= 0.0
    eye = jnp.eye(h * w, dtype=jnp.float32)
    weights = weights + isolated[:, None, :] * eye
    degree = jnp.where(isolated, 1.0, degree)
    # A true division, as Caffe's `D /= tmp`: XLA would otherwise multiply by a
    # reciprocal of the broadcast divisor (not correctly rounded).
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(degree[:, None, :], weights.shape))
    return weights / divisor, degree


def random_walk_attention(features, num_steps: int = NUM_STEPS,
                          sigma_ratio: float = SIGMA_RATIO, *, converged: bool = False):
    """Random-walk attention map (§4 steps 2-4).

    Args:
      features: ``[B, H, W, C]`` any float dtype (cast to float32).
      num_steps: power-iteration steps ``m <- P m`` from ``m0 = 1/(H W)`` (static).
      sigma_ratio: spatial Gaussian width as a fraction of ``H``.
      converged: return the stationary distribution instead (proportional to
        the node degree since the chain is reversible); research use only, the
        released code stops after 10 steps (§4 step 4).
    Returns:
      ``[B, H, W]`` float32, each map sums to 1 (up to float rounding).
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [B, H, W, C], got shape {features.shape}")
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise TypeError(f"features must be floating point, got {features.dtype}")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    b, h, w, _ = features.shape
    trans, degree = transition_matrix(features, sigma_ratio)
    if converged:
        m = degree / jnp.sum(degree, axis=1, keepdims=True)
    else:
        m0 = jnp.full((b, h * w), 1.0 / (h * w), jnp.float32)
        step = lambda _, m: jnp.einsum("bqp,bp->bq", trans, m, precision=_HIGHEST)
        m = jax.lax.fori_loop(0, num_steps, step, m0)
    return m.reshape(b, h, w)
