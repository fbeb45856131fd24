"""cpf_loss vs a plain-Python loop and the worked numbers of related-methods.md §4.7."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deml_jax.losses import CPF_DEFAULTS, cpf_defaults, cpf_loss

# Jitted once per shape: far cheaper on CPU than op-by-op execution.
_loss = jax.jit(cpf_loss, static_argnames=("tau", "psi", "s_p", "s_n", "mu", "b"))

CUB = dict(tau=0.38, psi=0.2, s_p=9.0, s_n=9.0, mu=0.0, b=2.0)   # related-methods.md §4.2 CUB column
SOP = dict(tau=0.38, psi=0.2, s_p=3.0, s_n=8.0, mu=1.0, b=2.0)   # related-methods.md §4.2 SOP column


def ref_cpf(x, proxies, labels, tau, psi, s_p, s_n, mu, b, mask=None, frozen_at=None):
    """related-methods.md §4.1 by loops. With ``frozen_at=(x0, P0)`` the exp weights are constants
    taken at (x0, P0) (what the detached weights mean for the gradient)."""
    def cosines(x, p):
        x = np.asarray(x, np.float64)
        p = np.asarray(p, np.float64)
        return [[float(np.dot(x[i], p[c]) / np.linalg.norm(x[i]) / np.linalg.norm(p[c]))
                 for c in range(len(p))] for i in range(len(x))]
    cos = cosines(x, proxies)
    wcos = cos if frozen_at is None else cosines(*frozen_at)
    tp, l_p, l_n = b, 0.0, 0.0
    for i in range(len(labels)):
        if mask is not None and not mask[i]:
            continue
        y = labels[i]
        tp += 2 * max(cos[i][y], 0.0)
        l_p += (1 - cos[i][y]) * math.exp(s_p * (1 - wcos[i][y]))
        for c in range(len(cos[i])):
            if c != y and cos[i][c] > tau:
                l_n += (cos[i][c] - psi) * math.exp(s_n * (wcos[i][c] - mu))
    return 1 - tp / (tp + l_p + l_n)


def num_grad(fn, x, h=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (fn(x + e) - fn(x - e)) / (2 * h)
    return g


def _one_image(cos_pos, cos_neg):
    """x = e1; unit proxies with the given cosines to x (class 0 = positive)."""
    x = np.array([[1.0, 0.0, 0.0]], np.float32)
    p = np.array([[cos_pos, math.sqrt(1 - cos_pos ** 2), 0.0],
                  [cos_neg, 0.0, math.sqrt(1 - cos_neg ** 2)]], np.float32)
    return x, p, np.array([0], np.int32)


@pytest.mark.parametrize("cos_pos,cos_neg,want", [
    (0.5, 0.6, 0.978033),   # L_P = 0.5 e^4.5, L_N = 0.4 e^5.4, TP = 3
    (0.5, 0.3, 0.937511),   # negative below tau: L_N = 0
    (1.0, 0.0, 0.0),        # perfect match
])
def test_worked_numbers(cos_pos, cos_neg, want):
    x, p, labels = _one_image(cos_pos, cos_neg)
    loss, aux = _loss(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(p), **CUB)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want, atol=1e-6)
    np.testing.assert_allclose(float(aux["cpf_tp"]), 2 * cos_pos + 2, atol=1e-6)
    assert float(aux["n_active_neg"]) == (1.0 if cos_neg > CUB["tau"] else 0.0)


def _batch(seed, b=6, c=4, d=6):
    # Embeddings near their proxy (the CUB weights e^{9(1-cos)} saturate the loss otherwise).
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(c, d)).astype(np.float32)
    labels = rng.integers(0, c, size=b).astype(np.int32)
    x = (p[labels] + 0.6 * rng.normal(size=(b, d))).astype(np.float32)
    return x, labels, p


@pytest.mark.parametrize("params", [CUB, SOP, CPF_DEFAULTS["default"]], ids=["cub", "sop", "code"])
def test_matches_loop_reference(params):
    x, labels, p = _batch(0)
    loss, aux = _loss(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(p), **params)
    want = ref_cpf(x, p, labels, **params)
    assert 0.05 < want < 0.99
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    tp, lp, ln = (float(aux[k]) for k in ("cpf_tp", "cpf_pos", "cpf_neg"))
    np.testing.assert_allclose(1 - tp / (tp + lp + ln), want, rtol=2e-5, atol=1e-6)


def test_gradient_has_detached_weights():
    x, labels, p = _batch(1)
    params = SOP
    f = jax.jit(jax.grad(lambda v, q: cpf_loss(v, jnp.asarray(labels), q, **params)[0],
                         argnums=(0, 1)))
    gx, gp = f(jnp.asarray(x), jnp.asarray(p))
    x64, p64 = x.astype(np.float64), p.astype(np.float64)
    frozen = (x64, p64)
    ref_x = num_grad(lambda v: ref_cpf(v, p64, labels, **params, frozen_at=frozen), x64)
    ref_p = num_grad(lambda q: ref_cpf(x64, q, labels, **params, frozen_at=frozen), p64)
    scale = max(np.abs(ref_x).max(), np.abs(ref_p).max())
    chex.assert_trees_all_close(np.asarray(gx), ref_x, rtol=1e-4, atol=1e-5 * scale)
    chex.assert_trees_all_close(np.asarray(gp), ref_p, rtol=1e-4, atol=1e-5 * scale)
    # The non-detached gradient is different: the weights do carry no gradient.
    live_x = num_grad(lambda v: ref_cpf(v, p64, labels, **params), x64)
    assert np.abs(live_x - ref_x).max() > 0.1 * np.abs(ref_x).max()


def test_permutation_invariance():
    x, labels, p = _batch(2)
    perm = np.random.default_rng(0).permutation(6)
    a = _loss(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(p), **CUB)
    b = _loss(jnp.asarray(x[perm]), jnp.asarray(labels[perm]), jnp.asarray(p), **CUB)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_positive_pair():
    # A proxy loss needs no same-class pair in the batch: all labels distinct.
    x, _, p = _batch(3, b=4)
    labels = np.arange(4, dtype=np.int32)
    loss, _ = _loss(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(p), **CUB)
    np.testing.assert_allclose(float(loss), ref_cpf(x, p, labels, **CUB), rtol=2e-5, atol=1e-6)


def test_mask_equals_dropping_rows():
    x, labels, p = _batch(4, b=8)
    keep = np.array([1, 0, 1, 1, 1, 0, 1, 1], bool)
    f = jax.jit(jax.value_and_grad(
        lambda v, q, lab, msk: cpf_loss(v, lab, q, mask=msk, **SOP), argnums=(0, 1), has_aux=True))
    (l_mask, aux_mask), (gx_mask, gp_mask) = f(jnp.asarray(x), jnp.asarray(p),
                                               jnp.asarray(labels), jnp.asarray(keep))
    (l_drop, aux_drop), (gx_drop, gp_drop) = f(jnp.asarray(x[keep]), jnp.asarray(p),
                                               jnp.asarray(labels[keep]), None)
    chex.assert_trees_all_close((l_mask, aux_mask), (l_drop, aux_drop), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close((gx_mask[keep], gp_mask), (gx_drop, gp_drop), rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_equal(gx_mask[~keep], jnp.zeros_like(gx_mask[~keep]))
    np.testing.assert_allclose(float(l_mask), ref_cpf(x, p, labels, **SOP, mask=keep), rtol=2e-5)


def test_defaults_are_the_released_scripts():
    # related-methods.md §4.2 table, copied by hand.
    assert cpf_defaults("cub200") == CUB and cpf_defaults("cars196") == CUB
    assert cpf_defaults("sop") == SOP
    code = dict(tau=0.2, psi=0.2, s_p=1.0, s_n=1.0, mu=0.0, b=2.0)
    assert cpf_defaults("inshop") == code and cpf_defaults("digits") == code


def test_bad_inputs_raise():
    x, labels, p = _batch(5)
    with pytest.raises(ValueError, match="proxies"):
        cpf_loss(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(p[:, :3]), **CUB)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        cpf_loss(jnp.asarray(x), jnp.asarray(labels + 4), jnp.asarray(p), **CUB)
    with pytest.raises(ValueError, match="labels"):
        cpf_loss(jnp.asarray(x), jnp.asarray(labels[:-1]), jnp.asarray(p), **CUB)
    with pytest.raises(ValueError, match="embeddings"):
        cpf_loss(jnp.ones((2, 6, 5)), jnp.asarray(labels), jnp.asarray(p), **CUB)


def test_bfloat16_input_gives_float32_loss():
    x, labels, p = _batch(6)
    x16 = jnp.asarray(x, jnp.bfloat16)
    loss, aux = _loss(x16, jnp.asarray(labels), jnp.asarray(p, jnp.bfloat16), **SOP)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in aux.values())
    want = ref_cpf(np.asarray(x16.astype(jnp.float32)),
                   np.asarray(jnp.asarray(p, jnp.bfloat16).astype(jnp.float32)), labels, **SOP)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
