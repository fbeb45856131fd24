"""Our TFDS builders (no TensorFlow, no download) and their one registry.

    prepare('cub200', manual_dir='~/data/cub', data_dir='~/tfds',
            val_classes=20, resize_pad=256)

builds `data_dir/deml_cub200/val20_pad256/1.0.0/` (array_record) plus a
`labels_<split>.npy` per split (int64 labels in record order, read by
`deml_jax.data.pipeline.labels_of` without decoding any image).
Importing this package registers the `deml_*` names with TFDS (distinct
from TFDS's own `cars196` etc.), so `tfds.data_source('deml_cub200/...')`
also works after an import.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from deml_jax.data.builders import base
from deml_jax.data.builders.cars196 import DemlCars196
from deml_jax.data.builders.cub200 import DemlCub200
from deml_jax.data.builders.digits import DIGITS_IMAGE_SIZE, DemlDigits
from deml_jax.data.builders.fashion_mnist import FASHION_IMAGE_SIZE, DemlFashionMnist
from deml_jax.data.builders.image_folder import DemlImageFolder
from deml_jax.data.builders.inshop import DemlInshop
from deml_jax.data.builders.sop import DemlSop

REGISTRY: dict[str, type[base.DemlBuilder]] = {
    'cub200': DemlCub200,
    'cars196': DemlCars196,
    'sop': DemlSop,
    'inshop': DemlInshop,
    'digits': DemlDigits,
    'fashion_mnist': DemlFashionMnist,
    'image_folder': DemlImageFolder,
}
BUILDER_KWARGS = ('allow_skip_unreadable', 'expected_counts')


def _drop_tfds_notices(record: logging.LogRecord) -> bool:
    """absl-logger filter: TFDS's "Using custom data configuration" warning (every
    builder of ours has a custom config) only with --verbosity >= 0."""
    return base.verbose() or not str(record.msg).startswith('Using custom data configuration')


if _drop_tfds_notices not in logging.getLogger('absl').filters:
    logging.getLogger('absl').addFilter(_drop_tfds_notices)


def _builder_class(name: str) -> type[base.DemlBuilder]:
    if name not in REGISTRY:
        raise ValueError(f'dataset must be one of {sorted(REGISTRY)}; got {name!r}')
    return REGISTRY[name]


def default_config_name(name: str, options: dict) -> str:
    """Config name from the content-changing options ('default' if none)."""
    prefix = ''
    if name == 'digits' and options.get('image_size', DIGITS_IMAGE_SIZE) != (DIGITS_IMAGE_SIZE):
        prefix = f'size{int(options["image_size"])}'
    if name == 'fashion_mnist':
        parts = []
        if options.get('image_size', FASHION_IMAGE_SIZE) != FASHION_IMAGE_SIZE:
            parts.append(f'size{int(options["image_size"])}')
        if options.get('train_classes') is not None:
            from deml_jax.data.builders.fashion_mnist import parse_train_classes
            seen = parse_train_classes(options['train_classes'])
            if seen != parse_train_classes(None):
                parts.append('seen' + ''.join(str(c) for c in seen))
        prefix = '_'.join(parts)
    return base.config_name(options.get('val_classes', 0), options.get('resize_pad'), prefix)


def make_builder(
    name: str, data_dir: str, *, config: str | None = None, **options
) -> base.DemlBuilder:
    """Builder `name` ('cub200', ...) for `data_dir` with the given options.

    `options` are config fields (val_classes, resize_pad, image_size, root,
    train_classes, train_fraction, split_seed) or builder kwargs
    (allow_skip_unreadable, expected_counts); `config` names the stored
    variant (default: derived from the options, e.g. 'val20_pad256').
    """
    cls = _builder_class(name)
    fields = {f.name for f in dataclasses.fields(cls.BUILDER_CONFIG_CLASS)}
    kwargs = {k: options.pop(k) for k in BUILDER_KWARGS if k in options}
    unknown = set(options) - fields
    if unknown:
        raise TypeError(
            f'{name}: unknown option(s) {sorted(unknown)}; expected '
            f'some of {sorted(fields - {"name"}) + list(BUILDER_KWARGS)}'
        )
    if options.get('train_classes') is not None:
        options['train_classes'] = tuple(options['train_classes'])
    cfg = cls.BUILDER_CONFIG_CLASS(name=config or default_config_name(name, options), **options)
    return cls(data_dir=os.path.expanduser(data_dir), config=cfg, **kwargs)


def prepare(name: str, manual_dir: str | None, data_dir: str, **options) -> base.DemlBuilder:
    """Build dataset `name` from `manual_dir` into `data_dir`; never downloads.

    Returns the prepared builder; `builder.unreadable` maps split -> skipped
    paths (only non-empty with allow_skip_unreadable=True), also written to
    `unreadable.txt` beside the data.
    """
    if name == 'image_folder' and manual_dir and not options.get('root'):
        options['root'] = manual_dir  # the class folders may be given either way
    builder = make_builder(name, data_dir, **options)
    if builder.NEEDS_MANUAL_DIR and (not manual_dir or not os.path.isdir(manual_dir)):
        raise FileNotFoundError(
            f'{name}: manual_dir {manual_dir!r} is not a directory. '
            f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}'
        )
    dl_config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir) if manual_dir else None
    )
    bars = tfds.core.utils.tqdm_utils._active  # pylint: disable=protected-access
    tfds.display_progress_bar(base.verbose())  # TFDS's bars only with --verbosity >= 0
    try:
        builder.download_and_prepare(file_format='array_record', download_config=dl_config)
    finally:
        tfds.display_progress_bar(bars)
    write_label_cache(builder)
    skipped = [p for paths in builder.unreadable.values() for p in paths]
    if skipped:
        logging.warning(
            '%s: skipped %d unreadable image(s), listed in %s',
            name,
            len(skipped),
            epath.Path(builder.data_dir) / 'unreadable.txt',
        )
        (epath.Path(builder.data_dir) / 'unreadable.txt').write_text('\n'.join(skipped) + '\n')
    return builder


def write_label_cache(builder: base.DemlBuilder) -> None:
    """labels_<split>.npy (int64, record order) beside the array_record files."""
    for split in builder.info.splits:
        src = builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})
        labels = np.array([src[i]['label'] for i in range(len(src))], np.int64)
        np.save(epath.Path(builder.data_dir) / f'labels_{split}.npy', labels)
