"""Input-pipeline throughput: decoded + augmented images/s (per CPU core).

Builds, in a temp dir, a synthetic image_folder dataset of 256 x 256 JPEGs
(the §2.1 image size; smooth gradients + noise so JPEG sizes are realistic)
and the digits dataset, then times
  1. decode (cv2) + caffe_train (227 crop, mirror, mean) in one thread;
  2. the grain train pipeline (P x K plan, released 2 x 13 x 2 layout) with
     1 and 2 threads, and with multiprocessing workers when asked;
and says whether it keeps up with a train step consuming
--step_images_per_s images per second.

  .venv/bin/python experiments/bench/input_pipeline.py --step_images_per_s 100
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
from deml_jax.data import builders, pipeline, transforms  # noqa: E402
from deml_jax.data.sampler import PKSampler  # noqa: E402


def synthetic_folder(root: str, num_classes: int, per_class: int, size: int = 256) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for c in range(num_classes):
        os.makedirs(os.path.join(root, f'class{c:03d}'))
        for k in range(per_class):
            a = rng.uniform(0, 255, 3)
            img = a * xx[..., None] + (255 - a) * yy[..., None] + rng.normal(0, 20, (size, size, 3))
            cv2.imwrite(
                os.path.join(root, f'class{c:03d}', f'{k}.jpg'),
                np.clip(img, 0, 255).astype(np.uint8),
                [cv2.IMWRITE_JPEG_QUALITY, 90],
            )


def time_single(src, transform, n: int) -> float:
    """images/s of decode + transform in this thread (one core)."""
    rng = np.random.default_rng(0)
    recs = [src[i % len(src)] for i in range(n)]
    t = time.perf_counter()
    for rec in recs:
        transform(pipeline.decode_bgr(rec), rng)
    return n / (time.perf_counter() - t)


def time_pipeline(
    src, transform, *, steps: int, threads: int, workers: int, P: int, K: int, D: int
) -> float:
    """images/s of the grain train pipeline (first step excluded: warm-up)."""
    labels = pipeline.labels_of(src)
    s = PKSampler(labels, classes_per_batch=P, images_per_class=K, num_devices=D, seed=0)
    it = pipeline.train_batches(
        src,
        labels,
        s,
        start_step=0,
        process_index=0,
        process_count=1,
        transform=transform,
        seed=0,
        num_workers=workers,
        num_threads=threads,
        num_steps=steps + 1,
    )
    next(it)
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * P * K / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        '--step_images_per_s',
        type=float,
        default=100.0,
        help='images/s the train step consumes (e.g. 52 / step_s)',
    )
    p.add_argument('--num_classes', type=int, default=60)
    p.add_argument('--per_class', type=int, default=4)
    p.add_argument('--steps', type=int, default=10)
    p.add_argument(
        '--workers',
        type=int,
        default=0,
        help='also time grain multiprocessing with this many workers',
    )
    a = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    print(f'cpu cores available: {cores}; opencv threads: {cv2.getNumThreads()}')
    cv2.setNumThreads(1)  # one image per thread; parallelism from grain
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_folder(os.path.join(tmp, 'img'), a.num_classes, a.per_class)
        builders.prepare(
            'image_folder',
            None,
            os.path.join(tmp, 'tfds'),
            root=os.path.join(tmp, 'img'),
            train_fraction=0.5,
        )
        builders.prepare('digits', None, os.path.join(tmp, 'tfds'))
        jpeg = pipeline.load_source('image_folder', 'train', os.path.join(tmp, 'tfds'))
        digits = pipeline.load_source('digits', 'train', os.path.join(tmp, 'tfds'))
        cases = [
            ('jpeg256 caffe_train', jpeg, transforms.caffe_train, 26, 2, 2),
            ('jpeg256 modern_train', jpeg, transforms.modern_train, 26, 2, 2),
            (
                'digits64 caffe_train56',
                digits,
                functools.partial(transforms.caffe_train, crop=56),
                4,
                26,
                2,
            ),
        ]
        for name, src, tf, P, K, D in cases:
            single = time_single(src, tf, 400)
            print(f'{name}: decode+augment {single:8.1f} images/s per core (1 thread)')
            for threads, workers in [(1, 0), (2, 0)] + ([(1, a.workers)] if a.workers else []):
                rate = time_pipeline(
                    src, tf, steps=a.steps, threads=threads, workers=workers, P=P, K=K, D=D
                )
                used = max(threads, workers)
                verdict = 'keeps up' if rate >= a.step_images_per_s else 'TOO SLOW'
                print(
                    f'  grain P={P} K={K} threads={threads} workers={workers}: '
                    f'{rate:8.1f} images/s ({rate / min(used, cores):7.1f} per core) '
                    f'-> {verdict} for {a.step_images_per_s:.0f} images/s'
                )


if __name__ == '__main__':
    main()
