"""Fashion-MNIST as a small class-disjoint (zero-shot) retrieval set.

Reads the four official idx files from the manual directory (``.gz`` as
distributed, or already decompressed); never downloads.  Debian's
``dataset-fashion-mnist`` package installs exactly these files.

  train-images-idx3-ubyte.gz  t10k-images-idx3-ubyte.gz   (uint8 [N, 28, 28])
  train-labels-idx1-ubyte.gz  t10k-labels-idx1-ubyte.gz   (uint8 [N], 0..9)

Split (our choice, like the digits demo): the `train_classes` (default the
first five: T-shirt/top, Trouser, Pullover, Dress, Coat) are seen; 'train'
holds their images of the official training file (5 x 6,000), 'test' holds
the other classes' images of the official test file (5 x 1,000), so no image
of the official test file is ever trained on and no test class is seen.
`val_classes` moves the last seen classes to a class-disjoint 'val' split.
Images: grey 28 x 28 -> bilinear upscale (cv2.INTER_LINEAR) to `image_size`
(default 64, as digits) -> 3 equal channels, stored as PNG; stored label =
the official class id.
"""

from __future__ import annotations

import dataclasses
import gzip
import os

import cv2
import numpy as np

from deml_jax.data.builders import base

FASHION_IMAGE_SIZE = 64  # as digits: the smallest size the conv trunk handles well
FASHION_TRAIN_CLASSES = (0, 1, 2, 3, 4)  # seen by default; 5-9 unseen
NUM_CLASSES = 10
# Official sizes: 6,000 training and 1,000 test images per class.
OFFICIAL_IMAGES = {'train': 60_000, 't10k': 10_000}
PER_CLASS = {'train': 6_000, 't10k': 1_000}
FILES = {
    ('train', 'images'): 'train-images-idx3-ubyte',
    ('train', 'labels'): 'train-labels-idx1-ubyte',
    ('t10k', 'images'): 't10k-images-idx3-ubyte',
    ('t10k', 'labels'): 't10k-labels-idx1-ubyte',
}
IDX_MAGIC = {'images': (0x0803, 3), 'labels': (0x0801, 1)}  # uint8 data, ndim
SOURCE_NOTE = (
    'Install them with Debian/Ubuntu\'s package `dataset-fashion-mnist` (apt install '
    'dataset-fashion-mnist, which installs exactly these files) or take the official '
    'files from https://github.com/zalandoresearch/fashion-mnist (the four '
    '*-ubyte.gz files of its data/fashion folder), and pass their folder as --manual_dir.'
)
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot')


@dataclasses.dataclass
class FashionMnistConfig(base.DemlConfig):
    image_size: int = FASHION_IMAGE_SIZE
    train_classes: tuple | None = None  # class ids (ints or digit strings); None = 0-4


def parse_train_classes(train_classes) -> tuple[int, ...]:
    """Seen class ids from ints or digit strings; checks range and both splits non-empty."""
    if train_classes is None:
        return FASHION_TRAIN_CLASSES
    try:
        ids = tuple(sorted({int(c) for c in train_classes}))
    except (TypeError, ValueError):
        raise ValueError(f'fashion_mnist: train_classes must be class ids 0-9; got '
                         f'{train_classes!r}') from None
    if not ids or min(ids) < 0 or max(ids) >= NUM_CLASSES or len(ids) == NUM_CLASSES:
        raise ValueError(f'fashion_mnist: train_classes must be 1 to 9 distinct class ids in '
                         f'0-9 (the rest are unseen); got {train_classes!r}')
    return ids


def find_file(manual_dir: str, stem: str) -> str:
    """``stem.gz`` or ``stem`` in manual_dir; a FileNotFoundError saying where they come from."""
    for name in (stem + '.gz', stem):
        path = os.path.join(manual_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f'fashion_mnist: {stem + ".gz"!r} (or {stem!r}) not found in manual_dir '
        f'{os.path.abspath(manual_dir)!r}; the four official idx files are needed. ' + SOURCE_NOTE)


def read_idx(path: str, kind: str) -> np.ndarray:
    """uint8 array of an idx file (gzip or plain); ValueError naming the file when corrupt.

    idx: 2 zero bytes, a type byte (0x08 = uint8), the number of dimensions,
    then one big-endian uint32 per dimension, then the data row-major.
    """
    try:
        if path.endswith('.gz'):
            with gzip.open(path, 'rb') as f:
                data = f.read()
        else:
            with open(path, 'rb') as f:
                data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f'fashion_mnist: {path!r} is corrupt or truncated (cannot be '
                         f'decompressed: {e}). ' + SOURCE_NOTE) from e
    magic, ndim = IDX_MAGIC[kind]
    if len(data) < 4 + 4 * ndim or int.from_bytes(data[:4], 'big') != magic:
        found = data[:4].hex() if len(data) >= 4 else f'{len(data)} byte(s)'
        raise ValueError(f'fashion_mnist: {path!r} is not an idx {kind} file (expected magic '
                         f'{magic:08x} and {ndim} dimension(s), found {found}). ' + SOURCE_NOTE)
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(dims))
    if len(body) != expected:
        raise ValueError(f'fashion_mnist: {path!r} is truncated or corrupt: its header says '
                         f'{dims} = {expected} bytes of data, found {len(body)}. ' + SOURCE_NOTE)
    return np.frombuffer(body, np.uint8).reshape(dims)


class DemlFashionMnist(base.DemlBuilder):
    """Fashion-MNIST from the official idx files; seen / unseen classes."""

    name = 'deml_fashion_mnist'
    BUILDER_CONFIG_CLASS = FashionMnistConfig
    DESCRIPTION = 'Fashion-MNIST, upscaled, class-disjoint split (5 seen / 5 unseen default).'
    ENCODING = 'png'
    MANUAL_DOWNLOAD_INSTRUCTIONS = SOURCE_NOTE

    def __init__(self, *, expected_counts='official', **kwargs):
        super().__init__(expected_counts=expected_counts, **kwargs)
        if expected_counts == 'official':  # depends on the class split
            seen = parse_train_classes(self.builder_config.train_classes)
            unseen = NUM_CLASSES - len(seen)
            self.expected_counts = {'train': (len(seen), PER_CLASS['train'] * len(seen)),
                                    'test': (unseen, PER_CLASS['t10k'] * unseen)}

    def _list_splits(self, manual_dir):
        size = int(self.builder_config.image_size)
        if size < 8:
            raise ValueError(f'fashion_mnist: image_size must be >= 8; got {size}')
        seen = set(parse_train_classes(self.builder_config.train_classes))
        self._images = {}
        splits = {'train': [], 'test': []}
        for part, split, keep in (('train', 'train', True), ('t10k', 'test', False)):
            img_path = find_file(manual_dir, FILES[(part, 'images')])
            lab_path = find_file(manual_dir, FILES[(part, 'labels')])
            images, labels = read_idx(img_path, 'images'), read_idx(lab_path, 'labels')
            if len(images) != len(labels):
                raise ValueError(f'fashion_mnist: {img_path!r} holds {len(images)} images but '
                                 f'{lab_path!r} {len(labels)} labels. ' + SOURCE_NOTE)
            if labels.size and labels.max() >= NUM_CLASSES:
                raise ValueError(f'fashion_mnist: {lab_path!r} holds label {int(labels.max())}; '
                                 f'expected 0-{NUM_CLASSES - 1}. ' + SOURCE_NOTE)
            if self.expected_counts is not None and len(images) != OFFICIAL_IMAGES[part]:
                raise ValueError(f'fashion_mnist: {img_path!r} holds {len(images)} images; the '
                                 f'official file holds {OFFICIAL_IMAGES[part]}. ' + SOURCE_NOTE)
            for i, (img, label) in enumerate(zip(images, labels)):
                label = int(label)
                if (label in seen) != keep:
                    continue
                key = f'{part}/{i:05d}_{label}.png'
                g = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
                self._images[key] = cv2.imencode('.png', np.repeat(g[..., None], 3, 2))[1].tobytes()
                splits[split].append(base.Record(key, label, key))
        return splits

    def _read(self, record):
        return self._images.get(record.path)
