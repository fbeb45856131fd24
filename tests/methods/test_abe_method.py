"""ABE-M's method module (related-methods.md §3.2, §3.6): objective against NumPy loops."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from deml_jax import config_lib, methods, optim

HERE = os.path.dirname(os.path.abspath(__file__))
LABELS = np.array([0, 0, 1, 1, 2, 2], np.int32)


def loss_config(**loss):
    c = common.get_base_config()
    methods.get_method("abe")  # registers it
    from deml_jax.methods import abe
    abe.configure(c, "digits")
    c.loss.update(**loss)
    return c


def run(c, emb, labels=LABELS, mask=None):
    """The registered objective, jitted (one compilation instead of many eager ops)."""
    objective = methods.get_method("abe").objective
    f = jax.jit(lambda e, y, m: objective({"embeddings": e}, y, {}, c, mask=m))
    return f(jnp.asarray(emb, jnp.float32), jnp.asarray(labels),
             None if mask is None else jnp.asarray(mask))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_contrastive(z, labels, margin):
    """1/2 d^2 on positive pairs, 1/2 max(0, m - d)^2 on negatives, mean over pairs i<k."""
    zn, terms = _unit(z), []
    for i in range(len(z)):
        for k in range(i + 1, len(z)):
            d = np.linalg.norm(zn[i] - zn[k])
            terms.append(0.5 * d * d if labels[i] == labels[k]
                         else 0.5 * max(0.0, margin - d) ** 2)
    return float(np.mean(terms))


def np_divergence(f, margin):
    """mean_x sum_{i != j} max(0, m_div - ||f_i(x) - f_j(x)||^2), unit f."""
    fn, per_image = _unit(f), []
    for b in range(f.shape[1]):
        per_image.append(sum(max(0.0, margin - np.sum((fn[i, b] - fn[j, b]) ** 2))
                             for i in range(f.shape[0]) for j in range(f.shape[0]) if i != j))
    return float(np.mean(per_image))


def test_objective_matches_numpy():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 6, 4))
    c = loss_config(contrastive_margin=1.2, abe_div_margin=1.5, abe_div_weight=0.3)
    loss, aux = run(c, emb)
    metric = np.mean([np_contrastive(emb[m], LABELS, 1.2) for m in range(3)])
    div = np_divergence(emb, 1.5)
    assert div > 0
    np.testing.assert_allclose(float(aux["contrastive"]), metric, rtol=1e-5)
    np.testing.assert_allclose(float(aux["divergence"]), div, rtol=1e-5)
    np.testing.assert_allclose(float(loss), metric + 0.3 * div, rtol=1e-5)
    assert all(np.ndim(v) == 0 for v in aux.values())


def test_divergence_is_m_m1_mdiv_when_learners_agree_and_0_when_apart():
    m, m_div = 4, 1.0
    c = loss_config(abe_div_margin=m_div, abe_div_weight=1.0)
    rng = np.random.default_rng(1)
    same = np.repeat(rng.normal(size=(1, 6, 8)), m, axis=0) * rng.uniform(0.5, 2, (m, 1, 1))
    _, aux = run(c, same)
    np.testing.assert_allclose(float(aux["divergence"]), m * (m - 1) * m_div, rtol=1e-5)
    # orthogonal unit learners: d^2 = 2 >= m_div, no term active
    apart = np.zeros((m, 6, 8))
    for j in range(m):
        apart[j, :, j] = 1.0 + j
    _, aux = run(c, apart)
    assert float(aux["divergence"]) == 0.0
    # exactly at sqrt(m_div) = 1 apart (unit vectors at 60 degrees): still 0
    ang = np.pi / 3
    pair = np.zeros((2, 6, 2))
    pair[0, :, 0] = 1.0
    pair[1, :] = [np.cos(ang), np.sin(ang)]
    _, aux = run(c, pair)
    assert float(aux["divergence"]) < 1e-5


def test_single_learner_is_the_contrastive_loss_alone():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(1, 6, 5))
    c = loss_config(abe_div_weight=7.0)  # no pair of learners: the weight cannot matter
    loss, aux = run(c, emb)
    np.testing.assert_allclose(float(loss), np_contrastive(emb[0], LABELS, 1.0), rtol=1e-5)
    assert float(aux["divergence"]) == 0.0


def test_masked_rows_join_nothing():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(2, 6, 4))
    mask = np.array([True, True, True, True, False, False])
    c = loss_config(abe_div_weight=0.5)
    loss, _ = run(c, emb, mask=mask)
    want = (np.mean([np_contrastive(emb[m, :4], LABELS[:4], 1.0) for m in range(2)])
            + 0.5 * np_divergence(emb[:, :4], 1.0))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_missing_loss_key_is_named():
    c = loss_config()
    del c.loss["abe_div_margin"]
    with pytest.raises(ValueError, match="config.loss.abe_div_margin"):
        methods.get_method("abe").objective(
            {"embeddings": jnp.zeros((2, 6, 4))}, jnp.asarray(LABELS), {}, c)


def test_abe8_recipe_builds_with_its_lr_groups():
    c = loss_config()
    config_lib.validate(c)
    assert (c.model.num_learners, c.model.embedding_dim) == (8, 64)
    assert c.loss.abe_div_all_pairs is False and c.loss.abe_div_weight == 0.25 / 56
    model = methods.get_method("abe").build_model(c)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 227, 227, 3)))["params"]
    mults = optim.param_multipliers(params, c.optim)
    assert mults["trunk/conv1_7x7_s2/kernel"][:2] == (1.0, 1.0)
    assert mults["attention_trunk/inception_4e_1x1/bias"][:2] == (2.0, 0.0)
    assert mults["cam_7/kernel"][:2] == (10.0, 1.0) and mults["cam_7/bias"][0] == 20.0
    assert mults["embed/kernel"][:2] == (10.0, 1.0)


def test_gradients_reach_masks_attention_trunk_and_trunk():
    c = loss_config()
    c.model.update(backbone="tiny", num_learners=3, embedding_dim=4)
    method = methods.get_method("abe")
    model = method.build_model(c)
    images = jax.random.normal(jax.random.PRNGKey(1), (6, 24, 24, 3))
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]

    def f(p):
        out = model.apply({"params": p}, images, train=True)
        return method.objective(out, jnp.asarray(LABELS), p, c)[0]

    grads = jax.jit(jax.grad(f))(params)
    for key in ("trunk", "attention_trunk", "cam_0", "cam_2", "embed"):
        assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[key])) > 0, key


def test_load_pretrained_fills_both_trunks():
    c = loss_config()
    c.model.update(backbone="tiny", num_learners=2, embedding_dim=4)
    method = methods.get_method("abe")
    params = method.build_model(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)))["params"]
    rng = np.random.default_rng(0)
    trunk = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                         dict(params["trunk"]))
    new, stats = method.load_pretrained(params, {}, {"params": trunk})
    assert stats == {}
    for name in trunk:
        np.testing.assert_array_equal(np.asarray(new["trunk"][name]["kernel"]),
                                      trunk[name]["kernel"])
    np.testing.assert_array_equal(np.asarray(new["attention_trunk"]["inception_4a"]["bias"]),
                                  trunk["inception_4a"]["bias"])
    np.testing.assert_array_equal(np.asarray(new["cam_1"]["kernel"]),
                                  np.asarray(params["cam_1"]["kernel"]))
