"""abe_divergence vs plain-Python learner-pair loops in float64 (related-methods.md §3.2, §3.6)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deml_jax.losses import abe_divergence


def ref_div(f, margin, mask=None, all_pairs=False, normalize=False):
    """Same image: mean_n sum_{k != l} [m - ||f_k(x_n) - f_l(x_n)||^2]_+ ;
    all_pairs: mean_{(n, n')} sum_{k != l} [m - ||f_k(x_n) - f_l(x_n')||^2]_+ ."""
    f = np.asarray(f, np.float64)
    if normalize:
        f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    n_learners, b = f.shape[:2]
    rows = [n for n in range(b) if mask is None or mask[n]]
    img_pairs = [(n, q) for n in rows for q in rows] if all_pairs else [(n, n) for n in rows]
    total = 0.0
    for n, q in img_pairs:
        for k in range(n_learners):
            for l in range(n_learners):
                if k != l:
                    total += max(0.0, margin - np.sum((f[k, n] - f[l, q]) ** 2))
    return total / max(len(img_pairs), 1)


def num_grad(fn, x, h=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (fn(x + e) - fn(x - e)) / (2 * h)
    return g


def _learners(seed, m=3, b=5, d=4, scale=0.6):
    return (scale * np.random.default_rng(seed).normal(size=(m, b, d))).astype(np.float32)


def _div(f, **kw):
    return jax.jit(lambda v: abe_divergence(v, **kw))(jnp.asarray(f))


@pytest.mark.parametrize("all_pairs", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_loop_reference(all_pairs, normalize):
    f = _learners(0)
    loss, _ = _div(f, margin_div=1.0, all_pairs=all_pairs, normalize=normalize)
    want = ref_div(f, 1.0, all_pairs=all_pairs, normalize=normalize)
    assert loss.dtype == jnp.float32 and want > 0.1
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("all_pairs", [False, True])
def test_gradient_matches_finite_differences(all_pairs):
    f = _learners(1, b=3)
    grad = jax.jit(jax.grad(lambda v: abe_divergence(v, margin_div=1.2, all_pairs=all_pairs)[0]))(
        jnp.asarray(f))
    ref = num_grad(lambda v: ref_div(v, 1.2, all_pairs=all_pairs), f)
    assert np.abs(ref).max() > 1e-2
    chex.assert_trees_all_close(np.asarray(grad), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("all_pairs", [False, True])
def test_agreeing_learners_give_m_m1_mdiv(m, all_pairs):
    # related-methods.md §3.6 (ii): every learner outputs the same vector (for all_pairs: every image too).
    v = _learners(2, m=1, b=1)[0, 0]
    v = v / np.linalg.norm(v)
    shape = (m, 6, 4)
    f = np.broadcast_to(v, shape) if all_pairs else np.broadcast_to(
        _learners(3, m=1, b=6)[0], shape)
    loss, aux = _div(np.ascontiguousarray(f), margin_div=0.7, all_pairs=all_pairs)
    np.testing.assert_allclose(float(loss), m * (m - 1) * 0.7, rtol=1e-5)
    assert float(aux["div_active"]) == 1.0


def test_learners_far_apart_give_zero():
    # related-methods.md §3.6 (ii): pairwise d^2 >= m_div, here orthogonal directions at d = sqrt(m_div).
    m_div, m, b = 1.5, 3, 4
    r = np.sqrt(m_div / 2)               # ||r e_k - r e_l||^2 = 2 r^2 = m_div
    f = np.zeros((m, b, 5), np.float32)
    for k in range(m):
        f[k, :, k] = r * 1.0001
    f[:, :, 4] = np.arange(b)[None] * 0.3  # images differ; the learner pairs do not feel it
    (loss, aux), grad = jax.jit(jax.value_and_grad(
        lambda v: abe_divergence(v, margin_div=m_div), has_aux=True))(jnp.asarray(f))
    assert float(loss) == 0.0 and float(aux["div_active"]) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_single_learner_gives_zero():
    loss, _ = _div(_learners(4, m=1), margin_div=1.0)
    assert float(loss) == 0.0


@pytest.mark.parametrize("all_pairs", [False, True])
def test_permutation_invariance(all_pairs):
    f = _learners(5, b=6)
    img = np.random.default_rng(0).permutation(6)
    lrn = np.array([2, 0, 1])
    a = _div(f, margin_div=1.0, all_pairs=all_pairs)
    b = _div(f[lrn][:, img], margin_div=1.0, all_pairs=all_pairs)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("all_pairs", [False, True])
def test_mask_equals_dropping_rows(all_pairs):
    f = _learners(6, b=7)
    keep = np.array([1, 1, 0, 1, 0, 1, 1], bool)
    fn = jax.jit(jax.value_and_grad(
        lambda v, msk: abe_divergence(v, margin_div=1.0, mask=msk, all_pairs=all_pairs),
        has_aux=True))
    (l_mask, aux_mask), g_mask = fn(jnp.asarray(f), jnp.asarray(keep))
    (l_drop, aux_drop), g_drop = fn(jnp.asarray(f[:, keep]), None)
    chex.assert_trees_all_close((l_mask, aux_mask), (l_drop, aux_drop), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g_mask[:, keep], g_drop, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_equal(g_mask[:, ~keep], jnp.zeros_like(g_mask[:, ~keep]))
    np.testing.assert_allclose(float(l_mask), ref_div(f, 1.0, keep, all_pairs), rtol=2e-5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="embeddings"):
        abe_divergence(jnp.ones((4, 5)), margin_div=1.0)
    with pytest.raises(ValueError, match="mask"):
        abe_divergence(jnp.ones((2, 4, 5)), margin_div=1.0, mask=jnp.ones(5, bool))
