"""Exact host reproduction of Caffe's ``ProposalCrop`` layer (NumPy + OpenCV).

docs/reference.md §4 steps 1-10, followed operation by operation, float32 where
Caffe uses ``float`` and float64 where its expression is ``double``.  This is the
parity reference for the device path in :mod:`deml_jax.ops.crop` and the
``method='host'`` option of :func:`deml_jax.ops.object_attention_crop`.

Departures, only where Caffe has undefined behaviour or crashes:
* a zero column of the graph (a position equal to all others) becomes a
  self-loop instead of 0/0 = NaN; ``max == min`` quantises to all zeros;
* no contour of positive area (Caffe: ``cv::resize`` of an empty rect fails)
  gives the whole-image box;
* out-of-range ``float -> uchar`` casts (undefined in C++) are clipped to [0, 255];
* for a non-square map ``eps = sigma_ratio * H`` (Caffe assumes square maps).
Sums that Caffe accumulates in a loop use NumPy's sequential ``add.accumulate``;
the 49x49 mat-vec goes through BLAS as in Caffe (``caffe_cpu_gemm``).
"""

from __future__ import annotations

import cv2
import numpy as np

# §3.5 / §4: ProposalCrop parameters of the released prototxt and the loop count.
OUT_SIZE = 227
MEAN_BGR = (123.0, 117.0, 104.0)
NUM_STEPS = 10
SIGMA_RATIO = 0.15


def rebuild_uint8(image, mean=MEAN_BGR):
    """``(uchar)(x + mean_k)`` of an HWC float image -> uint8 HWC (§4 step 1)."""
    pixels = np.asarray(image, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.trunc(pixels), 0, 255).astype(np.uint8)


def graph_weights(features, sigma_ratio=SIGMA_RATIO):
    """Edge weights ``D [N, N]`` float32 of an HWC map, ``N = H W`` (§4 step 2)."""
    h, w, c = features.shape
    f = np.asarray(features, np.float32).reshape(h * w, c)
    diff = f[:, None, :] - f[None, :, :]
    ans = np.add.accumulate(diff * diff, axis=-1)[..., -1]  # Caffe's sequential float sum
    dist = np.where(ans == 0, np.float32(0), np.sqrt(ans)).astype(np.float32)
    ems = np.float32(sigma_ratio * h)
    rows, cols = np.divmod(np.arange(h * w), w)
    sq = ((rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2)
    spatial = np.exp(-sq.astype(np.float64) / np.float64(np.float32(2) * ems * ems))
    return (dist.astype(np.float64) * spatial).astype(np.float32)


def walk_map(features, num_steps=NUM_STEPS, sigma_ratio=SIGMA_RATIO, converged=False):
    """Random-walk map ``[H, W]`` float32 of an HWC feature map (§4 steps 2-4)."""
    h, w, _ = features.shape
    d = graph_weights(features, sigma_ratio)
    colsum = np.add.accumulate(d, axis=0)[-1]
    isolated = colsum <= 0
    d[np.diag(isolated)] = 1.0  # self-loop instead of Caffe's 0/0
    colsum = np.where(isolated, np.float32(1), colsum).astype(np.float32)
    p = (d / colsum[None, :]).astype(np.float32)
    if converged:
        return (colsum / colsum.sum(dtype=np.float64)).astype(np.float32).reshape(h, w)
    m = np.full(h * w, 1.0 / (h * w), np.float32)  # caffe_set(N*N, 1.0/N/N)
    for _ in range(num_steps):
        m = (p @ m).astype(np.float32)
    return m.reshape(h, w)


def quantize_map(m):
    """``(uchar)(255 (M - min) / (max - min))`` -> uint8 ``[H, W]`` (§4 step 5)."""
    m = np.asarray(m, np.float32)
    lo, hi = np.float32(m.min()), np.float32(m.max())
    if not hi > lo:
        return np.zeros(m.shape, np.uint8)
    return np.trunc(np.float32(255) * (m - lo) / (hi - lo)).astype(np.uint8)


def square_box(x, y, w, h, image_size):
    """Squarify + intersect (§4 step 9) -> ``(y0, x0, y1, x1)`` end-exclusive ints.

    Python's ``round`` is round-half-to-even like ``cvRound``.
    """
    x2 = x + round((w - h) / 4.0)
    y2 = y + round((h - w) / 4.0)
    side = round((w + h) / 2.0)
    return (max(y2, 0), max(x2, 0), min(y2 + side, image_size), min(x2 + side, image_size))


def largest_contour_rect(binary):
    """``boundingRect`` of the largest external contour, or None (§4 step 8)."""
    found = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contours = found[0] if len(found) == 2 else found[1]
    best, best_area = None, 0.0
    for contour in contours:
        area = cv2.contourArea(contour)
        if area > best_area:  # strict, from 0: zero-area contours never win
            best, best_area = contour, area
    return None if best is None else cv2.boundingRect(best)


def attention_box(m, image_size):
    """Walk map ``[h, w]`` -> box ``(y0, x0, y1, x1)`` in an ``S x S`` image (§4 steps 5-9).

    Also returns the intermediates ``dict(a8, upsampled, binary, rect)``.
    """
    a8 = quantize_map(m)
    up = cv2.resize(a8, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
    _, binary = cv2.threshold(up, cv2.mean(up)[0], 255, cv2.THRESH_BINARY)
    rect = largest_contour_rect(binary)
    box = (0, 0, image_size, image_size) if rect is None else square_box(*rect, image_size)
    return box, dict(a8=a8, upsampled=up, binary=binary, rect=rect)


def crop_resize(image_u8, box, out_size=OUT_SIZE):
    """``cv::resize(img(rect), out, INTER_LINEAR)`` of a uint8 HWC image (§4 step 10)."""
    y0, x0, y1, x1 = box
    return cv2.resize(image_u8[y0:y1, x0:x1], (out_size, out_size),
                      interpolation=cv2.INTER_LINEAR)


def proposal_crop(image, features, out_size=OUT_SIZE, mean=MEAN_BGR, *,
                  num_steps=NUM_STEPS, sigma_ratio=SIGMA_RATIO, channels_first=False,
                  converged=False):
    """One sample of ``ProposalCrop`` (§4 steps 1-10).

    Args:
      image: mean-subtracted float image, HWC (or CHW with ``channels_first``), square.
      features: feature map HWC (or CHW with ``channels_first``).
    Returns:
      ``(crop, attention, box)``: crop float32 HWC ``[out, out, 3]`` minus the
      mean, attention float32 ``[h, w]``, box int32 ``[4]`` ``(y0, x0, y1, x1)``.
    """
    image, features = np.asarray(image), np.asarray(features)
    if channels_first:
        image, features = image.transpose(1, 2, 0), features.transpose(1, 2, 0)
    if image.ndim != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be a square HWC image, got shape {image.shape}")
    if features.ndim != 3:
        raise ValueError(f"features must be HWC, got shape {features.shape}")
    pixels = rebuild_uint8(image, mean)
    m = walk_map(features, num_steps, sigma_ratio, converged)
    box, _ = attention_box(m, image.shape[0])
    crop = crop_resize(pixels, box, out_size).astype(np.float32) - np.asarray(mean, np.float32)
    return crop, m, np.asarray(box, np.int32)


def proposal_crop_batch(images, features, out_size=OUT_SIZE, mean=MEAN_BGR, *,
                        num_steps=NUM_STEPS, sigma_ratio=SIGMA_RATIO, converged=False):
    """Batched NHWC entry point: ``[B, S, S, 3]``, ``[B, h, w, C]`` ->
    ``(crops [B, out, out, 3] float32, attention [B, h, w] float32, boxes int32 [B, 4])``."""
    images, features = np.asarray(images), np.asarray(features)
    if images.ndim != 4 or features.ndim != 4 or images.shape[0] != features.shape[0]:
        raise ValueError(f"expected images [B, S, S, 3] and features [B, h, w, C], "
                         f"got {images.shape} and {features.shape}")
    outs = [proposal_crop(i, f, out_size, mean, num_steps=num_steps, sigma_ratio=sigma_ratio,
                          converged=converged) for i, f in zip(images, features)]
    crops, maps, boxes = zip(*outs)
    return np.stack(crops), np.stack(maps), np.stack(boxes)
