"""From ``config.dataset`` / ``config.eval`` to the data stack's pieces.

The trainer and the CLIs call these; the data modules themselves know nothing
of configs.  The bundled digits set is built on first use (it ships inside
scikit-learn, nothing is downloaded); every other dataset must be prepared
with ``python -m deml_jax.data.prepare`` first.
"""

from __future__ import annotations

import functools
import os
import re

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
    except FileNotFoundError as err:
        if config.dataset.name == "image_folder" and config.dataset.get("root"):
            return _build_image_folder(config, name, split)
        if config.dataset.name != "digits":
            raise FileNotFoundError(not_prepared_message(config)) from err
    from deml_jax.data import builders  # heavy TFDS import only when building
    options = {"image_size": config.dataset.image_size}
    if config.dataset.variant:
        options["config"] = config.dataset.variant
    if jax.process_index() == 0:
        builders.prepare("digits", None, config.dataset.data_dir, **options)
    return pipeline.load_source(name, split, config.dataset.data_dir)


def prepare_command(dataset: str, variant: str, data_dir: str) -> str:
    """The ``python -m deml_jax.data.prepare`` command that builds ``variant``.

    Variant names are builders/base.py ``config_name``'s: '' (raw images),
    'pad256', 'val20_pad256', 'size40_val1' (digits) ...; a custom name
    (prepare --config NAME) gives ``--config NAME``.
    """
    flags = {"val": "--val_classes", "pad": "--resize_pad", "size": "--image_size"}
    parts, args = (variant.split("_") if variant else []), []
    for part in parts:
        m = re.fullmatch(r"(val|pad|size)(\d+)", part)
        if not m:
            args = [f"--config {variant}  # plus the options this variant was built with"]
            break
        args.append(f"{flags[m.group(1)]} {int(m.group(2))}")
    else:  # the builder's order: size, val, pad; the command lists pad first
        args.sort(key=lambda a: ("--resize_pad", "--val_classes", "--image_size").index(
            a.split()[0]))
    manual = {"digits": "", "image_folder": " --root DIR"}.get(dataset, " --manual_dir DIR")
    return " ".join([f"python -m deml_jax.data.prepare --dataset {dataset}{manual} "
                     f"--data_dir {data_dir}"] + args)


def _variant_label(variant: str) -> str:
    if not variant or variant == "default":
        return "'' (raw images)"
    return repr(variant) + (" (resized + zero-padded)" if "pad" in variant else " (raw images)")


def prepared_variants(dataset: str, data_dir: str) -> list[str]:
    """Variants of ``dataset`` prepared in ``data_dir`` ('' for the raw 'default')."""
    from deml_jax.data import builders
    if dataset not in builders.REGISTRY:
        return []
    root = os.path.join(os.path.expanduser(data_dir), builders.REGISTRY[dataset].name)
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if os.path.isdir(path) and any(os.path.exists(os.path.join(path, v, "dataset_info.json"))
                                       for v in os.listdir(path)):
            found.append("" if name == "default" else name)
    return found


def not_prepared_message(config) -> str:
    """Why ``config.dataset`` cannot be read, with the exact command that builds it (§2.1)."""
    d = config.dataset
    pad = re.search(r"pad(\d+)", d.variant)
    what = (f" (aspect-kept resize + zero padding to {pad.group(1)} x {pad.group(1)}, §2.1)"
            if pad else " (raw images)" if not d.variant else "")
    others = [v for v in prepared_variants(d.name, d.data_dir) if v != d.variant]
    lines = [f"config.dataset.name={d.name!r} with config.dataset.variant={d.variant!r}"
             f"{what} is not prepared in config.dataset.data_dir={d.data_dir!r}."]
    if others:
        lines.append("Prepared there: " + ", ".join(_variant_label(v) for v in others)
                     + "; the config does not read another variant silently.")
    lines.append("Build it (DIR: the folder with the official files, README \"Bring a "
                 "dataset\"):\n  " + prepare_command(d.name, d.variant, d.data_dir))
    if others:
        lines.append("or choose a prepared variant explicitly: --config.dataset.variant="
                     + repr(others[0]) + (" (raw images, not the released preprocessing)"
                                          if not others[0] else ""))
    return "\n".join(lines)


def _build_image_folder(config, name: str, split: str):
    """configs/image_folder.py: builds ``dataset.root``'s class folders on first use."""
    from deml_jax.data import builders
    variant = config.dataset.variant
    options = {"resize_pad": int(variant[3:])} if variant.startswith("pad") else {}
    if variant and variant != f"pad{options.get('resize_pad')}":
        raise ValueError(f"config.dataset.variant={variant!r}: an image_folder built on first "
                         "use is '' or 'padN'; prepare other variants with "
                         "python -m deml_jax.data.prepare --dataset image_folder --root DIR")
    if jax.process_index() == 0:
        builders.prepare("image_folder", None, config.dataset.data_dir,
                         root=os.path.expanduser(config.dataset.root),
                         config=variant or None, **options)
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


def loss_layout(config, num_devices: int | None = None):
    """The loss-group layout of ``config`` on ``num_devices`` (default: all in use).

    Raises ValueError naming ``parallel.loss_groups``, ``dataset.global_batch_size``
    and the device count when they do not fit (deml_jax/loss_groups.py).
    """
    from deml_jax import loss_groups
    d, p = config.dataset, config.parallel
    return loss_groups.make_layout(
        p.loss_scope, p.loss_groups, num_devices or global_num_devices(config),
        d.global_batch_size, d.images_per_class)


def train_batches(config, start_step: int, num_local_devices: int):
    """Endless host batches ``[local_devices, per_device, S, S, 3]`` from ``start_step``.

    The global batch (``dataset.global_batch_size`` images: classes of
    ``images_per_class`` adjacent images) is a pure function of (seed, step),
    whatever the device count; each device takes its contiguous slice (§2.2).
    """
    d = config.dataset
    num_devices = global_num_devices(config)
    layout = loss_layout(config, num_devices)  # before reading any data
    source = load_source(config, d.train_split)
    labels = pipeline.labels_of(source)
    num_classes = len(np.unique(labels))
    wanted = d.global_batch_size // d.images_per_class
    if wanted > num_classes:
        raise ValueError(
            f"config.dataset.global_batch_size={d.global_batch_size} with "
            f"images_per_class={d.images_per_class} needs {wanted} classes per step, but the "
            f"{d.train_split!r} split has {num_classes}: lower config.dataset.global_batch_size")
    sampler = PKSampler(labels, classes_per_batch=wanted, images_per_class=d.images_per_class,
                        num_devices=num_devices, seed=config.seed, num_groups=layout.num_groups)
    return pipeline.train_batches(
        source, labels, sampler, start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count(), transform=train_transform(config),
        seed=config.seed, num_workers=d.num_workers)


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


def make_evaluator(config, embed_fn, which: str, num_local_devices: int, *,
                   on_degenerate: str = "raise") -> RetrievalEvaluator:
    """The retrieval evaluator of the ``which`` split(s) ('val' or 'test').

    ``on_degenerate='warn'`` (training runs): a split that cannot be evaluated
    (< 2 classes, no query with a relevant item) gives a warning and None
    metrics instead of an error (evaluation/evaluator.py).
    """
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
        chunk_size=config.eval.chunk_size, seed=config.seed, on_degenerate=on_degenerate)


def evaluate(config, embed_fn, which: str, num_local_devices: int, *,
             on_degenerate: str = "raise") -> dict:
    return make_evaluator(config, embed_fn, which, num_local_devices,
                          on_degenerate=on_degenerate).run()


def file_names(config, split: str) -> np.ndarray:
    """File names of a split in record order (for feature export and pictures)."""
    source = load_source(config, split)
    return np.array([os.fsdecode(source[i]["file_name"]) for i in range(len(source))])
