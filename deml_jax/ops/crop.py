"""Object-attention box and crop on device (docs/reference.md §4 steps 5-10, §3.5).

The Caffe ``ProposalCrop`` layer turns a random-walk map into a box with OpenCV
(uint8 quantisation, ``resize``, ``threshold``, ``findContours``) and crops the
image with ``cv::resize``.  Here every step is a fixed-shape array program:

* the uint8 bilinear upsample reproduces OpenCV's fixed-point ``INTER_LINEAR``
  (11-bit weights, its vertical rounding, its border rules) bit for bit;
* the largest contour (by polygon area) is replaced by the largest 8-connected
  component by pixel count, found by label propagation on the graph of row runs
  (over pixels as a fallback) (§12: same box in 300/300 simulated maps; see
  experiments/bench/oam_agreement.py);
* the crop is separable bilinear resampling: two batched matmuls with
  ``[B, out, S]`` interpolation matrices or two gathers (float images,
  :func:`crop_and_resize`), or Caffe's uint8 pixels bit for bit
  (:func:`crop_and_resize_uint8`, the default of :func:`object_attention_crop`).

``method='host'`` in :func:`object_attention_crop` runs the exact OpenCV
emulation (:mod:`deml_jax.ops.proposal_crop_host`) through ``jax.pure_callback``.
Nothing here is differentiable: every output is under ``stop_gradient`` (§4 step 11).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deml_jax.ops.random_walk import NUM_STEPS, SIGMA_RATIO, random_walk_attention
from deml_jax.ops.regions import largest_region_bbox

# §3.5: ProposalCrop out_size and mean_value1..3 (B, G, R) of the released prototxt.
OUT_SIZE = 227
MEAN_BGR = (123.0, 117.0, 104.0)
# OpenCV INTER_RESIZE_COEF_BITS: bilinear weights of uint8 resize are multiples of 2^-11.
RESIZE_COEF_SCALE = 2048
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- steps 5-7

def exact_divisor(divisor, shape):
    """Broadcast ``divisor`` to ``shape`` behind an optimization barrier.

    XLA rewrites ``x / broadcast(d)`` as ``x * broadcast(1 / d)``, which is not
    correctly rounded (it changed the uint8 map of 69/300 test maps); the
    barrier keeps a true IEEE division, as in Caffe's C++.
    """
    return jax.lax.optimization_barrier(jnp.broadcast_to(divisor, shape))


def quantize_attention(attention):
    """``floor(255 (m - min) / (max - min))`` as int32 ``[B, h, w]`` (§4 step 5).

    Same float32 operation order as Caffe (``255*(M-min)/(max-min)`` then the
    truncating ``(uchar)`` cast).  Fallback when ``max == min`` (Caffe: 0/0):
    all zeros, which later yields no foreground and the whole-image box.
    """
    m = attention.astype(jnp.float32)
    lo = jnp.min(m, axis=(1, 2), keepdims=True)
    hi = jnp.max(m, axis=(1, 2), keepdims=True)
    span = jnp.where(hi > lo, hi - lo, 1.0)
    q = jnp.floor(255.0 * (m - lo) / exact_divisor(span, m.shape))
    return jnp.where(hi > lo, jnp.clip(q, 0, 255), 0).astype(jnp.int32)


def cv_linear_taps(src: int, dst: int, clamp_weights: bool):
    """OpenCV ``INTER_LINEAR`` source taps for a static ``src -> dst`` resize.

    Returns int arrays ``(i0, i1, w0, w1)`` of shape ``[dst]`` with the 11-bit
    fixed-point weights ``saturate_cast<short>(cbuf * 2048)`` (round half even).
    OpenCV clamps the horizontal fraction to 0 at the borders
    (``clamp_weights=True``) but only clips the row indices vertically.
    """
    scale = 1.0 / (dst / src)  # OpenCV: scale_x = 1. / inv_scale_x, in double
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        f = np.where((s < 0) | (s >= src - 1), np.float32(0), f)
        s = np.clip(s, 0, src - 1)
    w0 = np.rint((np.float32(1) - f) * np.float32(RESIZE_COEF_SCALE)).astype(np.int64)
    w1 = np.rint(f * np.float32(RESIZE_COEF_SCALE)).astype(np.int64)
    return np.clip(s, 0, src - 1), np.clip(s + 1, 0, src - 1), w0, w1


def upsample_like_cv2(a8, size: int):
    """``cv2.resize(a8, (size, size), INTER_LINEAR)`` for uint8 maps, bit-exact.

    ``a8`` int32 ``[B, h, w]`` in ``[0, 255]`` -> int32 ``[B, size, size]`` (§4 step 6).
    Horizontal pass in integers (scale 2^11), then OpenCV's vertical uint8 rule
    ``((b0 (S0 >> 4)) >> 16 + (b1 (S1 >> 4)) >> 16 + 2) >> 2``; checked against
    cv2 in tests/ops/test_crop.py.
    """
    _, h, w = a8.shape
    xi0, xi1, xw0, xw1 = cv_linear_taps(w, size, clamp_weights=True)
    yi0, yi1, yw0, yw1 = cv_linear_taps(h, size, clamp_weights=False)
    rows = a8[:, :, xi0] * xw0.astype(np.int32) + a8[:, :, xi1] * xw1.astype(np.int32)
    top = (yw0.astype(np.int32)[:, None] * (rows[:, yi0, :] >> 4)) >> 16
    bottom = (yw1.astype(np.int32)[:, None] * (rows[:, yi1, :] >> 4)) >> 16
    return (top + bottom + 2) >> 2


def foreground_mask(upsampled):
    """``value > floor(mean)`` per image, bool ``[B, S, S]`` (§4 step 7).

    OpenCV's uint8 threshold compares with ``cvFloor(thresh)``; the integer
    floor-division of the exact pixel sum equals it.
    """
    _, s, _ = upsampled.shape
    total = jnp.sum(upsampled, axis=(1, 2), keepdims=True)
    return upsampled > total // (s * s)


# ----------------------------------------------------------------------------- step 9

def squarify_box(y, x, h, w, image_size: int):
    """Square box centred on a rect, clipped: int32 ``[B, 4]`` ``(y0, x0, y1, x1)``.

    §4 step 9: ``x' = x + R((w-h)/4)``, ``y' = y + R((h-w)/4)``,
    ``s = R((w+h)/2)`` with ``R`` = cvRound = round half to even (``jnp.round``),
    then the intersection with ``[0, S) x [0, S)`` (end-exclusive).
    """
    y, x, h, w = (jnp.asarray(v, jnp.int32) for v in (y, x, h, w))
    x0 = x + jnp.round((w - h).astype(jnp.float32) / 4.0).astype(jnp.int32)
    y0 = y + jnp.round((h - w).astype(jnp.float32) / 4.0).astype(jnp.int32)
    side = jnp.round((w + h).astype(jnp.float32) / 2.0).astype(jnp.int32)
    box = (jnp.maximum(y0, 0), jnp.maximum(x0, 0),
           jnp.minimum(y0 + side, image_size), jnp.minimum(x0 + side, image_size))
    return jnp.stack(box, axis=-1).astype(jnp.int32)


def attention_boxes(attention, image_size: int, *, largest_component: bool = True):
    """Attention map -> crop box, on device (§4 steps 5-9).

    Args:
      attention: ``[B, h, w]`` float random-walk maps.
      image_size: side ``S`` of the square image the box refers to (static).
      largest_component: see :func:`largest_region_bbox`.
    Returns:
      int32 ``[B, 4]`` ``(y0, x0, y1, x1)``, end-exclusive, inside ``[0, S]``.
      Fallback when no pixel passes the threshold (constant map; Caffe would
      fail on an empty rect): the whole image ``(0, 0, S, S)``.
    """
    if attention.ndim != 3:
        raise ValueError(f"attention must be [B, h, w], got shape {attention.shape}")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    attention = jax.lax.stop_gradient(attention)
    fg = foreground_mask(upsample_like_cv2(quantize_attention(attention), int(image_size)))
    y, x, h, w, found = largest_region_bbox(fg, largest_component)
    boxes = squarify_box(y, x, h, w, int(image_size))
    whole = jnp.array([0, 0, image_size, image_size], jnp.int32)
    return jnp.where(found[:, None], boxes, whole)


# ----------------------------------------------------------------------------- step 10

def _interp_taps(start, length, out_size: int, clamp_weights: bool, float_coord: bool = False):
    """OpenCV ``INTER_LINEAR`` taps of ``img[start:start+length]`` resized to ``out_size``.

    Returns ``(i0, i1, w0, w1)``, each ``[B, out_size]`` (int32 indices into the
    full image, float32 weights).  Source coordinate
    ``(i + 0.5) * length / out - 0.5 = num / den`` with integers
    ``num = (2i + 1) length - out``, ``den = 2 out``: its integer part and
    remainder are exact and the fraction is rounded once to float32, as cv2 5's
    float resize does (it computes the fraction in double).  Taps are clipped to
    the span; horizontally OpenCV also zeroes the fraction at the borders
    (``clamp_weights``), vertically it only clips the rows.  ``float_coord``:
    round the coordinate itself to float32 first, then split it (cv2's uint8
    path, whose 11-bit weights come from ``1.f - fx`` and ``fx``).
    """
    start = start.astype(jnp.int32)[:, None]
    length = jnp.maximum(length.astype(jnp.int32), 1)[:, None]
    i = jnp.arange(out_size, dtype=jnp.int32)[None, :]
    num, den = (2 * i + 1) * length - out_size, 2 * out_size
    base = jnp.floor_divide(num, den)
    rem = num - base * den  # in [0, den)
    if clamp_weights:
        rem = jnp.where((base < 0) | (base >= length - 1), 0, rem)
    if float_coord:
        coord = num.astype(jnp.float32) / exact_divisor(jnp.float32(den), num.shape)
        base = jnp.floor(coord).astype(jnp.int32)
        frac = coord - base.astype(jnp.float32)
        if clamp_weights:
            frac = jnp.where((base < 0) | (base >= length - 1), 0.0, frac)
        comp = 1.0 - frac
    else:
        den = exact_divisor(jnp.float32(den), rem.shape)
        frac = rem.astype(jnp.float32) / den
        comp = (den - rem.astype(jnp.float32)) / den  # 1 - frac, rounded once (den - rem exact)
    i0 = start + jnp.clip(base, 0, length - 1)
    i1 = start + jnp.clip(base + 1, 0, length - 1)
    return i0, i1, comp, frac


def _taps_matrix(taps, size: int):
    """Dense ``[B, out, size]`` interpolation matrix of ``_interp_taps`` output."""
    i0, i1, w0, w1 = taps
    grid = jnp.arange(size, dtype=jnp.int32)[None, None, :]
    return w0[..., None] * (grid == i0[..., None]) + w1[..., None] * (grid == i1[..., None])


def _resize_axis_gather(x, taps, axis: int):
    """Linear interpolation of ``x [B, ...]`` along ``axis`` by gathering two taps."""
    i0, i1, w0, w1 = taps
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[axis] = i0.shape[1]
    pick = lambda idx: jnp.take_along_axis(x, idx.reshape(shape), axis=axis)
    return w0.reshape(shape) * pick(i0) + w1.reshape(shape) * pick(i1)


CROP_IMPLS = ("auto", "matmul", "gather")


def crop_and_resize(images, boxes, out_size: int, *, impl: str = "auto"):
    """Crop each box and resize it to ``out_size x out_size`` (§4 step 10), on device.

    Matches ``cv2.resize(img[y0:y1, x0:x1], (out, out), INTER_LINEAR)`` on float
    images (half-pixel centres, clamped to the box, anisotropic when the clipped
    box is not square; horizontal pass first, like OpenCV).  Caffe resizes the
    uint8 image and subtracts the mean afterwards; bilinear weights sum to 1, so
    resizing the mean-subtracted floats is the same up to Caffe's uint8 rounding
    of the output (<= 0.5 per pixel).

    Args:
      images: ``[B, S, S, C]`` float (any float dtype; math in float32).
      boxes: int ``[B, 4]`` ``(y0, x0, y1, x1)``, end-exclusive, non-empty.
      out_size: output side (static).
      impl: ``'matmul'``: two batched matmuls with ``[B, out, S]`` interpolation
        matrices (GEMM/MXU friendly, for GPU/TPU); ``'gather'``: two gathers of
        two taps (far fewer flops, fastest on CPU); ``'auto'``: gather on CPU,
        matmul elsewhere.  Same result up to float rounding.
    Returns:
      ``[B, out_size, out_size, C]`` float32, under ``stop_gradient``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes must be [{images.shape[0]}, 4], got shape {boxes.shape}")
    if int(out_size) < 1:
        raise ValueError(f"out_size must be >= 1, got {out_size}")
    if impl not in CROP_IMPLS:
        raise ValueError(f"impl must be one of {CROP_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "gather" if jax.default_backend() == "cpu" else "matmul"
    images = jax.lax.stop_gradient(images).astype(jnp.float32)
    boxes = jax.lax.stop_gradient(boxes).astype(jnp.int32)
    _, h, w, _ = images.shape
    rows = _interp_taps(boxes[:, 0], boxes[:, 2] - boxes[:, 0], out_size, False)
    cols = _interp_taps(boxes[:, 1], boxes[:, 3] - boxes[:, 1], out_size, True)
    if impl == "gather":
        return _resize_axis_gather(_resize_axis_gather(images, cols, 2), rows, 1)
    tmp = jnp.einsum("bjx,byxc->byjc", _taps_matrix(cols, w), images, precision=_HIGHEST)
    return jnp.einsum("biy,byjc->bijc", _taps_matrix(rows, h), tmp, precision=_HIGHEST)


def crop_and_resize_uint8(images, boxes, out_size: int, mean_bgr=MEAN_BGR):
    """Caffe's crop exactly: uint8 rebuild, OpenCV fixed-point resize, minus mean.

    §4 steps 1 and 10: ``pixels = (uchar)(x + mean)`` (truncation; clipped to
    [0, 255] where C++ is undefined), ``cv::resize(pixels(rect), INTER_LINEAR)``
    with 11-bit integer weights and OpenCV's vertical uint8 rounding
    (see :func:`upsample_like_cv2`), then ``float(pixel) - mean``.

    Args:
      images: ``[B, S, S, C]`` mean-subtracted float images.
      boxes: int ``[B, 4]`` ``(y0, x0, y1, x1)``, end-exclusive, non-empty.
      out_size: output side (static).
      mean_bgr: ``C`` per-channel means.
    Returns:
      ``[B, out_size, out_size, C]`` float32 (integers minus the mean).
    """
    if images.ndim != 4 or boxes.shape != (images.shape[0], 4):
        raise ValueError(f"expected images [B, S, S, C] and boxes [B, 4], got "
                         f"{images.shape} and {boxes.shape}")
    mean = jnp.asarray(mean_bgr, jnp.float32)
    images = jax.lax.stop_gradient(images).astype(jnp.float32)
    boxes = jax.lax.stop_gradient(boxes).astype(jnp.int32)
    pixels = jnp.clip(jnp.trunc(images + mean), 0, 255).astype(jnp.int32)
    scale = jnp.float32(RESIZE_COEF_SCALE)
    fixed = lambda t: (t[0], t[1], jnp.round(t[2] * scale).astype(jnp.int32),
                       jnp.round(t[3] * scale).astype(jnp.int32))
    cols = fixed(_interp_taps(boxes[:, 1], boxes[:, 3] - boxes[:, 1], out_size, True, True))
    i0, i1, w0, w1 = fixed(_interp_taps(boxes[:, 0], boxes[:, 2] - boxes[:, 0], out_size, False,
                                        True))
    rows = _resize_axis_gather(pixels, cols, 2)  # [B, S, out, C], scale 2^11
    pick = lambda idx: jnp.take_along_axis(rows, idx[:, :, None, None], axis=1) >> 4
    top = (w0[:, :, None, None] * pick(i0)) >> 16
    bottom = (w1[:, :, None, None] * pick(i1)) >> 16
    return ((top + bottom + 2) >> 2).astype(jnp.float32) - mean


# ----------------------------------------------------------------------------- the module

OAM_METHODS = ("device", "host")
OAM_PIXELS = ("uint8", "float")


def _host_oam(images, features, *, out_size, num_steps, sigma_ratio, mean_bgr, converged):
    """The exact Caffe emulation through ``jax.pure_callback`` (works under jit)."""
    from deml_jax.ops import proposal_crop_host  # cv2 import only when used

    b, _, _, c = images.shape
    shapes = (jax.ShapeDtypeStruct((b, out_size, out_size, c), jnp.float32),
              jax.ShapeDtypeStruct(features.shape[:3], jnp.float32),
              jax.ShapeDtypeStruct((b, 4), jnp.int32))

    def callback(imgs, feats):
        return proposal_crop_host.proposal_crop_batch(
            np.asarray(imgs, np.float32), np.asarray(feats, np.float32), out_size, mean_bgr,
            num_steps=num_steps, sigma_ratio=sigma_ratio, converged=converged)

    return jax.pure_callback(callback, shapes, images.astype(jnp.float32),
                             features.astype(jnp.float32), vmap_method="sequential")


def object_attention_crop(images, features, *, out_size: int = OUT_SIZE,
                          num_steps: int = NUM_STEPS, sigma_ratio: float = SIGMA_RATIO,
                          method: str = "device", mean_bgr=MEAN_BGR,
                          converged: bool = False, largest_component: bool = True,
                          pixels: str = "uint8"):
    """The object-attention module (§4, chained as in §3.5); no gradient flows.

    Args:
      images: ``[B, S, S, 3]`` BGR mean-subtracted float images (square).
      features: ``[B, h, w, C]`` float feature map (learner-1 ``inception_5b``).
      out_size: crop side (227 in the released prototxt).
      num_steps, sigma_ratio, converged: random walk, see ``random_walk_attention``.
      method: ``'device'`` (jit path, this module) or ``'host'`` (exact OpenCV
        emulation through ``jax.pure_callback``; the batch size must be static).
      mean_bgr: per-channel means added back to rebuild uint8 pixels (host path).
      largest_component: device path only, see :func:`largest_region_bbox`.
      pixels: device path only.  ``'uint8'`` (default): Caffe's pixel values
        exactly (:func:`crop_and_resize_uint8`; the crops then equal the host
        path's whenever the boxes do); ``'float'``: :func:`crop_and_resize` on the
        float images (no uint8 rounding).
    Returns:
      dict ``crops`` float32 ``[B, out, out, 3]``, ``attention`` float32
      ``[B, h, w]``, ``boxes`` int32 ``[B, 4]`` ``(y0, x0, y1, x1)``.
    """
    if method not in OAM_METHODS:
        raise ValueError(f"method must be one of {OAM_METHODS}, got {method!r}")
    if pixels not in OAM_PIXELS:
        raise ValueError(f"pixels must be one of {OAM_PIXELS}, got {pixels!r}")
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be square [B, S, S, C], got shape {images.shape}")
    if features.ndim != 4 or features.shape[0] != images.shape[0]:
        raise ValueError(f"features must be [B, h, w, C] with B = {images.shape[0]}, "
                         f"got shape {features.shape}")
    images = jax.lax.stop_gradient(images)
    features = jax.lax.stop_gradient(features)
    if method == "host":
        crops, attention, boxes = _host_oam(
            images, features, out_size=out_size, num_steps=num_steps, sigma_ratio=sigma_ratio,
            mean_bgr=tuple(float(v) for v in mean_bgr), converged=converged)
    else:
        attention = random_walk_attention(features, num_steps, sigma_ratio, converged=converged)
        boxes = attention_boxes(attention, images.shape[1], largest_component=largest_component)
        if pixels == "uint8":
            crops = crop_and_resize_uint8(images, boxes, out_size, mean_bgr)
        else:
            crops = crop_and_resize(images, boxes, out_size)
    return {"crops": jax.lax.stop_gradient(crops),
            "attention": jax.lax.stop_gradient(attention),
            "boxes": jax.lax.stop_gradient(boxes)}
