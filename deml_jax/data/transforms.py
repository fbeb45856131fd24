"""Per-image transforms, NumPy/OpenCV on the host.

Input to every transform: uint8 [H, W, 3] in BGR (OpenCV decode, as Caffe,
docs/reference.md §2.3). Output: float32 [crop, crop, 3].

* `caffe_train` / `caffe_eval`: the released code (docs/reference.md §2.3):
  random 227 crop of the 256 image, mirror w.p. 1/2, BGR minus the released
  means (123, 117, 104) on (B, G, R), scale 1; eval = centre crop, offset
  (H - crop) // 2, no mirror. Output channel order BGR.
* `modern_train` / `modern_eval`: for torchvision-style BN backbones whose
  weights expect RGB in [0, 1] with ImageNet mean/std: random resized crop
  (scale (0.16, 1): the value common in metric learning, e.g. Musgrave et
  al.'s benchmark; ratio (3/4, 4/3)), flip w.p. 1/2, RGB normalised; eval =
  resize the short side to 256 then centre crop 224. Output channel order RGB.

Images smaller than the crop are first enlarged (short side -> crop,
aspect kept, bilinear); `SMALL_IMAGE_COUNT` counts how often (it does not
happen with the 256 x 256 images of §2.1).
"""

from __future__ import annotations

import collections
import logging
import math

import cv2
import numpy as np

# docs/reference.md §2.3: released mean_value 123, 117, 104 on channels
# 0, 1, 2 = B, G, R (swapped relative to BVLC's 104, 117, 123; faithful).
CAFFE_MEAN_BGR = (123.0, 117.0, 104.0)
CAFFE_CROP = 227  # §2.3 crop_size
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)  # torchvision ImageNet stats
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
MODERN_CROP = 224
MODERN_RESIZE = 256
MODERN_SCALE = (0.16, 1.0)
MODERN_RATIO = (3.0 / 4.0, 4.0 / 3.0)
MODERN_ATTEMPTS = 10  # torchvision RandomResizedCrop's retry count

SMALL_IMAGE_COUNT = collections.Counter()


def _check_image(image: np.ndarray) -> None:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or (image.ndim != 3 or image.shape[2] != 3)
    ):
        got = (
            f'{image.dtype} {image.shape}'
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(f'image must be uint8 [H, W, 3] (BGR); got {got}')


def ensure_min_size(image: np.ndarray, size: int) -> np.ndarray:
    """Enlarge (aspect kept, bilinear) so that min(H, W) >= size; counted."""
    h, w = image.shape[:2]
    if min(h, w) >= size:
        return image
    SMALL_IMAGE_COUNT['enlarged'] += 1
    if SMALL_IMAGE_COUNT['enlarged'] == 1:
        logging.warning(
            'image %dx%d smaller than %d: enlarged (counted in transforms.SMALL_IMAGE_COUNT)',
            h,
            w,
            size,
        )
    s = size / min(h, w)
    nh, nw = max(size, math.ceil(h * s)), max(size, math.ceil(w * s))
    return cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)


def caffe_train(
    image_bgr_uint8: np.ndarray,
    rng: np.random.Generator,
    *,
    crop: int = CAFFE_CROP,
    mirror: bool = True,
    mean=CAFFE_MEAN_BGR,
) -> np.ndarray:
    """Released train augmentation (§2.3): crop, then mirror, then mean.

    Offsets h_off, w_off are uniform integers in [0, H - crop], [0, W - crop]
    (Caffe's Rand(H - crop + 1)); mirror with probability 1/2.
    uint8 BGR [H, W, 3] -> float32 BGR [crop, crop, 3].
    """
    _check_image(image_bgr_uint8)
    img = ensure_min_size(image_bgr_uint8, crop)
    h, w = img.shape[:2]
    h_off = int(rng.integers(0, h - crop + 1))
    w_off = int(rng.integers(0, w - crop + 1))
    out = img[h_off : h_off + crop, w_off : w_off + crop]
    if mirror and rng.integers(0, 2):
        out = out[:, ::-1]
    return out.astype(np.float32) - np.asarray(mean, np.float32)


def caffe_eval(
    image_bgr_uint8: np.ndarray, *, crop: int = CAFFE_CROP, mean=CAFFE_MEAN_BGR
) -> np.ndarray:
    """Released test transform (§2.3): centre crop at (H - crop) // 2, mean.

    uint8 BGR [H, W, 3] -> float32 BGR [crop, crop, 3].
    """
    _check_image(image_bgr_uint8)
    img = ensure_min_size(image_bgr_uint8, crop)
    h, w = img.shape[:2]
    h_off, w_off = (h - crop) // 2, (w - crop) // 2
    out = img[h_off : h_off + crop, w_off : w_off + crop]
    return out.astype(np.float32) - np.asarray(mean, np.float32)


def _normalise_rgb(image_bgr: np.ndarray, mean, std) -> np.ndarray:
    rgb = image_bgr[..., ::-1].astype(np.float32) / 255.0
    return (rgb - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def random_resized_box(
    h: int, w: int, rng: np.random.Generator, *, scale=MODERN_SCALE, ratio=MODERN_RATIO
):
    """(y0, x0, ch, cw) as torchvision's RandomResizedCrop.get_params."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(MODERN_ATTEMPTS):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return (int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw)
    # Fallback: centre crop at the nearest allowed aspect ratio.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def modern_train(
    image_bgr_uint8: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int = MODERN_CROP,
    scale=MODERN_SCALE,
    ratio=MODERN_RATIO,
    mirror: bool = True,
    mean=IMAGENET_MEAN_RGB,
    std=IMAGENET_STD_RGB,
) -> np.ndarray:
    """Random resized crop + flip + ImageNet normalisation.

    uint8 BGR [H, W, 3] -> float32 RGB [size, size, 3].
    """
    _check_image(image_bgr_uint8)
    h, w = image_bgr_uint8.shape[:2]
    y0, x0, ch, cw = random_resized_box(h, w, rng, scale=scale, ratio=ratio)
    out = cv2.resize(
        image_bgr_uint8[y0 : y0 + ch, x0 : x0 + cw], (size, size), interpolation=cv2.INTER_LINEAR
    )
    if mirror and rng.integers(0, 2):
        out = out[:, ::-1]
    return _normalise_rgb(out, mean, std)


def modern_eval(
    image_bgr_uint8: np.ndarray,
    *,
    resize: int = MODERN_RESIZE,
    size: int = MODERN_CROP,
    mean=IMAGENET_MEAN_RGB,
    std=IMAGENET_STD_RGB,
) -> np.ndarray:
    """Short side -> `resize` (bilinear), centre crop `size`, normalise.

    uint8 BGR [H, W, 3] -> float32 RGB [size, size, 3].
    """
    _check_image(image_bgr_uint8)
    h, w = image_bgr_uint8.shape[:2]
    s = resize / min(h, w)
    nh, nw = max(resize, round(h * s)), max(resize, round(w * s))
    img = cv2.resize(image_bgr_uint8, (nw, nh), interpolation=cv2.INTER_LINEAR)
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    return _normalise_rgb(img[y0 : y0 + size, x0 : x0 + size], mean, std)
