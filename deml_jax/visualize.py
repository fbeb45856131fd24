"""Pictures (PNG): retrieval grids and per-image attention figures.

Images follow the repo convention (CONTRIBUTING.md): float [H, W, 3], BGR,
mean-subtracted with ``mean_bgr`` (docs/reference.md §2.3); pass
``mean_bgr=(0, 0, 0)`` for raw BGR pixels in [0, 255].  Drawn with
matplotlib's object API (Figure + Agg canvas): no pyplot global state, safe in
a training process.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from deml_jax.data.transforms import CAFFE_MEAN_BGR

RIGHT, WRONG, QUERY = "#1a9850", "#d73027", "#3060d0"  # border colours
BORDER_WIDTH = 4.0  # points
DEFAULT_DPI = 100


def to_rgb_uint8(image, mean_bgr: Sequence[float] = CAFFE_MEAN_BGR) -> np.ndarray:
    """Undoes the mean subtraction and the BGR order.

    Args:
      image: float [H, W, 3] BGR mean-subtracted (or [H, W] grey).
    Returns:
      uint8 [H, W, 3] RGB.
    """
    img = np.asarray(image, np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] (or [H, W]), got shape {img.shape}")
    img = img + np.asarray(mean_bgr, np.float32)
    return np.clip(np.rint(img[..., ::-1]), 0, 255).astype(np.uint8)


def _save(fig: Figure, path: str, dpi: int) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _framed(ax, img: np.ndarray, colour: str, title: str) -> None:
    ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(BORDER_WIDTH)
    ax.set_title(title, fontsize=8, color=colour)


def retrieval_grid(query_images, gallery_images, neighbours, query_labels, gallery_labels,
                   path: str, k: int = 8, *, mean_bgr: Sequence[float] = CAFFE_MEAN_BGR,
                   cell_inches: float = 1.3, dpi: int = DEFAULT_DPI) -> str:
    """One row per query: the query (blue frame), then its k nearest gallery
    images framed green (same label) or red (other label).

    Args:
      query_images: float [Q, H, W, 3]; gallery_images: float [N, H', W', 3]
        (may be the same array in self mode), convention of the module.
      neighbours: int [Q, >= k] gallery indices nearest first (knn_search's
        'indices'; -1 = no neighbour, left blank).
      query_labels: int [Q]; gallery_labels: int [N].
      path: PNG file to write (parent directories are created).
    Returns:
      path.
    """
    neighbours = np.asarray(neighbours)
    q_lab, g_lab = np.asarray(query_labels), np.asarray(gallery_labels)
    n_q = len(query_images)
    if neighbours.ndim != 2 or neighbours.shape[0] != n_q or neighbours.shape[1] < k:
        raise ValueError(f"neighbours must be [{n_q}, >= {k}], got {neighbours.shape}")
    if q_lab.shape != (n_q,) or g_lab.shape != (len(gallery_images),):
        raise ValueError(f"labels must be [{n_q}] and [{len(gallery_images)}], "
                         f"got {q_lab.shape} and {g_lab.shape}")
    fig = Figure(figsize=(cell_inches * (k + 1), cell_inches * 1.15 * n_q))
    axes = fig.subplots(n_q, k + 1, squeeze=False)
    for i in range(n_q):
        _framed(axes[i, 0], to_rgb_uint8(query_images[i], mean_bgr), QUERY,
                f"query {q_lab[i]}")
        for r in range(k):
            ax, j = axes[i, r + 1], int(neighbours[i, r])
            if j < 0:
                ax.axis("off")
                continue
            ok = g_lab[j] == q_lab[i]
            _framed(ax, to_rgb_uint8(gallery_images[j], mean_bgr), RIGHT if ok else WRONG,
                    f"{r + 1}: {g_lab[j]}")
    fig.tight_layout(pad=0.4)
    return _save(fig, path, dpi)


def _box_patch(box, colour: str) -> Rectangle:
    y0, x0, y1, x1 = (float(v) for v in box)
    # End-exclusive pixel box (CONTRIBUTING.md); imshow pixel centres are at
    # integers, so the box edge runs at -0.5.
    return Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                     linewidth=2.0)


def attention_figure(image, attention_map, box, zoomed_inputs, path: str, *,
                     mean_bgr: Sequence[float] = CAFFE_MEAN_BGR, title: str | None = None,
                     cmap: str = "jet", alpha: float = 0.5, dpi: int = DEFAULT_DPI) -> str:
    """The image with its box, the random-walk map as a heat map, the zoomed
    inputs of branches 2..I (docs/reference.md §4: OAM map -> box -> crop).

    Args:
      image: float [H, W, 3], the branch-1 input (convention of the module).
      attention_map: float [h, w] (e.g. the 7 x 7 random-walk map), stretched
        over the image with bilinear interpolation.
      box: (y0, x0, y1, x1) int pixels of ``image``, end-exclusive.
      zoomed_inputs: sequence of float [H', W', 3], the inputs of branches 2..I.
      path: PNG file to write.
    Returns:
      path.
    """
    amap = np.asarray(attention_map, np.float32)
    if amap.ndim != 2:
        raise ValueError(f"attention_map must be [h, w], got shape {amap.shape}")
    if np.shape(box) != (4,):
        raise ValueError(f"box must be (y0, x0, y1, x1), got shape {np.shape(box)}")
    rgb = to_rgb_uint8(image, mean_bgr)
    h, w = rgb.shape[:2]
    zoomed = list(zoomed_inputs)
    fig = Figure(figsize=(2.6 * (2 + len(zoomed)), 2.9))
    axes = fig.subplots(1, 2 + len(zoomed), squeeze=False)[0]
    axes[0].imshow(rgb)
    axes[0].add_patch(_box_patch(box, "yellow"))
    axes[0].set_title("image + box", fontsize=9)
    axes[1].imshow(rgb)
    span = float(amap.max() - amap.min())
    norm_map = (amap - amap.min()) / span if span > 0 else np.zeros_like(amap)
    axes[1].imshow(norm_map, cmap=cmap, alpha=alpha, interpolation="bilinear",
                   extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    axes[1].add_patch(_box_patch(box, "white"))
    axes[1].set_title("random-walk map", fontsize=9)
    for b, z in enumerate(zoomed, start=2):
        axes[b].imshow(to_rgb_uint8(z, mean_bgr))
        axes[b].set_title(f"branch {b} input", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(pad=0.4, rect=(0, 0, 1, 0.92 if title else 1))
    return _save(fig, path, dpi)
