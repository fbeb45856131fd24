"""From ``config.dataset`` / ``config.eval`` to the data stack's pieces.

The trainer and the CLIs call these; the data modules themselves know nothing
of configs.  The bundled digits set is built on first use (it ships inside
scikit-learn, nothing is downloaded); every other dataset must be prepared
with ``python -m deml_jax.data.prepare`` first.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from deml_jax.data import pipeline, transforms
from deml_jax.data.sampler import PKSampler
from deml_jax.evaluation.evaluator import RetrievalEvaluator


def dataset_name(config) -> str:
    """Registry name plus builder variant, e.g. ``'cub200/val20_pad256'``."""
    d = config.dataset
    return f"{d.name}/{d.variant}" if d.variant else d.name


def load_source(config, split: str):
    """A prepared split; builds ``digits`` on first use (bundled, offline)."""
    name = dataset_name(config)
    try:
        return pipeline.load_source(name, split, config.dataset.data_dir)
    except FileNotFoundError:
        if config.dataset.name != "digits":
            raise
    from deml_jax.data import builders  # heavy TFDS import only when building
    options = {"image_size": config.dataset.image_size}
    if config.dataset.variant:
        options["config"] = config.dataset.variant
    if jax.process_index() == 0:
        builders.prepare("digits", None, config.dataset.data_dir, **options)
    return pipeline.load_source(name, split, config.dataset.data_dir)


def train_transform(config):
    d = config.dataset
    if d.augmentation == "caffe":  # §2.3
        return functools.partial(transforms.caffe_train, crop=d.crop_size, mean=d.mean_bgr)
    return functools.partial(transforms.modern_train, size=d.crop_size)


def eval_transform(config):
    d = config.dataset
    if d.augmentation == "caffe":
        return functools.partial(transforms.caffe_eval, crop=d.crop_size, mean=d.mean_bgr)
    return functools.partial(transforms.modern_eval, size=d.crop_size)


def global_num_devices(config) -> int:
    n = config.parallel.num_devices
    return n * jax.process_count() if n else jax.device_count()


def train_batches(config, start_step: int, num_local_devices: int):
    """Endless host batches ``[local_devices, per_device, S, S, 3]`` from ``start_step``."""
    source = load_source(config, config.dataset.train_split)
    labels = pipeline.labels_of(source)
    num_devices = global_num_devices(config)
    num_classes = len(np.unique(labels))
    wanted = config.dataset.classes_per_device * num_devices
    if wanted > num_classes:  # batches are set per device, so they always divide
        raise ValueError(
            f"config.dataset.classes_per_device={config.dataset.classes_per_device} on "
            f"{num_devices} devices needs {wanted} classes per step, but the "
            f"{config.dataset.train_split!r} split has {num_classes}: lower it or use fewer "
            "devices (config.parallel.num_devices)")
    sampler = PKSampler(labels, classes_per_batch=config.dataset.classes_per_device * num_devices,
                        images_per_class=config.dataset.images_per_class,
                        num_devices=num_devices, seed=config.seed)
    return pipeline.train_batches(
        source, labels, sampler, start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count(), transform=train_transform(config),
        seed=config.seed, num_workers=config.dataset.num_workers)


def split_names(config, which: str) -> dict[str, str]:
    """Evaluator split roles -> dataset split names for ``which`` in {'val', 'test'}."""
    if which == "val":
        return {"test": config.dataset.val_split}
    names = config.dataset.test_split.split(",")
    if config.eval.mode == "query_gallery":
        if len(names) != 2:
            raise ValueError("config.dataset.test_split must be 'query,gallery' in "
                             f"query_gallery mode, got {config.dataset.test_split!r}")
        return {"query": names[0], "gallery": names[1]}
    return {"test": names[0]}


def make_evaluator(config, embed_fn, which: str, num_local_devices: int) -> RetrievalEvaluator:
    """The retrieval evaluator of the ``which`` split(s) ('val' or 'test')."""
    roles = split_names(config, which)
    sources = {role: load_source(config, split) for role, split in roles.items()}

    def batches(role):
        return lambda: pipeline.eval_batches(
            sources[role], batch_size_per_device=config.eval.batch_size_per_device,
            num_local_devices=num_local_devices, process_index=jax.process_index(),
            process_count=jax.process_count(), transform=eval_transform(config))

    mode = config.eval.mode if which == "test" else "self"
    return RetrievalEvaluator(
        embed_fn, {role: batches(role) for role in roles}, mode=mode, ks=config.eval.ks,
        metric=config.eval.metric, clustering=config.eval.clustering,
        chunk_size=config.eval.chunk_size, seed=config.seed)


def evaluate(config, embed_fn, which: str, num_local_devices: int) -> dict:
    return make_evaluator(config, embed_fn, which, num_local_devices).run()


def file_names(config, split: str) -> np.ndarray:
    """File names of a split in record order (for feature export and pictures)."""
    source = load_source(config, split)
    return np.array([os.fsdecode(source[i]["file_name"]) for i in range(len(source))])
