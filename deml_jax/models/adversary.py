"""Adversary regressors between the learners of one branch (deml-reference.md §14.1).

Reconstruction of the paper's "adversary constraint" (BIER-style): for every
ordered learner pair (j, k), j != k, a small regressor A_jk reads learner j's
L2-normalised embedding through a gradient-reversal layer and predicts learner
k's L2-normalised embedding. ``deml_jax.losses.adversary_loss`` scores the
predictions; minimising it trains the regressors, while the GRL hands the
learners the reversed gradient so they become unpredictable from one another.
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
