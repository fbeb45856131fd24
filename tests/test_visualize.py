"""PNG pictures: written, sane sizes, the right frame colours, mean undone."""
import chex
import numpy as np
import pytest
from PIL import Image

from deml_jax.visualize import WRONG, RIGHT, attention_figure, retrieval_grid, to_rgb_uint8

MEAN = (123.0, 117.0, 104.0)  # docs/reference.md §2.3, (B, G, R)


def _colour_pixels(png, hex_colour, tol=12):
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).max(-1) <= tol).sum())


def test_to_rgb_uint8_undoes_mean_and_bgr():
    bgr = np.array([[[10.0, 20.0, 30.0]]])  # B, G, R after mean subtraction
    chex.assert_trees_all_equal(to_rgb_uint8(bgr, MEAN),
                                np.array([[[134, 137, 133]]], np.uint8))  # R, G, B
    assert to_rgb_uint8(np.full((2, 2, 3), 500.0), (0, 0, 0)).max() == 255  # clipped


def test_retrieval_grid_frames_right_and_wrong(tmp_path):
    rng = np.random.default_rng(0)
    # grey pictures (R = G = B after the mean is undone) cannot look like a frame
    grey = rng.uniform(0, 255, (5, 16, 16, 1)).astype(np.float32)
    imgs = np.repeat(grey, 3, -1) - np.array(MEAN, np.float32)
    labels = np.array([0, 0, 1, 1, 2])
    nbrs = np.array([[1, 2, -1], [0, 4, 3]])  # query 0: right, wrong, blank
    path = retrieval_grid(imgs[:2], imgs, nbrs, labels[:2], labels, str(tmp_path / "g/grid.png"),
                          k=3, mean_bgr=MEAN)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
    assert _colour_pixels(path, RIGHT) > 100 and _colour_pixels(path, WRONG) > 100
    # all neighbours right: no red frame at all
    ok = retrieval_grid(imgs[:1], imgs, np.array([[1]]), labels[:1], labels,
                        str(tmp_path / "ok.png"), k=1, mean_bgr=MEAN)
    assert _colour_pixels(ok, WRONG) == 0
    with pytest.raises(ValueError, match="neighbours"):
        retrieval_grid(imgs[:2], imgs, nbrs[:, :1], labels[:2], labels, str(tmp_path / "x.png"),
                       k=3)


def test_attention_figure(tmp_path):
    img = np.zeros((64, 64, 3), np.float32)
    amap = np.zeros((7, 7), np.float32)
    amap[3, 3] = 1.0
    zoomed = [np.zeros((32, 32, 3), np.float32)] * 2
    path = attention_figure(img, amap, (8, 8, 40, 40), zoomed, str(tmp_path / "a.png"),
                            mean_bgr=MEAN, title="t")
    with Image.open(path) as im:
        w, h = im.size
    assert w > 3 * h  # image, heat map and two zoomed inputs side by side
    assert _colour_pixels(path, "#ffff00", tol=30) > 50  # the yellow box
    with pytest.raises(ValueError, match="attention_map"):
        attention_figure(img, amap[0], (0, 0, 1, 1), [], str(tmp_path / "b.png"))
    with pytest.raises(ValueError, match="box"):
        attention_figure(img, amap, (0, 0, 1), [], str(tmp_path / "b.png"))
