"""Learner diversity: hinge constraint (§5.2) and adversary regressors + loss (§14.1).

References are float64 NumPy loops and hand-built linear maps, never the code under test.
"""
import itertools

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from deml_jax.losses import adversary_loss, hinge_diversity
from deml_jax.models.adversary import AdversaryRegressors, adversary_row_norm_penalty


def _unit(v):
    return v / np.linalg.norm(v)


def ref_hinge(y, margin=2.0):
    """Per-pair Caffe contrastive loss with all-zero labels, by loops in float64."""
    y = np.asarray(y, np.float64)
    n_learners, n = y.shape[:2]
    out = {}
    for j, k in itertools.combinations(range(n_learners), 2):
        total = 0.0
        for r in range(n):
            d = np.linalg.norm(_unit(y[j, r]) - _unit(y[k, r]))
            total += max(0.0, margin - d) ** 2
        out[(j, k)] = total / (2 * n)
    return out


def ref_hinge_grad_caffe(y, margin=2.0, eps=1e-4):
    """ContrastiveLoss backward (diff/(d + 1e-4)) then the Normalization backward."""
    y = np.asarray(y, np.float64)
    n_learners, n = y.shape[:2]
    g_hat = np.zeros_like(y)
    yhat = y / np.linalg.norm(y, axis=-1, keepdims=True)
    for j, k in itertools.combinations(range(n_learners), 2):
        for r in range(n):
            diff = yhat[j, r] - yhat[k, r]
            d = np.linalg.norm(diff)
            if d < margin:
                step = -(1.0 / n) * (margin - d) / (d + eps) * diff
                g_hat[j, r] += step
                g_hat[k, r] -= step
    # d yhat / d y = (I - yhat yhat^T) / ||y||
    norms = np.linalg.norm(y, axis=-1, keepdims=True)
    return (g_hat - yhat * np.sum(yhat * g_hat, axis=-1, keepdims=True)) / norms


def _learners(seed, j=3, b=7, d=5):
    return np.random.default_rng(seed).normal(size=(j, b, d)).astype(np.float32)


# ------------------------------------------------------------------ hinge


@pytest.mark.parametrize("n_learners", [2, 3, 4])
def test_hinge_matches_loop(n_learners):
    y = _learners(n_learners, j=n_learners)
    loss, aux = hinge_diversity(jnp.asarray(y))
    ref = ref_hinge(y)
    np.testing.assert_allclose(float(loss), sum(ref.values()), rtol=1e-5)
    for (j, k), v in ref.items():
        np.testing.assert_allclose(float(aux[f"hinge_{j}_{k}"]), v, rtol=1e-5)
    cos = [np.dot(_unit(y[j, r]), _unit(y[k, r]))
           for j, k in ref for r in range(y.shape[1])]
    np.testing.assert_allclose(float(aux["mean_pair_cos"]), np.mean(cos), atol=1e-5)


def test_hinge_worked_cases():
    x = _learners(1, j=1)[0]
    # Identical learners: d = 0, each pair (1/(2N)) * N * margin^2 = margin^2 / 2 = 2.
    loss, aux = hinge_diversity(jnp.stack([x, 3.0 * x, 0.5 * x]))
    np.testing.assert_allclose(float(loss), 3 * 2.0, rtol=1e-5)
    np.testing.assert_allclose(float(aux["mean_pair_cos"]), 1.0, rtol=1e-5)
    # Antipodal learners: d = 2 = margin, nothing left.
    loss, _ = hinge_diversity(jnp.stack([x, -x]))
    np.testing.assert_allclose(float(loss), 0.0, atol=1e-5)
    # Orthogonal unit vectors: d = sqrt(2), (2 - sqrt 2)^2 / 2 per row and pair.
    e = jnp.asarray([[[1.0, 0.0]], [[0.0, 5.0]]])
    loss, _ = hinge_diversity(e, margin=2.0)
    np.testing.assert_allclose(float(loss), (2 - np.sqrt(2)) ** 2 / 2, rtol=1e-5)
    # One learner: no pair.
    loss, aux = hinge_diversity(jnp.asarray(x[None]))
    assert float(loss) == 0.0 and float(aux["mean_pair_cos"]) == 0.0


def test_hinge_gradient_is_caffes():
    y = _learners(4)
    grad = jax.jit(jax.grad(lambda v: hinge_diversity(v)[0]))(jnp.asarray(y))
    chex.assert_trees_all_close(np.asarray(grad), ref_hinge_grad_caffe(y), rtol=1e-4, atol=1e-6)
    # grad_eps = 0: the exact gradient; differs from Caffe's by about 1e-4 / d.
    exact = jax.jit(jax.grad(lambda v: hinge_diversity(v, grad_eps=0.0)[0]))(jnp.asarray(y))
    chex.assert_trees_all_close(np.asarray(exact), ref_hinge_grad_caffe(y, eps=0.0),
                                rtol=1e-4, atol=1e-6)
    assert not np.allclose(np.asarray(exact), np.asarray(grad), rtol=1e-7, atol=0)


def test_hinge_check_grads_float64():
    y = _learners(6, b=4, d=3)
    with jax.enable_x64(True):
        f = jax.jit(lambda v: hinge_diversity(v, grad_eps=0.0)[0])
        jax.test_util.check_grads(f, (jnp.asarray(y, jnp.float64),), order=1,
                                  modes=["rev"], eps=1e-6)


@pytest.mark.parametrize("grad_eps", [1e-4, 0.0])
def test_hinge_zero_distance_has_finite_gradient(grad_eps):
    x = _learners(2, j=1)[0]
    y = jnp.stack([x, x, 2.0 * x])
    loss, grad = jax.value_and_grad(lambda v: hinge_diversity(v, grad_eps=grad_eps)[0])(y)
    assert np.isfinite(float(loss))
    # Caffe: (2 - 0)/(0 + 1e-4) * diff with diff = 0 -> a zero gradient.
    chex.assert_trees_all_equal(grad, jnp.zeros_like(grad))


def test_hinge_mask_equals_dropping_rows_and_bf16():
    y = _learners(8, b=9)
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0], bool)
    f = jax.jit(jax.value_and_grad(lambda v, m: hinge_diversity(v, mask=m), has_aux=True))
    (a, aux_a), g_a = f(jnp.asarray(y), jnp.asarray(keep))
    (b, aux_b), g_b = f(jnp.asarray(y[:, keep]), None)
    chex.assert_trees_all_close((a, aux_a), (b, aux_b), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g_a[:, keep], g_b, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(g_a[:, ~keep], jnp.zeros_like(g_a[:, ~keep]))
    loss16, _ = hinge_diversity(jnp.asarray(y, jnp.bfloat16))
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(float(loss16), sum(ref_hinge(y).values()), rtol=2e-2)


def test_hinge_bad_input():
    with pytest.raises(ValueError, match="embeddings"):
        hinge_diversity(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="mask"):
        hinge_diversity(jnp.ones((2, 3, 4)), mask=jnp.ones(4, bool))


# ------------------------------------------------------------------ adversary loss


def test_adversary_loss_forms_match_loops():
    rng = np.random.default_rng(3)
    pred, tgt = rng.normal(size=(2, 6, 5, 4))
    mask = np.array([1, 1, 0, 1, 1], bool)
    se, corr, count = 0.0, 0.0, 0
    for p in range(6):
        for n in range(5):
            if mask[n]:
                se += np.sum((pred[p, n] - tgt[p, n]) ** 2)
                corr += np.sum((pred[p, n] * tgt[p, n]) ** 2)
                count += 1
    loss, aux = adversary_loss(jnp.asarray(pred), jnp.asarray(tgt), mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(loss), se / count, rtol=1e-5)
    np.testing.assert_allclose(float(aux["adversary_mse"]), se / count, rtol=1e-5)
    loss, aux = adversary_loss(jnp.asarray(pred), jnp.asarray(tgt), mask=jnp.asarray(mask),
                               form="correlation")
    np.testing.assert_allclose(float(loss), -corr / (count * 4), rtol=1e-5)
    np.testing.assert_allclose(float(aux["adversary_corr"]), corr / (count * 4), rtol=1e-5)


@pytest.mark.parametrize("form", ["regression", "correlation"])
def test_adversary_loss_targets_are_constants_and_check_grads(form):
    rng = np.random.default_rng(4)
    pred, tgt = (jnp.asarray(a) for a in rng.normal(size=(2, 2, 3, 4)))
    g_tgt = jax.grad(lambda t: adversary_loss(pred, t, form=form)[0])(tgt)
    chex.assert_trees_all_equal(g_tgt, jnp.zeros_like(tgt))
    with jax.enable_x64(True):
        t64 = jnp.asarray(tgt, jnp.float64)
        f = jax.jit(lambda p: adversary_loss(p, t64, form=form)[0])
        jax.test_util.check_grads(f, (jnp.asarray(pred, jnp.float64),), order=1,
                                  modes=["rev"], eps=1e-6)


def test_adversary_loss_edge_cases():
    empty = jnp.zeros((0, 3, 4))
    assert float(adversary_loss(empty, empty)[0]) == 0.0
    with pytest.raises(ValueError, match="form"):
        adversary_loss(jnp.ones((1, 2, 3)), jnp.ones((1, 2, 3)), form="bogus")
    with pytest.raises(ValueError, match="predictions"):
        adversary_loss(jnp.ones((1, 2, 3)), jnp.ones((1, 2, 4)))


# ------------------------------------------------------------------ adversary regressors


def _by_hand(params, y, hidden):
    """The same regressors written out: normalise, A_jk(yhat_j), target yhat_k; no GRL."""
    yhat = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
    preds, tgts = [], []
    for j, k in [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]:
        p = params["params"][f"pair_{j}_{k}"]
        if hidden is None:
            out = yhat[j] @ p["kernel"]
        else:
            h = jnp.maximum(yhat[j] @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0.0)
            out = h @ p["out"]["kernel"] + p["out"]["bias"]
        preds.append(out)
        tgts.append(jax.lax.stop_gradient(yhat[k]))
    return jnp.stack(preds), jnp.stack(tgts)


@pytest.mark.parametrize("hidden,form", [(None, "regression"), (None, "correlation"),
                                         (6, "regression")])
def test_grl_reverses_learner_gradient_only(hidden, form):
    y = jnp.asarray(_learners(5, j=3, b=4, d=5))
    model = AdversaryRegressors(num_learners=3, dim=5, hidden=hidden)
    params = model.init(jax.random.key(0), y, 1.0)
    scale = 0.37

    def module_loss(prm, emb):
        return adversary_loss(*model.apply(prm, emb, scale), form=form)[0]

    def hand_loss(prm, emb):
        return adversary_loss(*_by_hand(prm, emb, hidden), form=form)[0]

    pred_m, tgt_m = jax.jit(model.apply)(params, y, scale)
    pred_h, tgt_h = jax.jit(_by_hand, static_argnums=2)(params, y, hidden)
    chex.assert_trees_all_close((pred_m, tgt_m), (pred_h, tgt_h), rtol=1e-5, atol=1e-6)
    gp_m, gy_m = jax.jit(jax.grad(module_loss, argnums=(0, 1)))(params, y)
    gp_h, gy_h = jax.jit(jax.grad(hand_loss, argnums=(0, 1)))(params, y)
    assert float(jnp.max(jnp.abs(gy_h))) > 1e-4  # the reference gradient is not trivially 0
    chex.assert_trees_all_close(gy_m, -scale * gy_h, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(gp_m, gp_h, rtol=1e-5, atol=1e-7)


def test_regressor_layout_and_shapes():
    y = jnp.ones((3, 2, 4))
    model = AdversaryRegressors(num_learners=3, dim=4)
    params = model.init(jax.random.key(1), y, 0.0)
    names = sorted(params["params"])
    assert names == ["pair_0_1", "pair_0_2", "pair_1_0", "pair_1_2", "pair_2_0", "pair_2_1"]
    assert params["params"]["pair_0_1"]["kernel"].shape == (4, 4)
    pred, tgt = model.apply(params, y, 0.5)
    assert pred.shape == tgt.shape == (6, 2, 4)
    one = AdversaryRegressors(num_learners=1, dim=4)
    pred, tgt = one.apply(one.init(jax.random.key(1), y[:1], 0.0), y[:1], 0.0)
    assert pred.shape == (0, 2, 4)
    with pytest.raises(ValueError, match="embeddings"):
        model.apply(params, jnp.ones((2, 2, 4)), 0.5)


def test_adversary_row_norm_penalty_value_and_gradient():
    y = jnp.ones((3, 2, 4))
    model = AdversaryRegressors(num_learners=3, dim=4, hidden=5)
    params = model.init(jax.random.key(2), y, 0.0)
    lam = 0.5
    kernels = {path: np.asarray(leaf, np.float64)
               for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if path[-1].key == "kernel"}
    assert len(kernels) == 12
    want = 0.0
    for w in kernels.values():
        n_out = w.shape[1]
        want += lam / n_out * sum((np.sum(w[:, r] ** 2) - 1.0) ** 2 for r in range(n_out))
    got, grads = jax.jit(jax.value_and_grad(adversary_row_norm_penalty))(params, lam)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        if path[-1].key == "kernel":
            w = kernels[path]
            ref = np.stack([4 * lam / w.shape[1] * (np.sum(w[:, r] ** 2) - 1.0) * w[:, r]
                            for r in range(w.shape[1])], axis=1)
            chex.assert_trees_all_close(np.asarray(g), ref, rtol=1e-5, atol=1e-7)
        else:  # biases are not penalised
            chex.assert_trees_all_equal(g, jnp.zeros_like(g))
