"""Tests that pin *where* DeML takes each input (docs/reference.md §3.3-§3.5, §4, §5.3).

Each test rebuilds the quantity from separately computed pieces (the trunk
module run by itself, the CAM written in NumPy, a float64 NumPy random walk,
OpenCV crops, a torch BVLC forward) instead of reading it back from the
model's own wiring, so moving the OAM to learner 2, cropping the original
image in branch 3, feeding learner 2 to the activation loss or moving the CAM
away from ``inception_4b`` makes one of them fail.
"""

import glob
import importlib.util
import os

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from deml_jax.models import DeML
from deml_jax.models.deml import build_model
from deml_jax.models.tiny import TinyNet
from deml_jax.ops import proposal_crop_host as host

MEAN = np.array([123.0, 117.0, 104.0], np.float32)  # released means on (B, G, R), §2.3
SIZE = 56  # the tiny trunk's inception_5b is 7 x 7 at 56 px
RELEASED_OAM_STEPS = 10  # §4 step 4: exactly 10 iterations from uniform
RELEASED_SIGMA_RATIO = 0.15  # §4 step 2: eps = 0.15 n
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def numpy_walk(feat, steps=RELEASED_OAM_STEPS, sigma_ratio=RELEASED_SIGMA_RATIO):
    """§4 steps 2-4 in float64: L2 feature distance x spatial Gaussian, column
    normalisation, ``steps`` products from the uniform vector."""
    h, w, c = feat.shape
    f = np.asarray(feat, np.float64).reshape(h * w, c)
    dist = np.sqrt(np.maximum(((f[:, None] - f[None]) ** 2).sum(-1), 0))
    r, col = np.divmod(np.arange(h * w), w)
    eps = sigma_ratio * h
    d = dist * np.exp(-((r[:, None] - r[None]) ** 2 + (col[:, None] - col[None]) ** 2)
                      / (2 * eps * eps))
    p = d / d.sum(axis=0, keepdims=True)
    m = np.full(h * w, 1.0 / (h * w))
    for _ in range(steps):
        m = p @ m
    return m.reshape(h, w)


def numpy_cam(h, cam):
    """The released CAM (§3.3) in NumPy: sigmoid(conv1x1(relu(conv1x1(h)))) * h."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), cam)
    c, k = p["reduce"]["kernel"].shape[-2:]
    u = np.maximum(h @ p["reduce"]["kernel"].reshape(c, k) + p["reduce"]["bias"], 0)
    a = 1 / (1 + np.exp(-(u @ p["expand"]["kernel"].reshape(k, c) + p["expand"]["bias"])))
    return a * h


def branch_reference(branch_params, images, learner):
    """One learner's ``inception_5b`` map and pooled features, computed by running
    the trunk module by itself around a NumPy CAM (no DeML wiring involved)."""
    trunk = TinyNet()
    tp = {"params": branch_params["trunk"]}
    h, _ = trunk.apply(tp, images, stop="inception_4b")
    masked = numpy_cam(np.asarray(h, np.float64), branch_params[f"cam_{learner}"])
    _, inter = trunk.apply(tp, jnp.asarray(masked, jnp.float32), start="inception_4b",
                           stop="pool5")
    feat5b = np.asarray(inter["inception_5b"], np.float64)
    return feat5b, feat5b.mean(axis=(1, 2))


def pixel_images(batch, size, seed):
    """Mean-subtracted images made of integer BGR pixels with an object-like blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs = rng.integers(0, 60, (batch, size, size, 3)).astype(np.float32)
    for b in range(batch):
        cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.12 * size) ** 2))
        imgs[b] += np.round(190 * blob)[..., None] * rng.uniform(0.5, 1.0, 3)
    return jnp.asarray(np.clip(np.round(imgs), 0, 255) - MEAN)


def make_learners_differ(params):
    """Learner 2's CAM switches off most channels, so its maps are far from learner 1's."""
    params = jax.tree.map(np.array, params)
    for b in params:
        if "cam_1" in params[b]:
            bias = params[b]["cam_1"]["expand"]["bias"]
            bias[: (3 * bias.shape[0]) // 4] = -8.0
    return jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def tiny_chain():
    """DeML(3, 2) with the tiny trunk; learners of every branch made to differ."""
    model = DeML(3, 2, 8, backbone="tiny")
    x = pixel_images(3, SIZE, seed=0)
    params = random_params(model, x, seed=3)
    return model, params, x, run(model, params, x)


_COMPILED = {}


def run(model, params, x):
    """``model.apply(train=True)`` outputs as NumPy; one compilation per distinct model."""
    if model not in _COMPILED:
        _COMPILED[model] = jax.jit(lambda p, x: model.apply({"params": p}, x, train=True))
    return jax.tree.map(np.asarray, _COMPILED[model](params, x))


def random_params(model, x, seed):
    """Parameters of ``model`` drawn in NumPy from the shapes alone (no compiled init):
    Caffe-Xavier-like kernels and nonzero biases; learner 2's CAM made to differ."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])["params"]

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            lim = np.sqrt(3.0 / np.prod(s.shape[:-1]))
            return rng.uniform(-lim, lim, s.shape).astype(np.float32)
        return rng.uniform(-0.1, 0.1, s.shape).astype(np.float32)

    return make_learners_differ(jax.tree_util.tree_map_with_path(draw, shapes))


def test_random_walk_reads_learner_1_inception_5b(tiny_chain):
    """§3.5: branch b's OAM walks over *learner 1's* ``inception_5b`` map (§4)."""
    _, params, x, out = tiny_chain
    for b, images in ((0, x), (1, jnp.asarray(out["crops"][0]))):
        feat1, _ = branch_reference(params[f"branch_{b}"], images, learner=0)
        feat2, _ = branch_reference(params[f"branch_{b}"], images, learner=1)
        want = np.stack([numpy_walk(f) for f in feat1])
        other = np.stack([numpy_walk(f) for f in feat2])
        got = out["attention"][b]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        # The test can fail: learner 2's map is far outside that tolerance.
        assert np.max(np.abs(other - want) / want) > 1e-2
        for n in range(x.shape[0]):
            box, _ = host.attention_box(want[n].astype(np.float32), SIZE)
            np.testing.assert_array_equal(out["boxes"][b, n], box)


def cv2_zoom(image, box, out_size):
    """Caffe's crop (§4 steps 1, 10) with OpenCV: (uchar)(x + mean), crop, resize, - mean."""
    pixels = np.clip(np.asarray(image) + MEAN, 0, 255).astype(np.uint8)
    y0, x0, y1, x1 = (int(v) for v in box)
    zoom = cv2.resize(pixels[y0:y1, x0:x1], (out_size, out_size),
                      interpolation=cv2.INTER_LINEAR)
    return zoom.astype(np.float32) - MEAN


def test_branch_i_plus_1_zooms_branch_i_input(tiny_chain):
    """§3.5: crop2 = ProposalCrop(crop1, ...): branch 3 sees a zoom of branch 2's
    input, not of the original image."""
    _, _, x, out = tiny_chain
    boxes = out["boxes"]
    assert (boxes[..., 2:] - boxes[..., :2] < SIZE).any(axis=-1).all(), boxes  # real zooms
    for n in range(x.shape[0]):
        np.testing.assert_array_equal(out["crops"][0, n], cv2_zoom(x[n], boxes[0, n], SIZE))
        np.testing.assert_array_equal(out["crops"][1, n],
                                      cv2_zoom(out["crops"][0, n], boxes[1, n], SIZE))
        wrong = cv2_zoom(x[n], boxes[1, n], SIZE)
        assert np.abs(wrong - out["crops"][1, n]).max() > 10  # the test can fail


def test_activation_input_is_learner_1_pooled_features_without_trunk_gradient(tiny_chain):
    """§5.3: fc_embedding_a = W_b stop_grad(p_b1): learner 1's pooled features
    through the branch's shared W_b, and no gradient into the trunk or CAMs."""
    model, params, x, out = tiny_chain
    inputs = (x, jnp.asarray(out["crops"][0]), jnp.asarray(out["crops"][1]))
    for b in range(3):
        bp = params[f"branch_{b}"]
        w = np.asarray(bp["embed"]["kernel"], np.float64)
        _, pooled1 = branch_reference(bp, inputs[b], learner=0)
        _, pooled2 = branch_reference(bp, inputs[b], learner=1)
        np.testing.assert_allclose(out["act"][b], pooled1 @ w, rtol=1e-4, atol=1e-5)
        assert np.abs(pooled2 @ w - pooled1 @ w).max() > 1e-2 * np.abs(pooled1 @ w).max()

    def act_energy(p):
        return jnp.sum(model.apply({"params": p}, x, train=True)["act"] ** 2)

    grads = jax.jit(jax.grad(act_energy))(params)
    for b in range(3):
        g = grads[f"branch_{b}"]
        for name, sub in g.items():
            total = sum(float(np.abs(np.asarray(v)).sum()) for v in jax.tree.leaves(sub))
            if name == "embed":
                assert total > 0
            else:
                assert total == 0.0, (b, name)


# ----------------------------------------------- oam_steps of every benchmark config

def benchmark_configs():
    """configs/<benchmark>_<method>.py of every DeML row with more than one branch."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*_deml*.py"))):
        name = os.path.basename(path)[:-3]
        if name.split("_")[0] not in ("cub200", "cars196", "sop", "inshop"):
            continue
        spec = importlib.util.spec_from_file_location(f"_pin_cfg_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out.append((name, module.get_config()))
    assert len(out) >= 8, [n for n, _ in out]
    return out


def test_every_benchmark_config_walks_exactly_10_steps(tiny_chain):
    """The model built from each benchmark config's model section runs the
    released 10-step walk (§4 step 4): a NumPy walk with exactly 10 steps is
    the reference, so a change of ``model.oam_steps`` in the configs *and* the
    model default fails here or in the constants table (test_released_constants).
    Only the trunk size is shrunk (tiny trunk, J = 2, 8-d); a config whose
    model equals the fixture's reuses its compiled forward."""
    fixture_model, fixture_params, fixture_x, fixture_out = tiny_chain
    seen = {}
    for name, cfg in benchmark_configs():
        m = ml_collections.ConfigDict(cfg.model.to_dict())
        m.update(backbone="tiny", num_branches=3, num_learners=2, embedding_dim=8,
                 dtype="float32")
        model = build_model(m, mean_bgr=tuple(cfg.dataset.mean_bgr))
        if model not in seen:
            if model == fixture_model:
                params, x, out = fixture_params, fixture_x, fixture_out
            else:
                x = fixture_x
                params = random_params(model, x, seed=3)
                out = run(model, params, x)
            feat1, _ = branch_reference(params["branch_0"], x, learner=0)
            got = out["attention"][0]
            seen[model] = {
                s: float(np.max(np.abs(got - np.stack([numpy_walk(f, s) for f in feat1]))))
                for s in (RELEASED_OAM_STEPS - 1, RELEASED_OAM_STEPS, RELEASED_OAM_STEPS + 1)}
        errs = seen[model]
        assert errs[RELEASED_OAM_STEPS] < 1e-6, (name, model.oam_steps, errs)
        # 9 or 11 steps would be told apart (the reference is sharp enough).
        assert min(errs[RELEASED_OAM_STEPS - 1], errs[RELEASED_OAM_STEPS + 1]) > 1e-5, errs
