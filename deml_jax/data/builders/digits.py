"""scikit-learn's bundled digits as a tiny zero-shot retrieval set.

1797 8x8 grey images (0..16) -> uint8 x 255/16 -> bilinear upscale
(cv2.INTER_LINEAR: smoother strokes than nearest for the conv trunk) to
`image_size` (default 64: DeML's trunk needs >= ~64 px) -> 3 equal channels,
stored as PNG. Digits 0-4 -> 'train', 5-9 -> 'test'; stored label = digit.
Builds in seconds, needs no manual directory.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from deml_jax.data.builders import base

DIGITS_IMAGE_SIZE = 64  # our choice: smallest size the trunk handles well
DIGITS_TRAIN_CLASSES = 5  # digits 0-4 seen, 5-9 unseen
DIGITS_MAX_VALUE = 16.0  # load_digits pixel range is 0..16


@dataclasses.dataclass
class DigitsConfig(base.DemlConfig):
    image_size: int = DIGITS_IMAGE_SIZE


class DemlDigits(base.DemlBuilder):
    """sklearn digits, upscaled; 0-4 train / 5-9 test."""

    name = 'deml_digits'
    BUILDER_CONFIG_CLASS = DigitsConfig
    DESCRIPTION = 'scikit-learn digits, upscaled, digits 0-4 / 5-9.'
    ENCODING = 'png'
    NEEDS_MANUAL_DIR = False
    # Per-class counts of load_digits(): 178 182 177 183 181 | 182 181 179 174 180.
    EXPECTED_COUNTS = {'train': (5, 901), 'test': (5, 896)}

    def _list_splits(self, manual_dir):
        from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

        d = load_digits()
        size = int(self.builder_config.image_size)
        if size < 8:
            raise ValueError(f'image_size must be >= 8; got {size}')
        self._images = {}
        splits = {'train': [], 'test': []}
        for i, (img, digit) in enumerate(zip(d.images, d.target)):
            g = np.round(img * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
            g = cv2.resize(g, (size, size), interpolation=cv2.INTER_LINEAR)
            key = f'digits/{i:04d}_{int(digit)}.png'
            self._images[key] = cv2.imencode('.png', np.repeat(g[..., None], 3, 2))[1].tobytes()
            split = 'train' if digit < DIGITS_TRAIN_CLASSES else 'test'
            splits[split].append(base.Record(key, int(digit), key))
        return splits

    def _read(self, record):
        return self._images.get(record.path)
