"""ECAML (related-methods.md §2): gradient routing of the confusion branch and the objective.

References: NumPy (float64) for the objective's value, torch autograd for the
confusion term's gradient on W; the zero gradients are checked exactly.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from deml_jax import config_lib, methods
from deml_jax.models.tiny import TinyNet

HERE = os.path.dirname(os.path.abspath(__file__))
LABELS = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)


def config(method="ecaml", **loss):
    c = config_lib.load_config(os.path.join(HERE, "method_config.py") + f":{method}")
    c.loss.update(**loss)
    return c


def objective(method, c):
    """The method's objective on LABELS, jitted (one compilation, not op by op)."""
    return jax.jit(lambda outputs, params: method.objective(outputs, jnp.asarray(LABELS), params, c))


@pytest.fixture(scope="module")
def ecaml_setup():
    c = config(ec_pairs="all_neg")
    method = methods.get_method("ecaml")
    model = method.build_model(c)
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3)) * 50.0
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images[:1])
    # A non-zero bias, so that a bias gradient could not vanish by accident.
    params = jax.tree.map(lambda x: x, variables["params"])
    params["embed"]["bias"] = jnp.linspace(-1.0, 1.0, params["embed"]["bias"].shape[0])
    return c, method, model, params, images


@pytest.mark.parametrize("pairs", ["all_neg", "random"])
def test_confusion_term_reaches_only_the_embedding_weights(ecaml_setup, pairs):
    c, method, model, params, images = ecaml_setup
    c.loss.ec_pairs = pairs
    from deml_jax.methods.deml import confusion_term

    def f(p):
        out = model.apply({"params": p}, images, train=True)
        return confusion_term(out["confusion"], LABELS, c.loss, key=jax.random.PRNGKey(3))[0]

    grads = jax.jit(jax.grad(f))(params)
    for leaf in jax.tree.leaves(grads["trunk"]):
        assert not np.any(np.asarray(leaf)), "the trunk got a gradient from the EC term"
    assert not np.any(np.asarray(grads["embed"]["bias"])), "the bias got an EC gradient"
    assert np.abs(np.asarray(grads["embed"]["kernel"])).max() > 0
    c.loss.ec_pairs = "all_neg"


def test_confusion_gradient_on_w_matches_torch(ecaml_setup):
    c, method, model, params, images = ecaml_setup
    from deml_jax.methods.deml import confusion_term

    def f(p):
        out = model.apply({"params": p}, images, train=True)
        return confusion_term(out["confusion"], LABELS, c.loss)[0]

    got = np.asarray(jax.jit(jax.grad(f))(params)["embed"]["kernel"])
    pooled, _ = TinyNet().apply({"params": params["trunk"]}, images, stop="pool5")
    p = torch.tensor(np.asarray(pooled).reshape(8, -1), dtype=torch.float64)
    w = torch.tensor(np.asarray(params["embed"]["kernel"]), dtype=torch.float64,
                     requires_grad=True)
    b = torch.tensor(np.asarray(params["embed"]["bias"]), dtype=torch.float64)
    z = p @ w + b
    energy, n_neg = 0.0, 0
    for i in range(8):
        for j in range(i + 1, 8):
            if LABELS[i] != LABELS[j]:
                energy = energy + 0.5 * ((z[i] - z[j]) ** 2).sum()
                n_neg += 1
    (0.13 * torch.log(energy / n_neg + 1e-12)).backward()
    np.testing.assert_allclose(got, w.grad.numpy(), rtol=1e-4, atol=1e-7)


def _np_binomial(z, labels, alpha=2.0, beta=0.5, cp=1.0, cn=25.0):
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    pos, neg, n_pos, n_neg = 0.0, 0.0, 0, 0
    terms = []
    for i in range(len(z)):
        for k in range(i + 1, len(z)):
            cos = zn[i] @ zn[k]
            same = labels[i] == labels[k]
            g = -alpha * cp if same else alpha * cn
            terms.append((same, np.log1p(np.exp(g * (cos - beta)))))
    n_pos = sum(s for s, _ in terms)
    n_neg = len(terms) - n_pos
    return sum(t / (n_pos if s else n_neg) for s, t in terms)


def _np_log_energy(z, labels):
    e, n = 0.0, 0
    for i in range(len(z)):
        for j in range(i + 1, len(z)):
            if labels[i] != labels[j]:
                e += 0.5 * np.sum((z[i] - z[j]) ** 2)
                n += 1
    return np.log(e / n + 1e-12)


def test_ecaml_objective_matches_numpy():
    rng = np.random.default_rng(0)
    z, za = rng.normal(size=(8, 6)), rng.normal(size=(8, 6))
    w = rng.normal(size=(10, 6)) * 0.5
    c = config(ec_pairs="all_neg")
    method = methods.get_method("ecaml")
    outputs = {"embeddings": jnp.asarray(z, jnp.float32), "confusion": jnp.asarray(za, jnp.float32)}
    params = {"embed": {"kernel": jnp.asarray(w, jnp.float32)}}
    loss, aux = objective(method, c)(outputs, params)
    row_norm = 0.5 / 6 * np.sum((np.sum(w * w, axis=0) - 1.0) ** 2)
    want = _np_binomial(z, LABELS) + 0.13 * _np_log_energy(za, LABELS) + row_norm
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(aux["row_norm"]), row_norm, rtol=1e-5)
    # confusion='none': the base metric loss alone, no regulariser (related-methods.md §2.3: it
    # belongs to the confusion layer).
    c.loss.confusion = "none"
    loss, aux = objective(method, c)(outputs, params)
    np.testing.assert_allclose(float(loss), _np_binomial(z, LABELS), rtol=1e-5)
    assert "confusion" not in aux and "row_norm" not in aux


def test_deml_with_ecaml_confusion_adds_the_term_on_act():
    rng = np.random.default_rng(1)
    c = config("deml", ec_pairs="all_neg")
    method = methods.get_method("deml")
    emb = rng.normal(size=(2, 2, 8, 4))
    act = rng.normal(size=(2, 8, 4))
    outputs = {"embeddings": jnp.asarray(emb, jnp.float32), "act": jnp.asarray(act, jnp.float32)}
    params = {f"branch_{b}": {"embed": {"kernel": jnp.asarray(rng.normal(size=(6, 4)),
                                                              jnp.float32)}} for b in range(2)}
    base, _ = objective(method, c)(outputs, params)
    c.loss.confusion = "ecaml"
    with_ec, aux = objective(method, c)(outputs, params)
    want = 0.13 * sum(_np_log_energy(act[b], LABELS) for b in range(2))
    np.testing.assert_allclose(float(with_ec) - float(base), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(aux["confusion"]), want, rtol=1e-5)


def test_deml_confusion_reaches_only_the_branch_embedding():
    """On DeML, act = W_b stop_grad(p_b1) (§5.3): EC only reaches W_b."""
    c = config("deml", confusion="ecaml", ec_pairs="all_neg")
    c.model.update(num_branches=1, num_learners=2)
    method = methods.get_method("deml")
    model = method.build_model(c)
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3)) * 50.0
    params = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images[:1])["params"]
    from deml_jax.methods.deml import confusion_term

    def f(p):
        out = model.apply({"params": p}, images, train=True)
        return confusion_term(out["act"][0], LABELS, c.loss)[0]

    grads = jax.jit(jax.grad(f))(params)["branch_0"]
    assert np.abs(np.asarray(grads.pop("embed")["kernel"])).max() > 0
    for leaf in jax.tree.leaves(grads):
        assert not np.any(np.asarray(leaf))
