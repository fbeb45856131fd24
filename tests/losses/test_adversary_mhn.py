"""The MHN-form shared adversary and its loss (related-methods.md §1.3).

References are written independently of the code under test: a float64 NumPy
forward with explicit BatchNorm batch statistics, and torch autograd (float64)
for the gradients *without* reversal, against which the reversed gradients are
checked.
"""
import itertools
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import common
from deml_jax import config_lib, optim
from deml_jax.losses import adversary_mhn_loss
from deml_jax.models.adversary import AdversaryMHN
from deml_jax.objective import deml_loss, reversal_scale

J, B, D, H = 3, 6, 5, 4
EPS = 1e-5  # BatchNorm epsilon (PyTorch BatchNorm1d default)


def _learners(seed, j=J, b=B, d=D):
    return np.random.default_rng(seed).normal(size=(j, b, d)).astype(np.float32)


@pytest.fixture(scope="module")
def adversary():
    """An AdversaryMHN with random params (BN scale/bias too, so they matter), and
    compiled train-mode forward and loss gradients shared by the tests."""
    model = AdversaryMHN(J, D, H)
    variables = jax.jit(lambda k, y: model.init(k, y, 1.0, train=False))(
        jax.random.PRNGKey(0), jnp.asarray(_learners(0)))
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(0.0, 0.7, p.shape) + (1.0 if p.ndim == 1 else 0.0),
                              jnp.float32), variables["params"])
    stats = variables["batch_stats"]

    def forward(params, y, scale, mask):
        z, mutated = model.apply({"params": params, "batch_stats": stats}, y, scale,
                                 train=True, mask=mask, mutable=["batch_stats"])
        return z, mutated["batch_stats"]

    def loss(params, y, scale):  # through the GRL, as the model trains it
        return adversary_mhn_loss(forward(params, y, scale, None)[0])[0]

    return SimpleNamespace(model=model, params=params, forward=jax.jit(forward),
                           grads=jax.jit(jax.value_and_grad(loss, argnums=(0, 1))))


def _apply(adv, y, scale=1.0, mask=None):
    return adv.forward(adv.params, jnp.asarray(y), jnp.float32(scale), mask)


def _loss_and_grads(adv, y, scale):
    """(loss, (d/dparams, d/dy)) with reversal scale ``scale``."""
    return adv.grads(adv.params, jnp.asarray(y), jnp.float32(scale))


def _np_params(params):
    return {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}


# ----------------------------------------------------------- NumPy reference

def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_bn(h, scale, bias, rows):
    mean = h[rows].mean(axis=0)
    var = ((h[rows] - mean) ** 2).mean(axis=0)  # biased, as PyTorch normalises in training
    return (h - mean) / np.sqrt(var + EPS) * scale + bias, mean, var


def np_forward(y, p, mask=None):
    """float64 z [J, B, H] plus the two layers' batch (mean, var)."""
    y = np.asarray(y, np.float64)
    j, b, d = y.shape
    valid = np.ones(b, bool) if mask is None else np.asarray(mask)
    rows = np.tile(valid, j)
    x = _unit(_unit(y).reshape(j * b, d))
    h, m1, v1 = _np_bn(x @ p["fc1"]["kernel"], p["bn1"]["scale"], p["bn1"]["bias"], rows)
    h = np.maximum(h, 0.0)
    h, m2, v2 = _np_bn(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], p["bn2"]["scale"],
                       p["bn2"]["bias"], rows)
    return _unit(h).reshape(j, b, -1), ((m1, v1), (m2, v2))


def np_loss(z, mask=None):
    """(2/(J(J-1))) sum_{j<k} mean over valid n of ||z_j,n - z_k,n||, by loops."""
    z = np.asarray(z, np.float64)
    j, b = z.shape[:2]
    valid = [n for n in range(b) if mask is None or mask[n]]
    pairs = list(itertools.combinations(range(j), 2))
    if not pairs:
        return 0.0
    total = 0.0
    for a, c in pairs:
        total += sum(np.linalg.norm(z[a, n] - z[c, n]) for n in valid) / len(valid)
    return total * 2.0 / (j * (j - 1))


def torch_loss_and_grads(y, p):
    """The same network and loss in torch float64 with NO reversal; autograd grads."""
    f = torch.nn.functional
    ty = torch.tensor(np.asarray(y, np.float64), requires_grad=True)
    tp = {k: {n: torch.tensor(v, requires_grad=True) for n, v in d.items()} for k, d in p.items()}
    j, b, d = ty.shape
    x = f.normalize(f.normalize(ty, dim=-1).reshape(j * b, d), dim=-1)
    bn = lambda h, name: f.batch_norm(h, None, None, tp[name]["scale"], tp[name]["bias"],
                                      training=True, eps=EPS)
    h = torch.relu(bn(x @ tp["fc1"]["kernel"], "bn1"))
    z = f.normalize(bn(h @ tp["fc2"]["kernel"] + tp["fc2"]["bias"], "bn2"), dim=-1).reshape(j, b, -1)
    pair_losses = [torch.linalg.vector_norm(z[a] - z[c], dim=-1).mean()
                   for a, c in itertools.combinations(range(j), 2)]
    loss = torch.stack(pair_losses).mean()
    loss.backward()
    loss = loss.detach()
    grads = {k: {n: t.grad.numpy() for n, t in d.items()} for k, d in tp.items()}
    return loss.item(), ty.grad.numpy(), grads


# ----------------------------------------------------------------- forward

def test_forward_and_loss_match_numpy(adversary):
    y = _learners(2)
    z, stats = _apply(adversary, y, 0.3)
    p = _np_params(adversary.params)
    z_ref, ((m1, v1), (m2, v2)) = np_forward(y, p)
    chex.assert_shape(z, (J, B, H))
    np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-5)
    loss, aux = adversary_mhn_loss(z)
    np.testing.assert_allclose(loss, np_loss(z_ref), rtol=1e-5)
    np.testing.assert_allclose(aux["adversary_mhn_distance"], loss, rtol=1e-5)
    # Running averages: momentum 0.9 from (mean 0, var 1); Flax keeps the biased var.
    np.testing.assert_allclose(stats["bn1"]["mean"], 0.1 * m1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["bn1"]["var"], 0.9 + 0.1 * v1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["bn2"]["mean"], 0.1 * m2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["bn2"]["var"], 0.9 + 0.1 * v2, rtol=1e-4, atol=1e-6)


def test_eval_mode_uses_running_averages(adversary):
    model, params = adversary.model, adversary.params
    y = _learners(3)
    stats = {"bn1": {"mean": np.full(H, 0.2, np.float32), "var": np.full(H, 2.0, np.float32)},
             "bn2": {"mean": np.full(H, -0.1, np.float32), "var": np.full(H, 0.5, np.float32)}}
    z = jax.jit(lambda v, y: model.apply(v, y, 1.0, train=False))(
        {"params": params, "batch_stats": stats}, jnp.asarray(y))
    p = _np_params(params)
    x = _unit(_unit(np.asarray(y, np.float64)).reshape(J * B, D))
    bn = lambda h, k: (h - stats[k]["mean"]) / np.sqrt(stats[k]["var"] + EPS) * p[k]["scale"] \
        + p[k]["bias"]
    h = np.maximum(bn(x @ p["fc1"]["kernel"], "bn1"), 0.0)
    ref = _unit(bn(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], "bn2")).reshape(J, B, H)
    np.testing.assert_allclose(z, ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------- gradients

@pytest.mark.parametrize("lam", [1.0, 0.37])
def test_reversal_flips_learner_gradient_only(adversary, lam):
    """d/dy = -lambda * (gradient without reversal); d/dtheta_A unchanged (torch reference)."""
    y = _learners(4)
    loss, (g_params, g_y) = _loss_and_grads(adversary, y, lam)
    ref_loss, ref_g_y, ref_g_params = torch_loss_and_grads(y, _np_params(adversary.params))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(g_y, -lam * ref_g_y, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, g_params), ref_g_params,
                                rtol=1e-4, atol=1e-5)
    assert np.abs(ref_g_y).max() > 1e-3  # the reference gradient is not trivially 0


def test_reversed_gradient_is_exactly_scaled(adversary):
    """scale -1 is the identity backward, so any lambda gives exactly -lambda times it."""
    y = jnp.asarray(_learners(5))
    (_, (p_plain, y_plain)), (_, (p_rev, y_rev)) = [
        _loss_and_grads(adversary, y, s) for s in (-1.0, 0.6)]
    np.testing.assert_allclose(y_rev, -0.6 * np.asarray(y_plain), rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(p_rev, p_plain, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------- invariances

def test_zero_loss_when_learners_agree(adversary):
    base = _learners(6)[0]
    same = np.stack([base, base, base])
    z, _ = _apply(adversary, same)
    loss, (g_params, g_y) = _loss_and_grads(adversary, same, 1.0)
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)
    for g in jax.tree.leaves((g_params, g_y)):
        assert np.all(np.isfinite(g))
    # Safe norm: exactly equal maps (d = 0) give loss 0 and a zero gradient, never NaN.
    zs = jnp.asarray(np.repeat(np.asarray(z)[:1], J, axis=0))
    value, g_z = jax.jit(jax.value_and_grad(lambda z: adversary_mhn_loss(z)[0]))(zs)
    assert float(value) == 0.0 and np.all(np.asarray(g_z) == 0.0)
    # Positive per-learner scales of the same vector: still the same direction.
    scaled = np.stack([base, 3.0 * base, 0.25 * base])
    z, _ = _apply(adversary, scaled)
    np.testing.assert_allclose(adversary_mhn_loss(z)[0], 0.0, atol=1e-5)


def test_invariant_to_positive_rescaling(adversary):
    y = _learners(7)
    s = np.random.default_rng(8).uniform(0.05, 20.0, size=(J, B, 1)).astype(np.float32)
    z1, _ = _apply(adversary, y)
    z2, _ = _apply(adversary, y * s)
    np.testing.assert_allclose(z2, z1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adversary_mhn_loss(z2)[0], adversary_mhn_loss(z1)[0], rtol=1e-5)
    z3, _ = _apply(adversary, 1e3 * y)
    np.testing.assert_allclose(z3, z1, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ masks

def test_masked_rows_are_excluded_from_stats_and_loss(adversary):
    y = _learners(9)
    mask = np.array([True, False, True, True, False, True])
    z, _ = _apply(adversary, y, mask=jnp.asarray(mask))
    loss = adversary_mhn_loss(z, mask=jnp.asarray(mask))[0]
    z_ref, _ = np_forward(y[:, mask], _np_params(adversary.params))
    np.testing.assert_allclose(loss, np_loss(z_ref), rtol=1e-5)
    # Whatever the masked rows hold, nothing changes.
    y2 = y.copy()
    y2[:, ~mask] = 100.0 * _learners(10)[:, ~mask]
    z2, _ = _apply(adversary, y2, mask=jnp.asarray(mask))
    np.testing.assert_allclose(adversary_mhn_loss(z2, mask=jnp.asarray(mask))[0], loss, rtol=1e-5)


def test_loss_alone_with_mask_and_single_learner():
    z = np.random.default_rng(11).normal(size=(4, 5, 3)).astype(np.float32)
    mask = np.array([False, True, True, False, True])
    np.testing.assert_allclose(adversary_mhn_loss(jnp.asarray(z), mask=jnp.asarray(mask))[0],
                               np_loss(z, mask), rtol=1e-5)
    assert float(adversary_mhn_loss(jnp.asarray(z[:1]))[0]) == 0.0  # J = 1: no pair


def test_bad_inputs_are_named(adversary):
    with pytest.raises(ValueError, match="mapped must be"):
        adversary_mhn_loss(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="mask must be bool"):
        adversary_mhn_loss(jnp.zeros((2, 4, 3)), mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match=r"embeddings must be \[3, B, 5\]"):
        _apply(adversary, np.zeros((2, B, D), np.float32))
    with pytest.raises(ValueError, match="mask must be bool"):
        _apply(adversary, _learners(0), mask=jnp.ones(B, jnp.int32))


# ---------------------------------------------- objective, schedule, config

def test_objective_adds_weighted_branch_sum():
    rng = np.random.default_rng(12)
    i, j, b, d, h = 2, 3, 4, 5, 6
    z = rng.normal(size=(i, j, b, h)).astype(np.float32)
    outputs = {"embeddings": jnp.asarray(rng.normal(size=(i, j, b, d)), jnp.float32),
               "act": jnp.zeros((i, b, d)), "adversary_mhn": jnp.asarray(z)}
    params = {f"branch_{k}": {"embed": {"kernel": jnp.ones((7, d))}} for k in range(i)}
    cfg = common.get_base_config().loss
    cfg.update(diversity="adversary_mhn", adversary_mhn_weight=0.7, act_weight=0.0,
               row_norm_lambda=0.0)
    labels = jnp.asarray([0, 0, 1, 1])
    _, aux = jax.jit(lambda o, p: deml_loss(o, labels, p, cfg))(outputs, params)
    np.testing.assert_allclose(aux["adversary_mhn"], 0.7 * (np_loss(z[0]) + np_loss(z[1])),
                               rtol=1e-5)
    assert "diversity" not in aux and "adversary" not in aux


def test_reversal_scale_schedules():
    cfg = common.get_base_config().loss
    cfg.update(diversity="adversary_mhn", adversary_mhn_schedule="constant")
    assert float(reversal_scale(cfg, 7, 20_000)) == 1.0
    cfg.adversary_mhn_schedule = "dann"  # §9.1: 2/(1+exp(-10 p)) - 1, p = 5000/20000
    np.testing.assert_allclose(reversal_scale(cfg, 5000, 20_000),
                               2.0 / (1.0 + np.exp(-2.5)) - 1.0, rtol=1e-5)
    cfg.adversary_mhn_schedule = "cosine"
    with pytest.raises(ValueError, match="config.loss.adversary_mhn_schedule"):
        reversal_scale(cfg, 1, 10)


def test_configs_and_lr_multipliers():
    for ds in ("cub200", "cars196", "sop", "inshop"):
        c = config_lib.load_config(f"configs/{ds}_deml_adversary_mhn.py")
        config_lib.validate(c)
        assert c.loss.diversity == "adversary_mhn" and c.dataset.name == ds
    c = common.make_config("cub200", "deml_adversary_mhn")
    c.loss.adversary_mhn_schedule = "sometimes"
    with pytest.raises(ValueError, match="config.loss.adversary_mhn_schedule"):
        config_lib.validate(c)
    for path in ("branch_0/adversary_mhn/fc1/kernel", "branch_2/adversary_mhn/bn1/scale",
                 "branch_1/adversary_mhn/fc2/bias", "branch_1/adversary_mhn/bn2/bias"):
        assert optim.multiplier_for(path, optim.RELEASED_LR_MULTS, 1.0) == 10.0, path
