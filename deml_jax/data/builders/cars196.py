"""Stanford Cars (Cars196) builder, zero-shot split.

Manual dir (official release): cars_train/ and cars_test/ (or cars_train.tgz,
cars_test.tgz), devkit/ (or car_devkit.tgz) with cars_meta.mat and
cars_train_annos.mat, and cars_test_annos_withlabels.mat (top level or in
devkit/). The official train and test images are merged and split by class:
classes 1-98 -> 'train', 99-196 -> 'test'; stored label = class - 1.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.io

from deml_jax.data.builders import base

# Standard zero-shot split (Song et al. 2016): first 98 classes train.
NUM_TRAIN_CLASSES = 98


def read_annotations(path: str) -> list[tuple[str, int]]:
    """(fname, class 1-based) of a cars_*_annos*.mat 'annotations' struct."""
    mat = scipy.io.loadmat(path, squeeze_me=True)
    if 'annotations' not in mat:
        raise ValueError(f'{path}: no "annotations" struct (keys {list(mat)})')
    ann = np.atleast_1d(mat['annotations'])
    for field in ('fname', 'class'):
        if field not in (ann.dtype.names or ()):
            raise ValueError(
                f'{path}: annotations lack field {field!r} (fields '
                f'{ann.dtype.names}); need the *_withlabels file'
            )
    return [(str(a['fname']), int(a['class'])) for a in ann]


class DemlCars196(base.DemlBuilder):
    """Stanford Cars, classes 1-98 train / 99-196 test."""

    name = 'deml_cars196'
    DESCRIPTION = 'Stanford Cars zero-shot split (classes 1-98 / 99-196).'
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        'Place cars_train/, cars_test/ (or cars_train.tgz, cars_test.tgz), '
        'devkit/ (or car_devkit.tgz) and cars_test_annos_withlabels.mat in '
        'manual_dir.'
    )
    # 16,185 images: 8,054 in classes 1-98 and 8,131 in classes 99-196.
    EXPECTED_COUNTS = {'train': (98, 8054), 'test': (98, 8131)}

    def _find(self, manual_dir, rel, archive):
        return base.locate(
            manual_dir, rel, archive=archive, extract_root=self.extract_root, what=self.name
        )

    def _list_splits(self, manual_dir):
        self._find(manual_dir, 'devkit/cars_meta.mat', 'car_devkit.tgz')
        test_annos = 'cars_test_annos_withlabels.mat'
        if not os.path.exists(os.path.join(manual_dir, test_annos)):
            test_annos = os.path.join('devkit', test_annos)
        sources = (
            (
                'cars_train',
                self._find(manual_dir, 'devkit/cars_train_annos.mat', 'car_devkit.tgz'),
                'cars_train.tgz',
            ),
            ('cars_test', self._find(manual_dir, test_annos, None), 'cars_test.tgz'),
        )
        splits = {'train': [], 'test': []}
        for folder, annos, archive in sources:
            img_dir = self._find(manual_dir, folder, archive)
            for fname, cls in read_annotations(annos):
                split = 'train' if cls <= NUM_TRAIN_CLASSES else 'test'
                rel = f'{folder}/{fname}'
                splits[split].append(base.Record(os.path.join(img_dir, fname), cls - 1, rel))
        return splits
