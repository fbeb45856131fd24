"""Agreement of the on-device object-attention box with the exact OpenCV path, and OAM speed.

Run:  .venv/bin/python experiments/bench/oam_agreement.py [--synthetic 300] [--repeats 5]

For every feature map both paths compute the crop box of Caffe's ProposalCrop
(docs/reference.md §4): the device path (``deml_jax.ops.attention_boxes`` after
``random_walk_attention``, jit) and the host path
(``deml_jax.ops.proposal_crop_host``: NumPy + cv2 findContours, bit-faithful to
Caffe).  Prints the IoU distribution (mean, min, 5th percentile, fraction >= 0.9,
fraction identical) for

* synthetic 7x7x1024 ReLU maps with one or two Gaussian object blobs (§12);
* ``inception_5b`` maps of our BVLC GoogLeNet (random init, fixed seed: no
  ImageNet weights exist here) on real photos from ``skimage.data``, zero-padded
  to square, resized to 256, then 227 crops at 9 offsets x 2 mirrors (§2.3);

and two stress sets (two distant objects; plain ReLU noise) where the binary map
often has several regions, for the default device path (largest 8-connected
component) and for the cheaper
bounding box of all foreground pixels, and for the box stage alone (the host's
walk map fed to the device box code); counts device crops bit-identical to the
host's.  Then times one batch of 26 at 227 px: the device OAM under jit (default,
and the cheap variant: all-foreground bbox + float crop) vs the host path
(median of --repeats calls, after warm-up).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from deml_jax.ops import attention_boxes, object_attention_crop, random_walk_attention
from deml_jax.ops import proposal_crop_host as host

MEAN_BGR = np.array([123.0, 117.0, 104.0], np.float32)  # §2.3 released means (B, G, R)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "camera", "coins", "moon", "clock", "brick")
OFFSETS = (0, 14, 29)  # 256 - 227 = 29: corners, centre (§2.3 test offset 14)


def synthetic_features(rng, count, n=7, channels=1024):
    feats = np.maximum(rng.normal(0.0, 0.5, (count, n, n, channels)), 0)
    yy, xx = np.mgrid[:n, :n]
    for b in range(count):
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(0, n - 1, 2)
            sigma = rng.uniform(0.7, 2.0)
            bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
            feats[b] += bump[..., None] * rng.uniform(0, 3, channels)
    return feats.astype(np.float32)


def two_object_features(rng, count, n=7, channels=1024):
    """Stress set: two compact blobs far apart, so the binary map often has two
    components and the largest one must be picked (all-foreground bbox fails)."""
    feats = np.maximum(rng.normal(0.0, 0.3, (count, n, n, channels)), 0)
    yy, xx = np.mgrid[:n, :n]
    for b in range(count):
        corners = rng.permutation([(1, 1), (1, n - 2), (n - 2, 1), (n - 2, n - 2)])[:2]
        for (cy, cx), amp in zip(corners, rng.uniform(1.0, 3.0, 2)):
            sigma = rng.uniform(0.5, 0.9)
            bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
            feats[b] += amp * bump[..., None] * rng.uniform(0, 3, channels)
    return feats.astype(np.float32)


def photo_batch():
    """BGR mean-subtracted 227 crops of skimage photos, float32 [N, 227, 227, 3]."""
    import skimage.data

    crops = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        side = max(img.shape[:2])
        square = np.zeros((side, side, 3), np.uint8)  # zero padding to square (§2.1)
        square[: img.shape[0], : img.shape[1]] = img
        bgr = cv2.resize(square, (256, 256), interpolation=cv2.INTER_LINEAR)[..., ::-1]
        for y in OFFSETS:
            for x in OFFSETS:
                crop = bgr[y:y + 227, x:x + 227]
                crops += [crop, crop[:, ::-1]]
    return np.stack(crops).astype(np.float32) - MEAN_BGR


def googlenet_features(images, batch=26, seed=0):
    """``inception_5b`` [N, 7, 7, 1024] of a randomly initialised BVLC GoogLeNet."""
    from deml_jax.models.googlenet import GoogLeNet

    model = GoogLeNet(variant="bvlc")
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 227, 227, 3)), stop="inception_5b")
    apply = jax.jit(lambda v, x: model.apply(v, x, stop="inception_5b")[1]["inception_5b"])
    return np.concatenate([np.asarray(apply(variables, images[i:i + batch]))
                           for i in range(0, len(images), batch)])


def iou(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return inter / (area(a) + area(b) - inter)


def summary(name, dev, ref):
    ious = np.array([iou(d, r) for d, r in zip(dev, ref)])
    same = np.mean([tuple(int(v) for v in d) == tuple(r) for d, r in zip(dev, ref)])
    print(f"  {name:<34} n={len(ious):4d} mean={ious.mean():.4f} min={ious.min():.4f} "
          f"p5={np.percentile(ious, 5):.4f} frac>=0.9={np.mean(ious >= 0.9):.4f} "
          f"identical={same:.4f}")


def agreement(label, feats, size=227, chunk=26):
    walk = jax.jit(lambda f: random_walk_attention(f))
    boxes = {lc: jax.jit(lambda m, lc=lc: attention_boxes(m, size, largest_component=lc))
             for lc in (True, False)}
    maps = np.concatenate([np.asarray(walk(feats[i:i + chunk])) for i in range(0, len(feats), chunk)])
    host_maps = [host.walk_map(f) for f in feats]
    ref = [host.attention_box(m, size)[0] for m in host_maps]
    run = lambda fn, ms: np.concatenate([np.asarray(fn(ms[i:i + chunk])) for i in range(0, len(ms), chunk)])
    parts = [host.attention_box(m, size)[1]["binary"] for m in host_maps]
    multi = np.mean([len(cv2.findContours(p, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0]) > 1
                     for p in parts])
    print(f"{label}: max |device map - host map| = {np.max(np.abs(maps - np.stack(host_maps))):.3g}, "
          f"maps with > 1 foreground region: {multi:.3f}")
    summary("device (largest component)", run(boxes[True], maps), ref)
    summary("device (all-foreground bbox)", run(boxes[False], maps), ref)
    summary("box stage only (host map in)", run(boxes[True], np.stack(host_maps)), ref)


def crop_parity(feats, images):
    """Device crops (Caffe uint8 pixels) vs host crops, on images whose boxes agree."""
    feats, images = feats[: len(images)], images[: len(feats)]
    device = jax.jit(lambda x, f: object_attention_crop(x, f))
    same = exact = 0
    for i in range(0, len(images), 26):
        out = device(images[i:i + 26], feats[i:i + 26])
        crops, _, boxes = host.proposal_crop_batch(images[i:i + 26], feats[i:i + 26])
        agree = np.all(np.asarray(out["boxes"]) == boxes, axis=1)
        same += int(agree.sum())
        exact += int(np.sum(np.all(np.asarray(out["crops"]) == crops, axis=(1, 2, 3)) & agree))
    print(f"  crops bit-identical to the host's: {exact}/{same} images with identical boxes")


def timing(feats, images, repeats):
    variants = (
        ("device (jit), default", jax.jit(lambda x, f: object_attention_crop(x, f))),
        ("device, all-fg bbox + float crop", jax.jit(lambda x, f: object_attention_crop(
            x, f, largest_component=False, pixels="float"))),
        ("host (pure_callback, cv2)", jax.jit(lambda x, f: object_attention_crop(
            x, f, method="host"))),
    )
    x, f = jnp.asarray(images[:26]), jnp.asarray(feats[:26])
    for name, fn in variants:
        jax.block_until_ready(fn(x, f))
        wall, cpu = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(x, f))
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        print(f"  {name:<34} {1e3 * np.median(wall):8.1f} ms wall, {1e3 * np.median(cpu):8.1f} ms "
              f"CPU per batch of 26 (median of {repeats})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, cv2 {cv2.__version__}")
    rng = np.random.default_rng(0)
    synth = synthetic_features(rng, args.synthetic)
    agreement("synthetic blobs 7x7x1024", synth)
    agreement("stress: two distant objects 7x7x1024", two_object_features(rng, 100))
    noise = np.maximum(rng.normal(size=(100, 7, 7, 1024)), 0).astype(np.float32)
    agreement("stress: ReLU noise, no object 7x7x1024", noise)
    images = photo_batch()
    try:
        real = googlenet_features(images)
    except ImportError as err:  # backbone written by another engineer
        print(f"GoogLeNet backbone not importable ({err}); skipping the photo maps")
        real = None
    if real is not None:
        agreement(f"GoogLeNet inception_5b (random init) on {len(images)} photo crops", real)
        agreement("all maps", np.concatenate([synth, real]))
        crop_parity(real, images)
    print("timing, one batch of 26 images 227x227 with 7x7x1024 features:")
    timing(synth, images, args.repeats)


if __name__ == "__main__":
    main()
