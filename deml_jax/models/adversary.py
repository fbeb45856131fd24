"""Adversary regressors between the learners of one branch (docs/reference.md §14.1).

Reconstruction of the paper's "adversary constraint" (BIER-style): for every
ordered learner pair (j, k), j != k, a small regressor A_jk reads learner j's
L2-normalised embedding through a gradient-reversal layer and predicts learner
k's L2-normalised embedding. ``deml_jax.losses.adversary_loss`` scores the
predictions; minimising it trains the regressors, while the GRL hands the
learners the reversed gradient so they become unpredictable from one another.

``AdversaryMHN`` is the other reading (related-methods.md §1.3, the authors'
MHN code): one shared MLP per branch maps every learner's embedding, and
``deml_jax.losses.adversary_mhn_loss`` (the mean distance between learners' maps
of the same image) is minimised by it and, through the GRL, maximised by the
learners.
"""
from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from deml_jax.losses.binomial import safe_l2_normalize
from deml_jax.losses.regularizers import ROW_NORM_LAMBDA, row_norm_penalty
from deml_jax.ops.grad_reverse import gradient_reversal


def ordered_pairs(num_learners):
    """Static pair order: row-major over (j, k) with j != k.

    For J = 3: (0,1), (0,2), (1,0), (1,2), (2,0), (2,1); index p of the
    adversary outputs is the position in this list.
    """
    return [(j, k) for j, k in itertools.product(range(num_learners), repeat=2)
            if j != k]


class _MLPRegressor(nn.Module):
    """d -> hidden -> ReLU -> d (biases on both layers)."""
    dim: int
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
        return nn.Dense(self.dim, dtype=self.dtype, name="out")(x)


class AdversaryRegressors(nn.Module):
    """One regressor per ordered learner pair of a branch (§14.1).

    Attributes:
      num_learners: J, learners of the branch.
      dim: D, embedding size of a learner.
      hidden: None = linear d -> d without bias (BIER's regressor; params
        ``pair_{j}_{k}/kernel``); int = 2-layer MLP with ReLU (params
        ``pair_{j}_{k}/{hidden,out}/{kernel,bias}``).
      dtype: compute dtype (params stay float32).
    """
    num_learners: int
    dim: int
    hidden: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, embeddings, grl_scale):
        """Predict every learner from every other one.

        Args:
          embeddings: [J, B, D] unnormalised learner embeddings of one branch.
          grl_scale: scalar reversal scale (e.g. ``dann_lambda``), may be traced.

        Returns:
          (predictions, targets), both [P, B, D] with P = J(J-1) in the order
          of ``ordered_pairs(J)``; targets are L2-normalised and stop_gradient.
        """
        if embeddings.ndim != 3 or embeddings.shape[0] != self.num_learners \
                or embeddings.shape[2] != self.dim:
            raise ValueError(
                f"embeddings must be [{self.num_learners}, B, {self.dim}], "
                f"got shape {embeddings.shape}")
        yhat = safe_l2_normalize(embeddings)
        reversed_src = gradient_reversal(yhat, grl_scale)
        preds, targets = [], []
        for j, k in ordered_pairs(self.num_learners):
            name = f"pair_{j}_{k}"
            if self.hidden is None:
                reg = nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name=name)
            else:
                reg = _MLPRegressor(self.dim, self.hidden, self.dtype, name=name)
            preds.append(reg(reversed_src[j]))
            targets.append(jax.lax.stop_gradient(yhat[k]))
        if not preds:  # J = 1: nothing to predict.
            empty = jnp.zeros((0,) + embeddings.shape[1:], embeddings.dtype)
            return empty, empty
        return jnp.stack(preds), jnp.stack(targets)


def adversary_row_norm_penalty(params, lam=ROW_NORM_LAMBDA):
    """Sum of ``row_norm_penalty`` over every Dense kernel of the regressors (§14.1).

    Args:
      params: the AdversaryRegressors params, with or without the top-level
        'params' collection key.
      lam: the penalty weight lambda (default 0.5 as the FC's, §5.3).

    Returns:
      float32 scalar (0 when there is no kernel).
    """
    total = jnp.zeros((), jnp.float32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if getattr(path[-1], "key", None) == "kernel":
            total = total + row_norm_penalty(leaf, lam=lam)
    return total


# ----------------------------------------------------------------------------
# MHN-form adversary (related-methods.md §1.3): one shared network per branch.

# MHN's AdvDivLoss width (Linear 256->128, 128->128); DeML's value is unknown.
MHN_HIDDEN = 128
# PyTorch BatchNorm1d defaults (MHN is PyTorch): momentum 0.1 = Flax 0.9, eps 1e-5.
MHN_BN_MOMENTUM = 0.9
MHN_BN_EPSILON = 1e-5


class AdversaryMHN(nn.Module):
    """Shared adversary A of one branch, behind gradient reversal (related-methods.md §1.3 of related-methods.md).

    ``z_j = A(GRL_lambda(normalize(y_j)))`` with
    ``A = normalize -> Dense(D->H, no bias) -> BN -> ReLU -> Dense(H->H) -> BN -> normalize``,
    the same A for all J learners. As in MHN, the J learners' rows are stacked
    along the batch (``[J*B, D]``) before A, so each BatchNorm's batch statistics
    (train mode) are taken over all learners' rows together; ``mask`` removes
    rows from those statistics. A minimises ``losses.adversary_mhn_loss``; the
    GRL hands the learners ``-lambda`` times its gradient, so they maximise it.

    Computed in float32 whatever the model dtype (a [J*B, H] MLP: negligible).
    Params: ``fc1/kernel``, ``bn1/{scale,bias}``, ``fc2/{kernel,bias}``,
    ``bn2/{scale,bias}``; batch_stats ``bn{1,2}/{mean,var}``.

    Attributes:
      num_learners: J.
      dim: D, a learner's embedding size.
      hidden: H, width of both layers (MHN 128; DeML unknown).
    """
    num_learners: int
    dim: int
    hidden: int = MHN_HIDDEN
    bn_momentum: float = MHN_BN_MOMENTUM
    bn_epsilon: float = MHN_BN_EPSILON

    @nn.compact
    def __call__(self, embeddings, grl_scale, *, train: bool, mask=None):
        """Map every learner's embedding through A.

        Args:
          embeddings: [J, B, D] unnormalised learner embeddings of one branch.
          grl_scale: scalar reversal scale lambda (constant 1 or ``dann_lambda``).
          train: BatchNorm uses batch statistics (and updates its running
            averages; apply with ``mutable=['batch_stats']``) when True, the
            running averages when False.
          mask: optional bool [B]; False rows are left out of the batch statistics.

        Returns:
          [J, B, H] float32, unit rows (zero rows map to 0).
        """
        if embeddings.ndim != 3 or embeddings.shape[0] != self.num_learners \
                or embeddings.shape[2] != self.dim:
            raise ValueError(
                f"AdversaryMHN: embeddings must be [{self.num_learners}, B, {self.dim}], "
                f"got shape {embeddings.shape}")
        if self.hidden < 1:
            raise ValueError(f"AdversaryMHN: hidden must be >= 1, got {self.hidden}")
        n_learners, batch, dim = embeddings.shape
        yhat = safe_l2_normalize(embeddings.astype(jnp.float32))
        x = gradient_reversal(yhat, grl_scale).reshape(n_learners * batch, dim)
        bn_mask = None
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.shape != (batch,) or mask.dtype != jnp.bool_:
                raise ValueError(f"AdversaryMHN: mask must be bool [{batch}], "
                                 f"got {mask.dtype} {mask.shape}")
            bn_mask = jnp.tile(mask, n_learners)[:, None]

        def batch_norm(name, h):
            return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                epsilon=self.bn_epsilon, use_fast_variance=False,
                                dtype=jnp.float32, name=name)(h, mask=bn_mask)

        x = safe_l2_normalize(x)  # A's own input normalisation (MHN), idempotent here
        x = nn.Dense(self.hidden, use_bias=False, dtype=jnp.float32, name="fc1")(x)
        x = nn.relu(batch_norm("bn1", x))
        x = nn.Dense(self.hidden, dtype=jnp.float32, name="fc2")(x)
        z = safe_l2_normalize(batch_norm("bn2", x))
        return z.reshape(n_learners, batch, self.hidden)
