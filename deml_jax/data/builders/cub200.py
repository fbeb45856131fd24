"""CUB-200-2011 builder, zero-shot split (docs/reference.md §2.1).

Manual dir: the extracted `CUB_200_2011/` folder (or `CUB_200_2011.tgz`),
with images.txt, image_class_labels.txt, classes.txt and images/.
Split by classes: CUB classes 1-100 -> 'train', 101-200 -> 'test'; stored
label = CUB class id - 1 (the released val.txt uses labels 100..199).
"""

from __future__ import annotations

import os

from deml_jax.data.builders import base

# Standard zero-shot split (docs/reference.md §2.1): first 100 classes train.
NUM_TRAIN_CLASSES = 100


class DemlCub200(base.DemlBuilder):
    """CUB-200-2011, classes 1-100 train / 101-200 test."""

    name = 'deml_cub200'
    DESCRIPTION = 'CUB-200-2011 zero-shot split (classes 1-100 / 101-200).'
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        'Place the extracted CUB_200_2011/ folder (images.txt, '
        'image_class_labels.txt, classes.txt, images/) or CUB_200_2011.tgz in '
        'manual_dir.'
    )
    # (classes, images) per split, docs/reference.md §2.1 (5864 / 5924).
    EXPECTED_COUNTS = {'train': (100, 5864), 'test': (100, 5924)}

    def _list_splits(self, manual_dir):
        def find(rel):
            return base.locate(
                manual_dir,
                os.path.join('CUB_200_2011', rel),
                archive='CUB_200_2011.tgz',
                extract_root=self.extract_root,
                what=self.name,
            )

        names = dict(base.read_lines(find('images.txt')))
        labels = dict(base.read_lines(find('image_class_labels.txt')))
        base.read_lines(find('classes.txt'))  # presence check of the layout
        root = os.path.dirname(find('images.txt'))
        splits = {'train': [], 'test': []}
        for image_id in sorted(names, key=int):
            if image_id not in labels:
                raise ValueError(
                    f'{self.name}: image id {image_id} of images.txt has '
                    'no line in image_class_labels.txt'
                )
            cls = int(labels[image_id])
            rel = os.path.join('images', names[image_id])
            split = 'train' if cls <= NUM_TRAIN_CLASSES else 'test'
            splits[split].append(base.Record(os.path.join(root, rel), cls - 1, names[image_id]))
        return splits
