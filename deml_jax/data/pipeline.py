"""grain input pipelines over `tfds.data_source` (no TensorFlow).

Train: a grain MapDataset over step numbers; element `step` = the host's
slice of the sampler's plan for that step, read, decoded (cv2 colour decode
-> BGR uint8, as Caffe, docs/reference.md §2.3) and augmented. The
augmentation of the image at global slot g (device-major position in the
global batch) uses np.random.default_rng((seed, step, g)), so a batch is a
pure function of (seed, step) and does not depend on how many hosts share
the work: resuming at step k gives exactly what continuing would.

Eval: ordered batches; global batch b covers split positions
[b*G, (b+1)*G) with G = batch_size_per_device * num_local_devices *
process_count; host p takes the p-th contiguous block of G / process_count.
Positions past the end are padding (mask False, label and index -1, image
zeros). Every host yields ceil(N / G) batches, so each image counts once.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator, Sequence

import cv2
import grain
import numpy as np

from deml_jax.data.sampler import PKSampler

TrainTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]
EvalTransform = Callable[[np.ndarray], np.ndarray]
# Host threads working on different steps at once and steps kept ready:
# 2 keeps the train step fed on our 2-core machines; raise on big hosts.
NUM_THREADS = 2
PREFETCH = 2


def load_source(dataset_name: str, split: str, data_dir: str):
    """Random-access source of a prepared split; images left encoded.

    `dataset_name` is a registry name ('cub200', 'digits', ...) optionally
    followed by '/CONFIG' (e.g. 'cub200/val20_pad256'). Records are dicts
    {'image': bytes, 'label': int64, 'file_name': bytes, 'id': int64}.
    Raises FileNotFoundError with the prepare command when not prepared.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from deml_jax.data import builders  # pylint: disable=g-import-not-at-top

    name, _, config = dataset_name.partition('/')
    builder = builders.make_builder(name, data_dir, config=config or 'default')
    if not os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
        raise FileNotFoundError(
            f'dataset {dataset_name!r} is not prepared in {builder.data_dir!r}. '
            f'Run: python -m deml_jax.data.prepare --dataset {name} '
            f'{"--root DIR" if name == "image_folder" else "--manual_dir DIR"} '
            f'--data_dir {data_dir} (plus the options that give '
            f'config {config or "default"!r}, e.g. --val_classes N).'
        )
    if split not in builder.info.splits:
        raise ValueError(
            f'split must be one of {list(builder.info.splits)} for {dataset_name!r}; got {split!r}'
        )
    return builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})


def labels_of(source) -> np.ndarray:
    """int64 [N] labels in record order, without decoding any image.

    Reads labels_<split>.npy written by `prepare` beside the data; falls back
    to reading every record's label field when the cache is missing.
    """
    path = os.path.join(source.dataset_info.data_dir, f'labels_{source.split}.npy')
    if os.path.exists(path):
        labels = np.load(path)
        if len(labels) == len(source):
            return labels.astype(np.int64)
    return np.array([source[i]['label'] for i in range(len(source))], np.int64)


def decode_bgr(record: dict[str, Any]) -> np.ndarray:
    """uint8 BGR [H, W, 3] of a record; ValueError naming the file if corrupt."""
    img = cv2.imdecode(np.frombuffer(record['image'], np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        name = record.get('file_name', b'?')
        raise ValueError(f'cannot decode image {name!r} (id {record.get("id")})')
    return img


def _read(source, indices: Sequence[int]) -> list[dict[str, Any]]:
    idx = [int(i) for i in indices]
    if hasattr(source, '__getitems__'):
        return list(source.__getitems__(idx))
    return [source[i] for i in idx]


def _iterate(
    ds: grain.MapDataset, num_threads: int, prefetch: int, num_workers: int
) -> Iterator[dict]:
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    )
    if num_workers > 0:
        # grain's worker processes read absl flags; a program that does not use
        # absl.app (tests, notebooks) has never parsed them: use the defaults.
        from absl import flags  # pylint: disable=g-import-not-at-top

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)


def train_batches(
    source,
    labels: np.ndarray,
    sampler: PKSampler,
    *,
    start_step: int,
    process_index: int,
    process_count: int,
    transform: TrainTransform,
    seed: int,
    num_workers: int = 0,
    num_steps: int | None = None,
    num_threads: int = NUM_THREADS,
    prefetch: int = PREFETCH,
) -> Iterator[dict[str, np.ndarray]]:
    """Host batches for steps start_step, start_step + 1, ... (endless).

    Yields {'image': float32 [local_devices, per_device, H, W, C],
            'label': int32 [local_devices, per_device]}
    with local_devices = sampler.num_devices // process_count.
    """
    labels = np.asarray(labels)
    if len(labels) != len(source):
        raise ValueError(f'labels has {len(labels)} entries, source has {len(source)} records')
    local = sampler.num_devices // max(process_count, 1)
    slot0 = process_index * local * sampler.per_device

    def load_step(step: int) -> dict[str, np.ndarray]:
        plan = sampler.host_plan(step, process_index, process_count)
        images = [
            transform(decode_bgr(rec), np.random.default_rng((seed, step, slot0 + j)))
            for j, rec in enumerate(_read(source, plan.ravel()))
        ]
        images = np.stack(images).astype(np.float32)
        return {
            'image': images.reshape(plan.shape + images.shape[1:]),
            'label': labels[plan].astype(np.int32),
        }

    stop = start_step + num_steps if num_steps is not None else 2**62
    ds = grain.MapDataset.range(start_step, stop).map(load_step)
    return _iterate(ds, num_threads, prefetch, num_workers)


def eval_batches(
    source,
    *,
    batch_size_per_device: int,
    num_local_devices: int,
    process_index: int,
    process_count: int,
    transform: EvalTransform,
    num_workers: int = 0,
    num_threads: int = NUM_THREADS,
    prefetch: int = PREFETCH,
) -> Iterator[dict[str, np.ndarray]]:
    """Ordered, padded eval batches; each record appears exactly once overall.

    Yields {'image': float32 [num_local_devices, batch_size_per_device, H, W, C],
            'label': int32 [...], 'mask': bool [...], 'index': int64 [...]}
    ('index' = position in the split; label and index are -1 on padding).
    """
    n = len(source)
    local = batch_size_per_device * num_local_devices
    per_global = local * process_count
    num_batches = math.ceil(n / per_global)
    shape2 = (num_local_devices, batch_size_per_device)
    blank = np.zeros_like(transform(decode_bgr(source[0]))) if n else None

    def load_batch(b: int) -> dict[str, np.ndarray]:
        pos = b * per_global + process_index * local + np.arange(local)
        mask = pos < n
        recs = dict(zip(pos[mask].tolist(), _read(source, pos[mask])))
        images = np.stack(
            [transform(decode_bgr(recs[p])) if m else blank for p, m in zip(pos.tolist(), mask)]
        ).astype(np.float32)
        labels = [int(recs[p]['label']) if m else -1 for p, m in zip(pos.tolist(), mask)]
        return {
            'image': images.reshape(shape2 + images.shape[1:]),
            'label': np.asarray(labels, np.int32).reshape(shape2),
            'mask': mask.reshape(shape2),
            'index': np.where(mask, pos, -1).astype(np.int64).reshape(shape2),
        }

    ds = grain.MapDataset.range(0, num_batches).map(load_batch)
    return _iterate(ds, num_threads, prefetch, num_workers)
