"""GoogLeNet 'bvlc' vs an independent torch build of the Caffe layers (§3.2).

The reference below is written from docs/reference.md §3.2 with torch ops
(F.conv2d, nn.LocalResponseNorm, nn.MaxPool2d(ceil_mode=True)), not from our
module; random weights are generated in Caffe layout (OIHW, Caffe layer names)
and moved into the Flax tree by this file's own rename/transpose.
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deml_jax.models import googlenet as G

# name: (in_ch, 1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj), §3.2 table.
INCEPTIONS = {
    "3a": (192, 64, 96, 128, 16, 32, 32), "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64), "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64), "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128), "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


def caffe_layers():
    """Caffe layer name -> (out, in, k) for the BVLC trunk."""
    layers = {"conv1/7x7_s2": (64, 3, 7), "conv2/3x3_reduce": (64, 64, 1),
              "conv2/3x3": (192, 64, 3)}
    for t, (cin, c1, c3r, c3, c5r, c5, pp) in INCEPTIONS.items():
        p = f"inception_{t}/"
        layers.update({p + "1x1": (c1, cin, 1), p + "3x3_reduce": (c3r, cin, 1),
                       p + "3x3": (c3, c3r, 3), p + "5x5_reduce": (c5r, cin, 1),
                       p + "5x5": (c5, c5r, 5), p + "pool_proj": (pp, cin, 1)})
    return layers


def random_caffe_weights(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, (o, i, k) in caffe_layers().items():
        lim = np.sqrt(6.0 / (i * k * k))  # He-uniform keeps activations O(1) over depth
        out[name] = (rng.uniform(-lim, lim, (o, i, k, k)).astype(np.float32),
                     rng.uniform(-0.1, 0.1, (o,)).astype(np.float32))
    return out


def to_flax(weights):
    return {n.replace("/", "_"): {"kernel": w.transpose(2, 3, 1, 0), "bias": b}
            for n, (w, b) in weights.items()}


def torch_bvlc(weights, x_nhwc, wt=None, as_numpy=True):
    """Independent torch forward; returns {stage: NHWC numpy} (or NCHW tensors)."""
    if wt is None:
        wt = {n: (torch.from_numpy(w), torch.from_numpy(b)) for n, (w, b) in weights.items()}
    conv = lambda x, n, p=0, s=1: F.relu(F.conv2d(x, *wt[n], stride=s, padding=p))
    lrn = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
    pool = torch.nn.MaxPool2d(3, 2, ceil_mode=True)
    ppool = torch.nn.MaxPool2d(3, 1, padding=1, ceil_mode=True)
    out = {}
    x = x_nhwc if torch.is_tensor(x_nhwc) else torch.from_numpy(np.asarray(x_nhwc))
    x = x.permute(0, 3, 1, 2)
    x = out["conv1"] = conv(x, "conv1/7x7_s2", 3, 2)
    x = out["pool1"] = pool(x)
    x = out["norm1"] = lrn(x)
    x = out["conv2"] = conv(conv(x, "conv2/3x3_reduce"), "conv2/3x3", 1)
    x = out["norm2"] = lrn(x)
    x = out["pool2"] = pool(x)
    for t in INCEPTIONS:
        p = f"inception_{t}/"
        x = torch.cat([conv(x, p + "1x1"), conv(conv(x, p + "3x3_reduce"), p + "3x3", 1),
                       conv(conv(x, p + "5x5_reduce"), p + "5x5", 2),
                       conv(ppool(x), p + "pool_proj")], 1)
        out[f"inception_{t}"] = x
        if t in ("3b", "4e"):
            x = out["pool3" if t == "3b" else "pool4"] = pool(x)
    out["pool5"] = x.mean((2, 3))
    if not as_numpy:
        return out
    return {k: (v.permute(0, 2, 3, 1) if v.ndim == 4 else v).numpy() for k, v in out.items()}


def assert_close_scaled(ours, ref, atol=1e-4):
    """Per-stage all-close after dividing by the reference's max magnitude."""
    assert set(ours) == set(ref), (sorted(ours), sorted(ref))
    scale = {k: max(float(np.abs(v).max()), 1e-6) for k, v in ref.items()}
    chex.assert_trees_all_close({k: np.asarray(v, np.float32) / scale[k] for k, v in ours.items()},
                                {k: v / scale[k] for k, v in ref.items()}, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def setup():
    w = random_caffe_weights()
    params = {"params": to_flax(w)}
    model = G.GoogLeNet(variant="bvlc")
    apply = jax.jit(lambda p, x: model.apply(p, x)[1])
    return w, params, model, apply


def images(size, batch=1, seed=1):
    return np.random.default_rng(seed).normal(0, 50, (batch, size, size, 3)).astype(np.float32)


def test_bvlc_matches_torch_at_227(setup):
    w, params, _, apply = setup
    x = images(227)
    ours = apply(params, x)
    ref = torch_bvlc(w, x)
    # Hand-worked §3.2 table shapes at 227.
    for name, hw in [("conv1", 114), ("pool1", 57), ("pool2", 28), ("pool3", 14), ("pool4", 7)]:
        assert ours[name].shape[1:3] == (hw, hw), name
    assert ours["inception_5b"].shape == (1, 7, 7, 1024)
    assert_close_scaled(ours, ref)


@pytest.fixture(scope="module")
def small_run(setup):
    w, params, _, apply = setup
    x = images(99, batch=2)
    return x, apply(params, x), torch_bvlc(w, x)


def test_bvlc_matches_torch_at_odd_size(small_run):
    _, ours, ref = small_run
    # 99 -> conv1 50 -> pool1 25 -> pool2 12 -> pool3 6 -> pool4 3: windows clipped.
    assert ours["pool1"].shape[1] == 25 and ours["pool4"].shape[1] == 3
    assert_close_scaled(ours, ref)


def test_resume_from_inception_4b_on_stacked_batch(setup, small_run):
    """DeML's use: lower trunk to 4b, then upper trunk on a 3x batch (§3.3)."""
    _, params, model, _ = setup
    x, full, _ = small_run
    lower = jax.jit(lambda p, x: model.apply(p, x, stop="inception_4b"))
    upper = jax.jit(lambda p, h: model.apply(p, h, start="inception_4b"))
    h, inter_lo = lower(params, x)
    assert set(inter_lo) == {"conv1", "pool1", "norm1", "conv2", "norm2", "pool2", "inception_3a",
                             "inception_3b", "pool3", "inception_4a", "inception_4b"}
    stacked = jnp.concatenate([h, h[::-1], h])
    out, inter_up = upper(params, stacked)
    assert "inception_4b" not in inter_up and "inception_4c" in inter_up
    f = np.asarray(full["pool5"])
    chex.assert_trees_all_close(np.asarray(out), np.concatenate([f, f[::-1], f]),
                                atol=1e-5 * np.abs(f).max(), rtol=0)


def test_lrn_matches_caffe_loop_and_torch():
    """Caffe: x / (k + alpha/size * sum_{|c'-c|<=2} x_c'^2)^beta; torch divides alpha by size too."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 30, (2, 3, 4, 7)).astype(np.float32)  # NHWC, 7 channels
    win = np.empty_like(x, dtype=np.float64)
    for c in range(7):
        win[..., c] = sum(x[..., j].astype(np.float64) ** 2 for j in range(max(0, c - 2), min(7, c + 3)))
    ref = x / (1.0 + 1e-4 / 5 * win) ** 0.75
    ours = G.local_response_norm(jnp.asarray(x))
    th = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)(
        torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    chex.assert_trees_all_close(np.asarray(ours), ref.astype(np.float32), rtol=1e-5, atol=1e-4)
    chex.assert_trees_all_close(th, ref.astype(np.float32), rtol=1e-5, atol=1e-4)
    assert np.abs(ref - x).max() > 1e-2  # the normalisation is not a no-op here
    other = G.local_response_norm(jnp.asarray(x), beta=0.5)  # general-beta path
    ref5 = x / (1.0 + 1e-4 / 5 * win) ** 0.5
    chex.assert_trees_all_close(np.asarray(other), ref5.astype(np.float32), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("size,k,s,p", [(114, 3, 2, 0), (57, 3, 2, 0), (50, 3, 2, 0),
                                        (14, 2, 2, 0), (7, 2, 2, 0), (28, 3, 1, 1),
                                        (5, 1, 2, 0), (6, 3, 2, 1), (9, 4, 3, 2), (10, 3, 3, 1)])
def test_ceil_pool_matches_torch(size, k, s, p):
    out, lo, hi = G.ceil_pool_padding(size, k, s, p)
    x = np.random.default_rng(size * 7 + k).normal(size=(1, 2, size, size)).astype(np.float32)
    ref = torch.nn.MaxPool2d(k, s, padding=p, ceil_mode=True)(torch.from_numpy(x)).numpy()
    assert out == ref.shape[-1] and lo == p and hi >= 0
    ours = G.max_pool_ceil(jnp.asarray(x.transpose(0, 2, 3, 1)), k, s, p)
    chex.assert_trees_all_close(np.asarray(ours).transpose(0, 3, 1, 2), ref)


def test_hand_worked_ceil_sizes():
    assert G.ceil_pool_padding(114, 3, 2)[0] == 57   # §3.2 pool1
    assert G.ceil_pool_padding(14, 3, 2)[0] == 7     # §3.2 pool4
    assert G.ceil_pool_padding(50, 3, 2) == (25, 0, 1)  # ceil(47/2)+1, last window clipped
    assert G.ceil_pool_padding(5, 1, 2, 1)[0] == 3   # last window would start in padding


def test_init_creates_all_params_and_a_shared_trunk():
    """Two calls (lower, then upper) of one instance share one set of params."""
    class Parent(nn.Module):
        @nn.compact
        def __call__(self, x):
            trunk = G.GoogLeNet(name="trunk")
            h, _ = trunk(x, stop="inception_4b")
            return trunk(jnp.concatenate([h, h, h]), start="inception_4b")[0]

    x = jnp.zeros((1, 64, 64, 3))
    shapes = jax.eval_shape(Parent().init, jax.random.key(0), x)
    want = {n.replace("/", "_"): {"kernel": (k, k, i, o), "bias": (o,)}
            for n, (o, i, k) in caffe_layers().items()}
    got = jax.tree.map(lambda a: a.shape, shapes["params"]["trunk"])
    assert got == want
    assert set(shapes["params"]) == {"trunk"}
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
    full = jax.eval_shape(G.GoogLeNet().init, jax.random.key(0), x)
    assert jax.tree.map(lambda a: a.shape, full["params"]) == want
    lower = jax.eval_shape(lambda k, x: G.GoogLeNet().init(k, x, stop="pool3"), jax.random.key(0), x)
    assert set(lower["params"]) == {n for n in want if not n.startswith(("inception_4", "inception_5"))}


def test_xavier_init_bounds():
    p = jax.jit(lambda k: G.GoogLeNet().init(k, jnp.zeros((1, 32, 32, 3)), stop="norm1"))(
        jax.random.key(0))["params"]["conv1_7x7_s2"]
    lim = np.sqrt(3.0 / (7 * 7 * 3))  # Caffe xavier: U(-sqrt(3/fan_in), +sqrt(3/fan_in))
    k = np.asarray(p["kernel"])
    assert np.abs(k).max() <= lim and np.abs(k).max() > 0.95 * lim
    assert abs(k.std() - lim / np.sqrt(3)) < 0.1 * lim
    assert not np.asarray(p["bias"]).any()


@pytest.mark.parametrize("kw,msg", [
    (dict(stop="pool6"), "stop must be one of"),
    (dict(start="nope"), "start must be None or one of"),
    (dict(start="pool5"), "start must be None or one of"),
    (dict(start="pool3", stop="pool2"), "comes before"),
])
def test_bad_stage_names_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        jax.eval_shape(lambda x: G.GoogLeNet().init(jax.random.key(0), x, **kw),
                       jnp.zeros((1, 64, 64, 3)))


def test_bad_input_shape_and_variant_raise():
    with pytest.raises(ValueError, match="3 channels"):
        jax.eval_shape(lambda x: G.GoogLeNet().init(jax.random.key(0), x), jnp.zeros((1, 64, 64, 4)))
    with pytest.raises(ValueError, match="512 channels"):
        jax.eval_shape(lambda x: G.GoogLeNet().init(jax.random.key(0), x, start="inception_4b"),
                       jnp.zeros((1, 8, 8, 480)))
    with pytest.raises(ValueError, match="variant must be one of"):
        G.GoogLeNet(variant="resnet").stage_names()


def test_bf16_compute_close_to_fp32(setup, small_run):
    _, params, _, _ = setup
    x, full, _ = small_run
    model = G.GoogLeNet(variant="bvlc", dtype=jnp.bfloat16)
    out = jax.jit(lambda p, x: model.apply(p, x)[0])(params, x)
    assert out.dtype == jnp.bfloat16
    f = np.asarray(full["pool5"])
    err = np.abs(np.asarray(out, np.float32) - f).max() / np.abs(f).max()
    assert err < 0.08, err
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_bvlc_gradients_match_torch(setup, small_run):
    """Custom VJPs (conv kernel grad, first-max pool routing) vs torch autograd.

    The reference runs in float64: torch's own float32 backward was measured
    2.5e-3 (relative) away from float64 in the early layers, ours 1e-6.
    """
    w, params, model, _ = setup
    x, _, _ = small_run
    v = np.random.default_rng(5).normal(size=(x.shape[0], 1024)).astype(np.float32)
    loss = lambda p, x: jnp.sum(model.apply(p, x)[0] * v)
    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    wt = {n: (torch.from_numpy(a).double().requires_grad_(),
              torch.from_numpy(b).double().requires_grad_()) for n, (a, b) in w.items()}
    xt = torch.from_numpy(x).double().requires_grad_()
    (torch_bvlc(w, xt, wt, as_numpy=False)["pool5"] * torch.from_numpy(v).double()).sum().backward()
    ref = {n.replace("/", "_"): {"kernel": a.grad.numpy().transpose(2, 3, 1, 0), "bias": b.grad.numpy()}
           for n, (a, b) in wt.items()}
    ref["x"], ours = xt.grad.numpy(), {**gp["params"], "x": gx}
    scale = jax.tree.map(lambda r: max(float(np.abs(r).max()), 1e-12), ref)
    chex.assert_trees_all_close(jax.tree.map(lambda a, s: np.asarray(a) / s, ours, scale),
                                jax.tree.map(lambda a, s: a / s, ref, scale), atol=2e-5, rtol=0)


@pytest.mark.parametrize("hw,cin,cout,k,s,p", [(13, 3, 5, 7, 2, 3), (9, 12, 6, 3, 1, 1),
                                               (8, 10, 4, 5, 1, 2), (6, 9, 7, 1, 1, 0)])
def test_conv2d_matches_torch_forward_and_backward(hw, cin, cout, k, s, p):
    rng = np.random.default_rng(hw + k)
    x = rng.normal(size=(2, hw, hw, cin)).astype(np.float32)
    w = rng.normal(size=(k, k, cin, cout)).astype(np.float32)
    b = rng.normal(size=(cout,)).astype(np.float32)
    dy_shape = (2, (hw + 2 * p - k) // s + 1, (hw + 2 * p - k) // s + 1, cout)
    dy = rng.normal(size=dy_shape).astype(np.float32)
    y, vjp = jax.vjp(lambda x, w, b: G.conv2d(x, w, b, stride=s, pad=p), x, w, b)
    gx, gw, gb = vjp(jnp.asarray(dy))
    xt, wt, bt = (torch.from_numpy(a).requires_grad_() for a in
                  (x.transpose(0, 3, 1, 2).copy(), w.transpose(3, 2, 0, 1).copy(), b))
    yt = F.conv2d(xt, wt, bt, stride=s, padding=p)
    yt.backward(torch.from_numpy(dy.transpose(0, 3, 1, 2).copy()))
    chex.assert_trees_all_close(
        (np.asarray(y), np.asarray(gx), np.asarray(gw), np.asarray(gb)),
        (yt.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
         wt.grad.numpy().transpose(2, 3, 1, 0), bt.grad.numpy()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hw,k,s,p", [(9, 3, 2, 0), (8, 3, 1, 1), (7, 2, 2, 0), (10, 3, 2, 1)])
def test_max_pool_gradient_routes_to_first_max_like_torch(hw, k, s, p):
    """Small integer inputs make many ties: torch (like Caffe) routes to the first max."""
    rng = np.random.default_rng(hw * 3 + k)
    x = rng.integers(0, 3, size=(2, 3, hw, hw)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    yt = F.max_pool2d(xt, k, s, p, ceil_mode=True)
    dy = rng.normal(size=yt.shape).astype(np.float32)
    yt.backward(torch.from_numpy(dy))
    y, vjp = jax.vjp(lambda a: G.max_pool_ceil(a, k, s, p), jnp.asarray(x.transpose(0, 2, 3, 1)))
    (gx,) = vjp(jnp.asarray(dy.transpose(0, 2, 3, 1)))
    chex.assert_trees_all_close((np.asarray(y).transpose(0, 3, 1, 2), np.asarray(gx).transpose(0, 3, 1, 2)),
                                (yt.detach().numpy(), xt.grad.numpy()), atol=1e-5)


def test_unfused_1x1_path_matches_torch(setup):
    w, params, _, _ = setup
    x = images(64)
    model = G.GoogLeNet(variant="bvlc", fuse_1x1=False)
    out, _ = jax.jit(lambda p, x: model.apply(p, x, stop="inception_3b"))(params, x)
    ref = torch_bvlc(w, x)["inception_3b"]
    chex.assert_trees_all_close(np.asarray(out) / np.abs(ref).max(), ref / np.abs(ref).max(),
                                atol=1e-5, rtol=0)
