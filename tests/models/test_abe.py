"""ABE-M model (related-methods.md §3.1, §3.6): references written in torch / NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deml_jax import optim
from deml_jax.models import googlenet as G
from deml_jax.models import weights as W
from deml_jax.models.abe import ABE
from deml_jax.models.tiny import TinyNet

SIZE = 24  # tiny trunk: stem 12 x 12 (conv2), 4a 12 x 12, 4b 6 x 6, 5b 3 x 3


def _images(batch, size=SIZE, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, scale, (batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny3():
    model = ABE(num_learners=3, embedding_dim=5, backbone="tiny")
    x = _images(4)
    variables = model.init(jax.random.PRNGKey(1), x)
    out = jax.jit(lambda v, x: model.apply(v, x, return_masks=True))(variables, x)
    return model, variables, x, jax.tree.map(np.asarray, out)


# ---------------------------------------------------------------- reference --
def _t(a):
    return torch.from_numpy(np.array(a, np.float32))


def _conv(h, p, stride, pad):
    """Flax HWIO kernel -> torch OIHW convolution + bias."""
    return F.conv2d(h, _t(p["kernel"]).permute(3, 2, 0, 1), _t(p["bias"]), stride=stride,
                    padding=pad)


def torch_abe_tiny(params, images, num_learners):
    """ABE on the tiny trunk, one learner at a time (no batch folding), in torch.

    f_m(x) = W G(S(x) * sigmoid(A_m T(S(x)))), related-methods.md §3.1; returns masks [M, B, h, w, C]
    and unnormalised embeddings [M, B, D].
    """
    tr, at = params["trunk"], params["attention_trunk"]
    with torch.no_grad():
        x = _t(images).permute(0, 3, 1, 2)
        s = F.relu(_conv(F.relu(_conv(x, tr["conv1"], 1, 1)), tr["conv2"], 2, 1))  # S
        t = F.relu(_conv(s, at["inception_4a"], 1, 1))  # T: separate copy of 4a
        masks, embs = [], []
        for j in range(num_learners):
            mask = torch.sigmoid(_conv(t, params[f"cam_{j}"], 1, 0))
            h = s * mask
            h = F.relu(_conv(h, tr["inception_4a"], 1, 1))  # G
            h = F.relu(_conv(h, tr["inception_4b"], 2, 1))
            h = F.relu(_conv(h, tr["inception_5b"], 2, 1))
            embs.append(h.mean(dim=(2, 3)) @ _t(params["embed"]["kernel"]))
            masks.append(mask.permute(0, 2, 3, 1))
    return torch.stack(masks).numpy(), torch.stack(embs).numpy()


def test_tiny_abe_matches_torch_reference(tiny3):
    _, variables, x, out = tiny3
    masks, embs = torch_abe_tiny(variables["params"], x, 3)
    assert out["masks"].shape == (3, 4, 12, 12, 32)
    np.testing.assert_allclose(out["masks"], masks, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["embeddings"], embs, rtol=1e-4, atol=1e-5)
    # inference embedding: learner 1 first, each L2-normalised (related-methods.md §3.1)
    ref = np.concatenate([e / np.linalg.norm(e, axis=1, keepdims=True) for e in embs], axis=1)
    assert out["embedding"].shape == (4, 15)
    np.testing.assert_allclose(out["embedding"], ref, rtol=1e-4, atol=1e-5)


def test_concat_norm_is_sqrt_m_and_masks_in_open_unit_interval(tiny3):
    _, _, _, out = tiny3
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), np.sqrt(3.0),
                               rtol=1e-5)
    assert (out["masks"] > 0).all() and (out["masks"] < 1).all()
    # learners differ (separate A_m), the shared W gives 5 dims each
    assert np.abs(out["embeddings"][0] - out["embeddings"][1]).max() > 1e-4


def test_learners_folded_in_batch_one_trunk_call(tiny3):
    model, variables, x, _ = tiny3
    calls = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, TinyNet) and context.method_name == "__call__":
            calls.append((context.module.name, args[0].shape[0], kwargs.get("start"),
                          kwargs.get("stop")))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, x)
    assert calls == [("trunk", 4, None, "conv2"),                 # S, once
                     ("attention_trunk", 4, "conv2", "inception_4a"),  # T, once
                     ("trunk", 12, "conv2", "pool5")]             # G on M * B rows


def test_single_learner_is_a_plain_attention_gated_network():
    """M = 1: one embedding network (stem, gate, rest, W), related-methods.md §3.6 (i)."""
    model = ABE(num_learners=1, embedding_dim=7, backbone="tiny")
    x = _images(3, seed=2)
    variables = model.init(jax.random.PRNGKey(3), x)
    out = jax.tree.map(np.asarray, model.apply(variables, x, return_masks=True))
    _, embs = torch_abe_tiny(variables["params"], x, 1)
    assert out["embeddings"].shape == (1, 3, 7) and out["embedding"].shape == (3, 7)
    np.testing.assert_allclose(out["embeddings"], embs, rtol=1e-4, atol=1e-5)
    ref = embs[0] / np.linalg.norm(embs[0], axis=1, keepdims=True)
    np.testing.assert_allclose(out["embedding"], ref, rtol=1e-4, atol=1e-5)
    assert set(variables["params"]) == {"trunk", "attention_trunk", "cam_0", "embed"}


def test_bvlc_masks_are_480x14x14_at_227():
    """related-methods.md §3.6 (iii): the shape from the abstract evaluation (no compilation)."""
    model = ABE(num_learners=8, embedding_dim=64, backbone="bvlc")
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, 227, 227, 3)),
                                       return_masks=True))
    assert out["masks"].shape == (8, 2, 14, 14, 480)
    assert out["embeddings"].shape == (8, 2, 64) and out["embedding"].shape == (2, 512)
    params = variables["params"]
    assert params["cam_0"]["kernel"].shape == (1, 1, 832, 480)
    assert params["embed"]["kernel"].shape == (1024, 64) and "bias" not in params["embed"]
    # the attention trunk is a copy of exactly 4a..4e
    expected = {n for n in G.conv_specs("bvlc") if n.startswith("inception_4")}
    assert set(params["attention_trunk"]) == expected and len(expected) == 30
    assert set(params["trunk"]) == set(G.conv_specs("bvlc"))


def test_lr_multipliers_of_the_parameter_tree():
    """Trunks 1 (kernel) / 2 (bias) as in the BVLC finetune; new layers 10 / 20."""
    model = ABE(num_learners=2, embedding_dim=4, backbone="tiny")
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    expected = {"trunk/conv1/kernel": 1, "trunk/conv1/bias": 2,
                "attention_trunk/inception_4a/kernel": 1,
                "attention_trunk/inception_4a/bias": 2,
                "cam_0/kernel": 10, "cam_1/bias": 20, "embed/kernel": 10}
    paths = optim.param_path_strings(params)
    for path, mult in expected.items():
        assert path in paths
        assert optim.multiplier_for(path, optim.RELEASED_LR_MULTS, optim.DEFAULT_LR_MULT) == mult


def test_tiny_trunk_unchanged_without_the_abe_stage():
    """DeML's tiny trunk keeps its 4 conv stages; abe_stage adds a stride-1 4a."""
    x = jnp.zeros((1, SIZE, SIZE, 3))
    plain = jax.eval_shape(TinyNet().init, jax.random.PRNGKey(0), x)["params"]
    assert set(plain) == {"conv1", "conv2", "inception_4b", "inception_5b"}
    assert plain["inception_4b"]["kernel"].shape == (3, 3, 32, 64)
    _, inter = jax.eval_shape(lambda: TinyNet(abe_stage=True).init_with_output(
        jax.random.PRNGKey(0), x)[0])
    assert inter["conv2"].shape == inter["inception_4a"].shape[:3] + (32,) == (1, 12, 12, 32)
    assert inter["inception_4a"].shape == (1, 12, 12, 64)


def test_bad_arguments_raise():
    x = jnp.zeros((1, SIZE, SIZE, 3))
    with pytest.raises(ValueError, match="num_learners"):
        ABE(num_learners=0, backbone="tiny").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="backbone"):
        ABE(backbone="resnet").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"\[B, S, S, 3\]"):
        ABE(backbone="tiny").init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE)))


# ------------------------------------------------------------ weight import --
def _random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 1, s.shape).astype(np.float32), tree)


def _flat(tree):
    return W.flatten_tree(W._plain(tree))


def test_bvlc_converter_fills_stem_attention_and_main_trunk():
    # Caffe blobs (OIHW weight, bias) for every BVLC layer, named as in the caffemodel
    rng = np.random.default_rng(0)
    blobs, ref = {}, {}
    for flat, (k, cin, cout) in G.conv_specs("bvlc").items():
        w = rng.normal(0, 1, (cout, cin, k, k)).astype(np.float32)
        b = rng.normal(0, 1, (cout,)).astype(np.float32)
        parts = flat.split("_")
        caffe = (f"inception_{parts[1]}/" + "_".join(parts[2:]) if parts[0] == "inception"
                 else parts[0] + "/" + "_".join(parts[1:]))
        blobs[caffe] = [w, b]
        ref[flat] = (np.transpose(w, (2, 3, 1, 0)), b)
    trunk = W.bvlc_params_from_caffe(blobs)
    model = ABE(num_learners=2, embedding_dim=8, backbone="bvlc")
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 227, 227, 3)))
    params = _random_like(shapes["params"], 1)
    out = W.replicate_into_abe(params, trunk)
    for name, (w, b) in ref.items():  # stem and rest of the main trunk
        np.testing.assert_array_equal(np.asarray(out["trunk"][name]["kernel"]), w)
        np.testing.assert_array_equal(np.asarray(out["trunk"][name]["bias"]), b)
        if name.startswith("inception_4"):  # attention trunk: the same 4a..4e weights
            np.testing.assert_array_equal(np.asarray(out["attention_trunk"][name]["kernel"]), w)
            np.testing.assert_array_equal(np.asarray(out["attention_trunk"][name]["bias"]), b)
    assert set(out["attention_trunk"]) == {n for n in ref if n.startswith("inception_4")}
    for key in ("cam_0", "cam_1", "embed"):  # new layers untouched
        for leaf in params[key]:
            assert out[key][leaf] is params[key][leaf]
    # separate buffers: the two copies of 4a never alias
    a = out["trunk"]["inception_4a_1x1"]["kernel"]
    b = out["attention_trunk"]["inception_4a_1x1"]["kernel"]
    assert a is not b and a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()


def test_torchvision_converter_fills_params_and_batch_stats():
    from googlenet_pytorch import GoogLeNet as TorchGoogLeNet
    torch.manual_seed(0)
    tm = TorchGoogLeNet.from_name("googlenet", override_params={
        "num_classes": 10, "aux_logits": False, "transform_input": False})
    with torch.no_grad():
        for mod in tm.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    params_t, stats_t = W.torchvision_params_from_state_dict(tm.state_dict())
    params_t.pop("fc")
    model = ABE(num_learners=2, embedding_dim=8, backbone="torchvision_bn")
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    params = W.replicate_into_abe(_random_like(shapes["params"], 1), params_t)
    stats = W.replicate_into_abe(_random_like(shapes["batch_stats"], 2), stats_t)
    for sub in ("trunk", "attention_trunk"):
        np.testing.assert_array_equal(
            np.asarray(params[sub]["inception4e_branch2_1_conv"]["kernel"]),
            np.transpose(sd["inception4e.branch2.1.conv.weight"], (2, 3, 1, 0)))
        np.testing.assert_array_equal(np.asarray(params[sub]["inception4a_branch1_bn"]["scale"]),
                                      sd["inception4a.branch1.bn.weight"])
        np.testing.assert_array_equal(np.asarray(stats[sub]["inception4c_branch4_1_bn"]["var"]),
                                      sd["inception4c.branch4.1.bn.running_var"])
    np.testing.assert_array_equal(np.asarray(params["trunk"]["conv1_conv"]["kernel"]),
                                  np.transpose(sd["conv1.conv.weight"], (2, 3, 1, 0)))
    np.testing.assert_array_equal(np.asarray(stats["trunk"]["inception5b_branch1_bn"]["mean"]),
                                  sd["inception5b.branch1.bn.running_mean"])
    n_tv = len(_flat(params["attention_trunk"]))
    assert n_tv == sum(1 for k in _flat(params_t) if k.startswith("inception4"))
    assert not any(k.startswith(("conv", "inception3", "inception5"))
                   for k in params["attention_trunk"])


def test_replicate_into_abe_errors():
    model = ABE(num_learners=1, embedding_dim=4, backbone="tiny")
    params = _random_like(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                         jnp.zeros((1, SIZE, SIZE, 3)))["params"], 0)
    trunk = {k: dict(v) for k, v in params["trunk"].items()}
    out = W.replicate_into_abe(params, trunk)  # the tiny trunk fits itself
    np.testing.assert_array_equal(np.asarray(out["attention_trunk"]["inception_4a"]["kernel"]),
                                  trunk["inception_4a"]["kernel"])
    with pytest.raises(ValueError, match="attention_trunk"):
        W.replicate_into_abe({"trunk": params["trunk"]}, trunk)
    bad = dict(trunk, inception_4a={"kernel": np.zeros((1, 1, 1, 1), np.float32),
                                    "bias": trunk["inception_4a"]["bias"]})
    with pytest.raises(ValueError, match="inception_4a/kernel: shape"):
        W.replicate_into_abe(params, bad)
    with pytest.raises(ValueError, match="missing conv1"):
        W.replicate_into_abe(params, {k: v for k, v in trunk.items() if k != "conv1"})


def test_bvlc_masks_in_open_unit_interval_on_a_small_input():
    """related-methods.md §3.6 (iii) on the BVLC trunk itself: a 67 px forward (4 x 4 pool3 map)."""
    model = ABE(num_learners=2, embedding_dim=4, backbone="bvlc")
    x = _images(1, size=67, seed=4, scale=50.0)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(5)
    # Caffe-Xavier-like scale, without compiling the initialisers
    params = jax.tree.map(lambda s: rng.uniform(-1, 1, s.shape).astype(np.float32)
                          * np.float32(np.sqrt(3.0 / max(np.prod(s.shape[:-1]), 1))),
                          shapes["params"])
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, return_masks=True))(params, x)
    masks = np.asarray(out["masks"])
    assert masks.shape == (2, 1, 4, 4, 480)
    assert (masks > 0).all() and (masks < 1).all() and masks.std() > 1e-3
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["embedding"]), axis=1),
                               np.sqrt(2.0), rtol=1e-5)
