"""DeML(I, J) end to end: shapes, the stop-gradient chain, determinism, embeddings."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deml_jax.models import DeML
from deml_jax.models.attention import ChannelAttention
from test_googlenet import INCEPTIONS, random_caffe_weights, to_flax  # tests/models


def _images(batch, size, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(-120, 130, (batch, size, size, 3)).astype(np.float32))


@pytest.fixture(scope="module")
def deml33():
    """The released DeML(3,3) with BVLC trunks at 227 px (compiled once)."""
    model = DeML()
    x = _images(2, 227)
    variables = jax.jit(lambda r: model.init(r, x[:1]))(jax.random.PRNGKey(0))
    apply = jax.jit(lambda v, x: model.apply(v, x, train=True))
    return model, variables, apply, x


def test_deml33_shapes_and_embedding(deml33):
    _, variables, apply, x = deml33
    out = apply(variables, x)
    chex.assert_shape(out["embeddings"], (3, 3, 2, 56))
    chex.assert_shape(out["act"], (3, 2, 56))
    chex.assert_shape(out["embedding"], (2, 504))
    chex.assert_shape(out["attention"], (2, 2, 7, 7))
    chex.assert_shape(out["boxes"], (2, 2, 4))
    chex.assert_shape(out["crops"], (2, 2, 227, 227, 3))
    chex.assert_tree_all_finite(out)
    # Inference embedding: NumPy normalisation of every learner, concatenated
    # in the order b1:j1..j3, b2:..., b3:... (§3.6).
    emb = np.asarray(out["embeddings"], np.float64)
    for n in range(2):
        blocks = [emb[i, j, n] / np.linalg.norm(emb[i, j, n]) for i in range(3) for j in range(3)]
        np.testing.assert_allclose(out["embedding"][n], np.concatenate(blocks), rtol=1e-5, atol=1e-6)
    assert set(variables["params"]) == {"branch_0", "branch_1", "branch_2"}
    branch = variables["params"]["branch_0"]
    assert set(branch) == {"trunk", "cam_0", "cam_1", "cam_2", "embed"}
    chex.assert_shape(branch["embed"]["kernel"], (1024, 56))  # W_b^T (§3.4)
    chex.assert_shape(branch["cam_0"]["reduce"]["kernel"], (1, 1, 512, 64))  # §3.3


def test_deml33_boxes_inside_image_and_deterministic(deml33):
    _, variables, apply, x = deml33
    a, b = apply(variables, x), apply(variables, x)
    chex.assert_trees_all_equal(a, b)
    boxes = np.asarray(a["boxes"])
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 1] >= 0).all()
    assert (boxes[..., 2] <= 227).all() and (boxes[..., 3] <= 227).all()
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    np.testing.assert_allclose(np.asarray(a["attention"]).sum((-1, -2)), 1.0, rtol=1e-5)


def torch_bvlc_deml_branch(weights, cams, w_embed, x_nhwc, cam_after="4b"):
    """BVLC GoogLeNet in torch (§3.2) with J released CAMs (§3.3) after ``cam_after``;
    the J masked copies go through the rest of the trunk, are averaged over
    positions and multiplied by W_b (§3.4). Returns [J, B, D]."""
    wt = {n: (torch.from_numpy(w).double(), torch.from_numpy(b).double())
          for n, (w, b) in weights.items()}
    conv = lambda x, n, p=0, s=1: F.relu(F.conv2d(x, *wt[n], stride=s, padding=p))
    lrn = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
    pool = torch.nn.MaxPool2d(3, 2, ceil_mode=True)
    ppool = torch.nn.MaxPool2d(3, 1, padding=1, ceil_mode=True)

    def inception(x, t):
        p = f"inception_{t}/"
        return torch.cat([conv(x, p + "1x1"), conv(conv(x, p + "3x3_reduce"), p + "3x3", 1),
                          conv(conv(x, p + "5x5_reduce"), p + "5x5", 2),
                          conv(ppool(x), p + "pool_proj")], 1)

    x = torch.from_numpy(np.asarray(x_nhwc, np.float64)).permute(0, 3, 1, 2)
    x = lrn(pool(conv(x, "conv1/7x7_s2", 3, 2)))
    x = pool(lrn(conv(conv(x, "conv2/3x3_reduce"), "conv2/3x3", 1)))
    streams = [x]
    for t in INCEPTIONS:
        streams = [inception(s, t) for s in streams]
        if t in ("3b", "4e"):
            streams = [pool(s) for s in streams]
        if t == cam_after:
            h = streams[0]
            streams = []
            for cam in cams:
                k1 = torch.from_numpy(np.asarray(cam["reduce"]["kernel"], np.float64))
                k2 = torch.from_numpy(np.asarray(cam["expand"]["kernel"], np.float64))
                u = F.relu(F.conv2d(h, k1.permute(3, 2, 0, 1),
                                    torch.from_numpy(np.asarray(cam["reduce"]["bias"],
                                                                np.float64))))
                a = torch.sigmoid(F.conv2d(u, k2.permute(3, 2, 0, 1),
                                           torch.from_numpy(np.asarray(cam["expand"]["bias"],
                                                                       np.float64))))
                streams.append(a * h)
    w = torch.from_numpy(np.asarray(w_embed, np.float64))
    return np.stack([(s.mean((2, 3)) @ w).numpy() for s in streams])


def test_cam_sits_after_inception_4b_in_bvlc_network(deml33):
    """§3.3: the CAMs mask ``inception_4b``'s output in the full BVLC network.
    Reference: a torch BVLC forward (float64) with the CAMs applied after 4b;
    the same forward with the CAMs after 4a or 4c is far off. Reuses the
    compiled DeML(3,3) with branch 1's trunk replaced by test_googlenet's
    random Caffe weights and CAM biases that switch channels off per learner."""
    _, variables, apply, x = deml33
    weights = random_caffe_weights(seed=2)
    params = jax.tree.map(np.array, variables["params"])
    bp = params["branch_0"]
    bp["trunk"] = to_flax(weights)
    for j in range(3):
        bp[f"cam_{j}"]["expand"]["bias"][j::3] = -4.0
    got = np.asarray(apply({"params": params}, x)["embeddings"][0], np.float64)
    cams = [bp[f"cam_{j}"] for j in range(3)]
    want = torch_bvlc_deml_branch(weights, cams, bp["embed"]["kernel"], np.asarray(x), "4b")
    scale = np.abs(want).max()
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-4, rtol=0)
    # The test can fail: with the CAMs one block later the embeddings are far off.
    other = torch_bvlc_deml_branch(weights, cams, bp["embed"]["kernel"], np.asarray(x), "4c")
    assert np.abs(other - want).max() / scale > 1e-2


def test_deml33_crops_carry_no_gradient(deml33):
    """Branch i+1 sees the crop as a constant (§3.5): no gradient reaches the
    image or the earlier branches through the object-attention module."""
    model, variables, _, x = deml33

    def later_branches(params, images):
        out = model.apply({"params": params}, images, train=True)
        return jnp.sum(out["embeddings"][1:] ** 2)

    g_params, g_images = jax.jit(jax.grad(later_branches, argnums=(0, 1)))(
        variables["params"], x)
    chex.assert_trees_all_equal(
        g_params["branch_0"], jax.tree.map(jnp.zeros_like, g_params["branch_0"]))
    chex.assert_trees_all_equal(g_images, jnp.zeros_like(g_images))
    assert float(jnp.abs(g_params["branch_1"]["embed"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("num_branches,num_learners", [(1, 1), (2, 4), (4, 2)])
def test_any_i_j_with_small_trunk(num_branches, num_learners):
    model = DeML(num_branches, num_learners, 8, backbone="tiny")
    x = _images(3, 32)
    variables = model.init(jax.random.PRNGKey(1), x)
    out = model.apply(variables, x)
    chex.assert_shape(out["embeddings"], (num_branches, num_learners, 3, 8))
    chex.assert_shape(out["embedding"], (3, num_branches * num_learners * 8))
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(out["embedding"]), axis=1),
        np.sqrt(num_branches * num_learners), rtol=1e-5)
    assert ("crops" in out) == (num_branches > 1)


def test_u512_is_a_configuration():
    model = DeML(1, 1, 512, backbone="tiny", channel_attention="none")
    x = _images(2, 32)
    variables = model.init(jax.random.PRNGKey(0), x)
    assert set(variables["params"]["branch_0"]) == {"trunk", "embed"}
    chex.assert_shape(model.apply(variables, x)["embedding"], (2, 512))


def test_adversary_outputs_and_params():
    model = DeML(2, 3, 8, backbone="tiny", adversary=True)
    x = _images(2, 32)
    variables = model.init(jax.random.PRNGKey(0), x)
    pred, target = model.apply(variables, x, grl_scale=0.5)["adversary"]
    chex.assert_shape([pred, target], (2, 6, 2, 8))  # I, J(J-1) ordered pairs, B, D
    assert "adversary" in variables["params"]["branch_1"]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_learners=1"):
        DeML(1, 2, 8, backbone="tiny", channel_attention="none").init(
            jax.random.PRNGKey(0), _images(1, 32))
    with pytest.raises(ValueError, match="backbone"):
        DeML(1, 1, 8, backbone="resnet").init(jax.random.PRNGKey(0), _images(1, 32))
    with pytest.raises(ValueError, match=r"\[B, S, S, 3\]"):
        DeML(1, 1, 8, backbone="tiny").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 30, 3)))


def test_channel_attention_matches_numpy():
    """The released CAM (§3.3) against a NumPy evaluation of the same weights."""
    h = _images(2, 5) / 100.0
    h = jnp.concatenate([h] * 4, axis=-1)  # 12 channels
    for kind in ("spatial", "se"):
        cam = ChannelAttention(kind, hidden=4)
        variables = cam.init(jax.random.PRNGKey(2), h)
        out, mask = cam.apply(variables, h)
        p = jax.tree.map(np.asarray, variables["params"])
        hn = np.asarray(h, np.float64)
        z = hn if kind == "spatial" else hn.mean(axis=(1, 2), keepdims=True)
        w1 = p["reduce"]["kernel"].reshape(12, 4)
        w2 = p["expand"]["kernel"].reshape(4, 12)
        u = np.maximum(z @ w1 + p["reduce"]["bias"], 0)
        ref_mask = 1 / (1 + np.exp(-(u @ w2 + p["expand"]["bias"])))
        np.testing.assert_allclose(mask, np.broadcast_to(ref_mask, mask.shape), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out, ref_mask * hn, rtol=1e-5, atol=1e-5)
