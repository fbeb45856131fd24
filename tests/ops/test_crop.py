"""Device box/crop vs OpenCV and hand-worked cases; the exact host ProposalCrop path.

References: cv2 itself, hand-worked boxes, loops (docs/reference.md §4).
"""

import chex
import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deml_jax.ops import proposal_crop_host as host
from deml_jax.ops.crop import (attention_boxes, crop_and_resize, crop_and_resize_uint8,
                               object_attention_crop, squarify_box, upsample_like_cv2)
from deml_jax.ops.regions import connected_components, largest_region_bbox
from deml_jax.ops.random_walk import random_walk_attention

MEAN = np.array([123.0, 117.0, 104.0], np.float32)
boxes_jit = jax.jit(attention_boxes, static_argnums=1, static_argnames="largest_component")


def blob_features(rng, batch, n=7, channels=32):
    """ReLU feature maps with one or two Gaussian 'object' blobs (docs/reference.md §12)."""
    feats = np.maximum(rng.normal(0.0, 0.5, (batch, n, n, channels)), 0)
    yy, xx = np.mgrid[:n, :n]
    for b in range(batch):
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(0, n - 1, 2)
            sigma = rng.uniform(0.7, 2.0)
            bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
            feats[b] += bump[..., None] * rng.uniform(0, 3, channels)
    return feats.astype(np.float32)


def iou(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return inter / (area(a) + area(b) - inter)


# ------------------------------------------------------------------ box steps

@pytest.mark.parametrize("h,w,size", [(7, 7, 227), (7, 7, 224), (14, 14, 227), (6, 8, 100),
                                      (5, 5, 5)])
def test_upsample_is_bit_exact_with_cv2(h, w, size):
    rng = np.random.default_rng(h * w + size)
    maps = rng.integers(0, 256, (6, h, w)).astype(np.uint8)
    got = np.asarray(upsample_like_cv2(jnp.asarray(maps, jnp.int32), size))
    want = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR) for m in maps])
    np.testing.assert_array_equal(got, want)


def snake(size):
    """A one-pixel-wide serpentine path plus isolated diagonal-touching pixels."""
    img = np.zeros((size, size), bool)
    img[::4, 1:-1] = True
    for k, r in enumerate(range(0, size - 4, 4)):
        img[r:r + 5, size - 2 if k % 2 == 0 else 1] = True
    img[size - 1, 0] = img[size - 2, 1] = True  # diagonal neighbours only: one more component
    return img


def test_connected_components_match_cv2():
    rng = np.random.default_rng(5)
    smooth = [cv2.GaussianBlur(rng.normal(size=(48, 48)), (0, 0), 2.5) for _ in range(5)]
    masks = np.stack([m > np.quantile(m, 0.6) for m in smooth] + [snake(48)])
    labels = np.asarray(jax.jit(connected_components)(jnp.asarray(masks)))
    for mask, ours in zip(masks, labels):
        count, ref = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        pairs = set(zip(ref[mask].tolist(), ours[mask].tolist()))
        # The two labellings are the same partition of the foreground.
        assert len(pairs) == count - 1 == len({p[0] for p in pairs}) == len({p[1] for p in pairs})
        assert np.all(ours[~mask] == mask.size)
    # The snake (needs many propagation steps) and the diagonal pair: 2 components + background.
    assert cv2.connectedComponents(masks[-1].astype(np.uint8), connectivity=8)[0] == 3


@pytest.mark.parametrize("max_runs", [8, 1])
def test_largest_region_bbox_matches_cv2(max_runs):
    """max_runs=8: the run-graph path; 1: rows with 2+ runs force pixel label propagation.
    Reference: the stats of cv2's largest 8-connected component."""
    rng = np.random.default_rng(8)
    masks = np.stack([cv2.GaussianBlur(rng.normal(size=(40, 40)), (0, 0), rng.uniform(1.0, 4.0))
                      > rng.uniform(0.0, 0.3) for _ in range(100)])
    left = np.pad(masks[:, :, :-1], ((0, 0), (0, 0), (1, 0)))
    assert 1 < np.max(np.sum(masks & ~left, axis=2)) <= 8
    bbox = jax.jit(largest_region_bbox, static_argnums=(1, 2))
    y, x, h, w, found = (np.asarray(v) for v in bbox(jnp.asarray(masks), True, max_runs))
    for i, mask in enumerate(masks):
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                              connectivity=8)
        assert found[i] == (count > 1)
        if count > 1:
            cx, cy, cw, ch, _ = stats[1 + np.argmax(stats[1:, 4])]
            assert (y[i], x[i], h[i], w[i]) == (cy, cx, ch, cw)


# (x, y, w, h, S) -> (y0, x0, y1, x1), worked by hand from §4 step 9.
SQUARE_CASES = [
    ((10, 20, 30, 10, 227), (15, 15, 35, 35)),   # (w-h)/4 = 5, s = 20
    ((0, 0, 12, 10, 227), (0, 0, 11, 11)),       # +-0.5 -> 0 (half to even), s = 11
    ((50, 50, 16, 10, 227), (48, 52, 61, 65)),   # +-1.5 -> +-2, s = 13
    ((10, 10, 5, 2, 227), (9, 11, 13, 15)),      # +-0.75 -> +-1, s = 3.5 -> 4
    ((10, 10, 7, 2, 227), (9, 11, 13, 15)),      # +-1.25 -> +-1, s = 4.5 -> 4
    ((10, 10, 9, 2, 227), (8, 12, 14, 18)),      # +-1.75 -> +-2, s = 5.5 -> 6 (even)
    ((0, 0, 100, 20, 64), (0, 20, 40, 64)),      # clipped: y' = -20, x' + s = 80
    ((200, 210, 27, 17, 227), (208, 202, 227, 224)),  # +-2.5 -> +-2, s = 22, y1 clipped at 227
]


@pytest.mark.parametrize("rect,want", SQUARE_CASES)
def test_squarify_hand_cases(rect, want):
    x, y, w, h, size = rect
    got = squarify_box(jnp.array([y]), jnp.array([x]), jnp.array([h]), jnp.array([w]), size)
    np.testing.assert_array_equal(np.asarray(got)[0], want)
    assert host.square_box(x, y, w, h, size) == want


def two_block_map():
    """7x7 map: a 3x4 block (rows 0-2, cols 0-3) and a separate 2x2 block (rows 5-6, cols 5-6)."""
    m = np.full((7, 7), 0.01, np.float32)
    m[0:3, 0:4] = 0.05
    m[5:7, 5:7] = 0.05
    return m


def test_host_box_hand_case():
    """At S = 7 the resize is the identity: a8 = 255 on both blocks, mean 83.3 -> both are
    foreground; the larger block's rect is x=0, y=0, w=4, h=3 -> x' = 0 + R(0.25) = 0,
    y' = 0 + R(-0.25) = 0, s = R(3.5) = 4 -> (0, 0, 4, 4)."""
    box, parts = host.attention_box(two_block_map(), 7)
    assert parts["rect"] == (0, 0, 4, 3)
    assert box == (0, 0, 4, 4)
    np.testing.assert_array_equal(parts["a8"][0, 0], 255)


def test_device_box_hand_case():
    got = boxes_jit(jnp.asarray(two_block_map())[None], 7)
    np.testing.assert_array_equal(np.asarray(got), [[0, 0, 4, 4]])
    # The bounding box of *all* foreground would span both blocks instead.
    everything = boxes_jit(jnp.asarray(two_block_map())[None], 7, largest_component=False)
    np.testing.assert_array_equal(np.asarray(everything), [[0, 0, 7, 7]])


def test_degenerate_map_gives_whole_image():
    flat = jnp.full((2, 7, 7), 1 / 49, jnp.float32)
    np.testing.assert_array_equal(np.asarray(boxes_jit(flat, 227)), [[0, 0, 227, 227]] * 2)
    assert host.attention_box(np.asarray(flat[0]), 227)[0] == (0, 0, 227, 227)


def test_host_constant_features_crop_whole_image_with_truncation():
    """Constant features -> uniform map -> no foreground -> whole-image box; with
    out_size = S the resize is the identity, so the crop is (uchar)(x + mean) - mean."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 16, 3)).astype(np.float32)
    image = pixels + rng.uniform(0.0, 0.99, pixels.shape).astype(np.float32) - MEAN
    crop, attention, box = host.proposal_crop(image, np.ones((7, 7, 8), np.float32), 16)
    np.testing.assert_array_equal(box, [0, 0, 16, 16])
    np.testing.assert_array_equal(attention, np.full((7, 7), 1 / 49, np.float32))
    np.testing.assert_array_equal(crop, pixels - MEAN)


def test_host_walk_map_matches_float64_loop():
    """Caffe's graph (§4 steps 2-4) written out with loops, float64, on one 4x4 map."""
    rng = np.random.default_rng(1)
    feat = np.maximum(rng.normal(size=(4, 4, 6)), 0).astype(np.float32)
    n, eps = 16, 0.15 * 4
    d = np.zeros((n, n))
    for q in range(n):
        for p in range(n):
            diff = feat.reshape(n, 6)[q].astype(float) - feat.reshape(n, 6)[p]
            grid = (q // 4 - p // 4) ** 2 + (q % 4 - p % 4) ** 2
            d[q, p] = np.sqrt(np.sum(diff ** 2)) * np.exp(-grid / (2 * eps ** 2))
    m = np.full(n, 1 / n)
    for _ in range(10):
        m = (d / d.sum(axis=0, keepdims=True)) @ m
    chex.assert_trees_all_close(host.walk_map(feat), m.reshape(4, 4).astype(np.float32),
                                rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ crop

def random_boxes(rng, batch, size):
    boxes = []
    for _ in range(batch):
        y0, y1 = np.sort(rng.choice(size + 1, 2, replace=False))
        x0, x1 = np.sort(rng.choice(size + 1, 2, replace=False))
        boxes.append((y0, x0, y1, x1))
    boxes[:4] = [(0, 0, size, size), (3, 10, 40, 11), (5, 5, 6, 6), (0, 2, 1, size - 4)]
    return np.asarray(boxes, np.int32)


@pytest.mark.parametrize("out_size,impl", [(24, "matmul"), (64, "gather"), (150, "matmul"),
                                           (150, "gather")])
def test_crop_and_resize_matches_cv2_float(out_size, impl):
    rng = np.random.default_rng(out_size)
    size, batch = 64, 40
    images = rng.uniform(-128, 128, (batch, size, size, 3)).astype(np.float32)
    boxes = random_boxes(rng, batch, size)
    crop = jax.jit(crop_and_resize, static_argnums=2, static_argnames="impl")
    got = np.asarray(crop(images, boxes, out_size, impl=impl))
    want = np.stack([cv2.resize(img[y0:y1, x0:x1], (out_size, out_size),
                                interpolation=cv2.INTER_LINEAR)
                     for img, (y0, x0, y1, x1) in zip(images, boxes)])
    # cv2 takes the fraction in double for 2-D images but float32 for 1-pixel spans.
    chex.assert_trees_all_close(got, want, atol=5e-4, rtol=0)


@pytest.mark.parametrize("out_size", [227, 90])
def test_uint8_crop_is_bit_exact_with_cv2(out_size):
    """Caffe's crop (§4 steps 1, 10): (uchar)(x + mean), cv2 uint8 resize, minus mean."""
    rng = np.random.default_rng(out_size + 1)
    size, batch = 227, 24
    pixels = rng.integers(0, 256, (batch, size, size, 3)).astype(np.uint8)
    fraction = rng.uniform(0, 0.99, pixels.shape).astype(np.float32)  # truncated by the rebuild
    images = pixels.astype(np.float32) - MEAN + fraction
    boxes = random_boxes(rng, batch, size)
    got = np.asarray(jax.jit(crop_and_resize_uint8, static_argnums=2)(images, boxes, out_size))
    want = np.stack([cv2.resize(p[y0:y1, x0:x1], (out_size, out_size),
                                interpolation=cv2.INTER_LINEAR).astype(np.float32) - MEAN
                     for p, (y0, x0, y1, x1) in zip(pixels, boxes)])
    np.testing.assert_array_equal(got, want)


def test_crop_identity_for_full_box_at_same_size():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(2, 20, 20, 3)).astype(np.float32)
    got = crop_and_resize(images, np.array([[0, 0, 20, 20]] * 2), 20)
    chex.assert_trees_all_close(got, images, atol=1e-5)


# ------------------------------------------------------------------ device vs host

def test_device_boxes_agree_with_host_opencv_path():
    rng = np.random.default_rng(7)
    feats = blob_features(rng, 100)
    device_fn = jax.jit(lambda f: attention_boxes(random_walk_attention(f), 227))
    device = np.asarray(device_fn(feats))
    host_boxes = [host.attention_box(host.walk_map(f), 227)[0] for f in feats]
    # As strict as the README's claim: every box is identical, not just IoU >= 0.9.
    differ = [(i, tuple(d), h, iou(d, h)) for i, (d, h) in enumerate(zip(device, host_boxes))
              if tuple(d) != tuple(h)]
    assert not differ, f"{len(differ)}/100 device boxes differ from OpenCV's: {differ[:5]}"
    # Same map into both box stages: the OpenCV emulation (upsample, threshold,
    # largest 8-connected region, squarify) agrees on every box.
    same_map = np.asarray(jax.jit(lambda m: attention_boxes(m, 227))(
        np.stack([host.walk_map(f) for f in feats])))
    differ = [i for i, (d, h) in enumerate(zip(same_map, host_boxes)) if tuple(d) != tuple(h)]
    assert not differ, f"boxes from the same map differ at {differ}"


# ------------------------------------------------------------------ the module

@pytest.fixture(scope="module")
def oam_inputs():
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (3, 64, 64, 3)).astype(np.float32) - MEAN
    return jnp.asarray(images), jnp.asarray(blob_features(rng, 3))


@pytest.mark.parametrize("method", ["device", "host"])
def test_gradient_through_oam_is_exactly_zero(oam_inputs, method):
    images, feats = oam_inputs

    def loss(x, f):
        out = object_attention_crop(x, f, out_size=32, method=method)
        return jnp.sum(out["crops"]) + jnp.sum(out["attention"])

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(images, feats)
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_host_method_under_jit_equals_numpy_path(oam_inputs):
    images, feats = oam_inputs
    hosted = jax.jit(lambda x, f: object_attention_crop(x, f, out_size=32, method="host"))
    out = hosted(images, feats)
    crops, maps, boxes = host.proposal_crop_batch(np.asarray(images), np.asarray(feats), 32)
    np.testing.assert_array_equal(np.asarray(out["boxes"]), boxes)
    np.testing.assert_array_equal(np.asarray(out["crops"]), crops)
    np.testing.assert_array_equal(np.asarray(out["attention"]), maps)


def test_device_method_shapes_and_crop_close_to_host(oam_inputs):
    images, feats = oam_inputs
    out = jax.jit(lambda x, f: object_attention_crop(x, f, out_size=32))(images, feats)
    chex.assert_shape(out["crops"], (3, 32, 32, 3))
    chex.assert_shape(out["attention"], (3, 7, 7))
    assert out["boxes"].dtype == jnp.int32
    crops, _, boxes = host.proposal_crop_batch(np.asarray(images), np.asarray(feats), 32)
    same = np.all(np.asarray(out["boxes"]) == boxes, axis=1)
    assert same.sum() >= 2
    np.testing.assert_array_equal(np.asarray(out["crops"])[same], crops[same])
    # pixels='float' skips Caffe's uint8 rounding of the resized pixels.
    floats = jax.jit(lambda x, f: object_attention_crop(x, f, out_size=32, pixels="float"))(
        images, feats)
    chex.assert_trees_all_close(np.asarray(floats["crops"])[same], crops[same], atol=1.0, rtol=0)


def test_bad_arguments_raise(oam_inputs):
    images, feats = oam_inputs
    with pytest.raises(ValueError, match="method"):
        object_attention_crop(images, feats, method="gpu")
    with pytest.raises(ValueError, match="pixels"):
        object_attention_crop(images, feats, pixels="int4")
    with pytest.raises(ValueError, match="square"):
        object_attention_crop(images[:, :, :60], feats)
    with pytest.raises(ValueError, match="features"):
        object_attention_crop(images, feats[0])
    with pytest.raises(ValueError, match="attention"):
        attention_boxes(jnp.zeros((7, 7)), 227)
    with pytest.raises(ValueError, match="impl"):
        crop_and_resize(images, jnp.zeros((3, 4), jnp.int32), 8, impl="fft")
    with pytest.raises(ValueError, match="boxes"):
        crop_and_resize(images, jnp.zeros((2, 4), jnp.int32), 8)
