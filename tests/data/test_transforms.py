"""Transforms against NumPy/PIL references of the released crop, mirror, mean."""

import itertools

import chex
import numpy as np
import pytest
from PIL import Image

from deml_jax.data import transforms as T


def rand_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def pil_crop(img, h_off, w_off, crop, mirror):
    """Reference crop/mirror with PIL, mean subtraction by hand (B-123 ...)."""
    pil = Image.fromarray(img).crop((w_off, h_off, w_off + crop, h_off + crop))
    if mirror:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = np.asarray(pil).astype(np.float32)
    out[..., 0] -= 123.0  # B (released means, docs/reference.md §2.3)
    out[..., 1] -= 117.0  # G
    out[..., 2] -= 104.0  # R
    return out


def test_released_mean_constant():
    assert T.CAFFE_MEAN_BGR == (123.0, 117.0, 104.0)


def test_caffe_eval_centre_crop_256_to_227():
    img = rand_image(256, 256)
    out = T.caffe_eval(img)
    assert out.dtype == np.float32 and out.shape == (227, 227, 3)
    chex.assert_trees_all_close(out, pil_crop(img, 14, 14, 227, False))  # (256-227)//2


def test_caffe_eval_rectangular():
    img = rand_image(20, 31, 1)
    chex.assert_trees_all_close(T.caffe_eval(img, crop=9), pil_crop(img, 5, 11, 9, False))


def test_caffe_train_offsets_and_mirror_statistics():
    h, w, crop = 12, 14, 9  # offsets 0..3 x 0..5
    img = rand_image(h, w, 2)
    refs = {
        (a, b, m): pil_crop(img, a, b, crop, m)
        for a, b, m in itertools.product(range(h - crop + 1), range(w - crop + 1), (False, True))
    }
    rng = np.random.default_rng(0)
    hits = {}
    n = 1200
    for _ in range(n):
        out = T.caffe_train(img, rng, crop=crop)
        match = [k for k, r in refs.items() if np.array_equal(out, r)]
        assert len(match) == 1, 'output is not a valid crop/mirror/mean of the input'
        hits[match[0]] = hits.get(match[0], 0) + 1
    assert {(a, b) for a, b, _ in hits} == {(a, b) for a, b, _ in refs}  # full range
    mirrored = sum(v for (_, _, m), v in hits.items() if m)
    assert abs(mirrored - n / 2) < 4 * np.sqrt(n / 4)  # p = 1/2, 4 sigma
    rows = np.bincount([a for (a, _, _), v in hits.items() for _ in range(v)])
    assert rows.min() > n / 4 * 0.7  # uniform over offsets


def test_caffe_train_no_mirror_option():
    img = rand_image(10, 10, 3)
    rng = np.random.default_rng(0)
    for _ in range(50):
        out = T.caffe_train(img, rng, crop=10, mirror=False)
        chex.assert_trees_all_close(out, pil_crop(img, 0, 0, 10, False))


def test_small_image_enlarged_to_crop():
    img = rand_image(100, 150)
    before = T.SMALL_IMAGE_COUNT['enlarged']
    assert T.caffe_train(img, np.random.default_rng(0)).shape == (227, 227, 3)
    assert T.caffe_eval(img).shape == (227, 227, 3)
    assert T.SMALL_IMAGE_COUNT['enlarged'] == before + 2


def test_modern_normalisation_and_rgb_order():
    img = np.empty((40, 50, 3), np.uint8)
    img[...] = (10, 20, 30)  # B, G, R
    ref = (np.array([30, 20, 10]) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225]
    )
    out = T.modern_train(img, np.random.default_rng(0), size=16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    chex.assert_trees_all_close(out, np.broadcast_to(ref, out.shape).astype(np.float32), atol=1e-5)
    chex.assert_trees_all_close(
        T.modern_eval(img, resize=32, size=24),
        np.broadcast_to(ref, (24, 24, 3)).astype(np.float32),
        atol=1e-5,
    )


def test_modern_eval_centre_crop_reference():
    img = rand_image(256, 300, 4)  # short side already 256: resize is identity
    rgb = img[16:240, 38:262, ::-1].astype(np.float64) / 255.0
    ref = (rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    chex.assert_trees_all_close(T.modern_eval(img), ref.astype(np.float32), atol=1e-5)


def test_random_resized_box_ranges():
    rng = np.random.default_rng(0)
    for h, w in [(256, 256), (100, 300), (300, 90)]:
        for _ in range(300):
            y0, x0, ch, cw = T.random_resized_box(h, w, rng)
            assert 0 <= y0 and y0 + ch <= h and 0 <= x0 and x0 + cw <= w
            assert ch > 0 and cw > 0
            frac = ch * cw / (h * w)
            if (ch, cw) != (h, w):  # sampled boxes (fallback is the full image)
                assert 0.16 * 0.9 <= frac <= 1.0
                assert 3 / 4 * 0.9 <= cw / ch <= 4 / 3 * 1.1


@pytest.mark.parametrize(
    'bad', [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), [[1, 2]]]
)
def test_bad_input_raises(bad):
    with pytest.raises(ValueError, match='uint8'):
        T.caffe_eval(bad, crop=4)
