"""A user's own data: one sub-folder per class under `root`.

Class ids are the positions of the class folders in sorted order (0-based).
The class split is either `train_classes` (folder names) or, by default, a
random `train_fraction` of the classes drawn with `split_seed`
(np.random.default_rng(split_seed).permutation of the sorted folders; the
first round(fraction * C) go to 'train', the rest to 'test').
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from deml_jax.data.builders import base

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
TRAIN_FRACTION = 0.5  # half the classes seen, as in the CUB/Cars splits


@dataclasses.dataclass
class ImageFolderConfig(base.DemlConfig):
    root: str = ''
    train_classes: tuple[str, ...] | None = None
    train_fraction: float = TRAIN_FRACTION
    split_seed: int = 0


def split_classes(classes: list[str], cfg: ImageFolderConfig) -> set[str]:
    """Names of the training classes."""
    if cfg.train_classes is not None:
        unknown = sorted(set(cfg.train_classes) - set(classes))
        if unknown:
            raise ValueError(
                f'train_classes names {unknown} are not class folders '
                f'of {cfg.root!r} (found {classes[:10]}...)'
            )
        train = set(cfg.train_classes)
    else:
        if not 0.0 < cfg.train_fraction < 1.0:
            raise ValueError(f'train_fraction must be in (0, 1); got {cfg.train_fraction}')
        n = round(cfg.train_fraction * len(classes))
        perm = np.random.default_rng(cfg.split_seed).permutation(len(classes))
        train = {classes[i] for i in perm[:n]}
    if not train or len(train) == len(classes):
        raise ValueError(
            f'the class split of {cfg.root!r} leaves an empty split '
            f'({len(train)} of {len(classes)} classes in train)'
        )
    return train


class DemlImageFolder(base.DemlBuilder):
    """One folder per class under config.root; class-disjoint split."""

    name = 'deml_image_folder'
    BUILDER_CONFIG_CLASS = ImageFolderConfig
    DESCRIPTION = 'User images, one folder per class, class-disjoint split.'
    MANUAL_DOWNLOAD_INSTRUCTIONS = 'Give root=DIR with one sub-folder per class.'
    NEEDS_MANUAL_DIR = False

    def _list_splits(self, manual_dir):
        root = self.builder_config.root
        if not root or not os.path.isdir(root):
            raise FileNotFoundError(
                f'{self.name}: root {root!r} is not a directory (expected one sub-folder per class)'
            )
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if len(classes) < 2:
            raise ValueError(
                f'{self.name}: root {root!r} must hold >= 2 class folders; found {classes}'
            )
        train = split_classes(classes, self.builder_config)
        splits = {'train': [], 'test': []}
        for label, cls in enumerate(classes):
            files = sorted(
                f
                for f in os.listdir(os.path.join(root, cls))
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not files:
                raise ValueError(
                    f'{self.name}: class folder '
                    f'{os.path.join(root, cls)!r} holds no image '
                    f'({"/".join(IMAGE_EXTENSIONS)})'
                )
            split = 'train' if cls in train else 'test'
            splits[split] += [
                base.Record(os.path.join(root, cls, f), label, f'{cls}/{f}') for f in files
            ]
        return splits
