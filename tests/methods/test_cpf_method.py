"""CPF as a method (related-methods.md §4): objective, proxies and their learning rate.

References: the related-methods.md §4.1 formula in NumPy (float64) and the related-methods.md §4.7 hand value; the
first Adam step's size (= the learning rate of every coordinate whose gradient
is well above eps) for the per-group learning rates.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from deml_jax import config_lib, methods, train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _np_cpf(x, labels, p, tau, psi, s_p, s_n, mu, b):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    tp, lp, ln = b, 0.0, 0.0
    for i in range(len(x)):
        for c in range(len(p)):
            cos = xn[i] @ pn[c]
            if c == labels[i]:
                tp += 2 * max(cos, 0.0)
                lp += (1 - cos) * np.exp(s_p * (1 - cos))
            elif cos > tau:
                ln += (cos - psi) * np.exp(s_n * (cos - mu))
    return 1 - tp / (tp + lp + ln)


def _config(name="cub200_cpf.py"):
    return config_lib.load_config(os.path.join(ROOT, "configs", name))


def test_objective_matches_the_hand_value_and_numpy():
    c = _config()
    method = methods.get_method("cpf")
    objective = jax.jit(lambda out, lab, params: method.objective(out, lab, params, c))
    # related-methods.md §4.7: cos_pos 0.5, cos_neg 0.6 with CUB's parameters -> 0.978033.
    x = jnp.array([[1.0, 0.0]])
    proxies = jnp.array([[0.5, np.sqrt(0.75)], [0.6, 0.8]])
    loss, aux = objective({"embeddings": x}, jnp.array([0]), {"proxies": proxies})
    np.testing.assert_allclose(float(loss), 0.978033, rtol=1e-5)
    assert float(aux["labels_outside_proxies"]) == 0
    rng = np.random.default_rng(0)
    x, p = rng.normal(size=(6, 5)), rng.normal(size=(4, 5))
    labels = np.array([0, 0, 1, 1, 3, 3])
    loss, _ = objective({"embeddings": jnp.asarray(x, jnp.float32)}, jnp.asarray(labels),
                        {"proxies": jnp.asarray(p, jnp.float32)})
    want = _np_cpf(x, labels, p, 0.38, 0.2, 9.0, 9.0, 0.0, 2.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    # A label without a proxy: NaN (the trainer stops) and counted.
    loss, aux = objective({"embeddings": jnp.asarray(x, jnp.float32)},
                          jnp.asarray(labels + 1), {"proxies": jnp.asarray(p, jnp.float32)})
    assert np.isnan(float(loss)) and float(aux["labels_outside_proxies"]) == 2


def test_proxies_and_embedding_get_their_own_learning_rates():
    c = _config("cub200_cpf.py:runlocal")
    c.model.update(backbone="tiny", embedding_dim=8)
    c.optim.weight_decay = 0.0
    method = methods.get_method("cpf")
    model, tx = train.create_model(c), train.create_optimizer(c)
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3)) * 50.0
    labels = jnp.array([0, 0, 7, 7, 50, 50, 99, 99])
    params = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x)["params"])(images[:1])
    assert params["proxies"].shape == (100, 8)  # CUB's 100 training classes

    @jax.jit
    def step(params):
        grads = jax.grad(lambda p: method.objective(
            model.apply({"params": p}, images, train=True), labels, p, c)[0])(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return grads, updates

    grads, updates = step(params)
    for path, lr in ((("proxies",), 5e-4), (("embed", "kernel"), 0.02),
                     (("trunk", "conv1", "kernel"), 5e-5)):
        g, u = grads, updates
        for k in path:
            g, u = g[k], u[k]
        g, u = np.asarray(g), np.asarray(u)
        # First step of Caffe's Adam (eps 1e-8 on the uncorrected sqrt(v), b2 0.999):
        # |update| = lr |g| / (|g| + eps / sqrt(1 - b2)).
        big = np.abs(g) > 1e-6
        assert big.sum() > 0, path
        want = lr * np.abs(g[big]) / (np.abs(g[big]) + 1e-8 / np.sqrt(1 - 0.999))
        np.testing.assert_allclose(np.abs(u[big]), want, rtol=1e-4, err_msg=str(path))
        assert np.all(np.sign(u[big]) == -np.sign(g[big]))
    # Proxies of classes absent from the batch but below tau get no gradient.
    assert np.abs(np.asarray(grads["proxies"])[[0, 7, 50, 99]]).max() > 0
