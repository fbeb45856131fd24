"""Shared machinery of our TFDS builders (no TensorFlow, no download).

Every builder lists its examples as ``Record``s per split from the manual
directory, and this module does the rest: the count assertions, the optional
class-disjoint validation carve-out, the readability check of every image,
the optional offline preprocessing of docs/reference.md §2.1 and the writing
of ``{'image', 'label', 'file_name', 'id'}`` examples in array_record format.

Stored example (the convention the trainer and the evaluator rely on):
  image      encoded 3-channel image (original bytes when they decode to
             3 channels and no resizing is asked, else re-encoded)
  label      int64, ORIGINAL dataset class id, 0-based (CUB class 1 -> 0)
  file_name  str, path relative to the dataset root
  id         int64, position in the split (records are written in order,
             ``disable_shuffling=True``, so ``source[i]['id'] == i``)
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import tarfile
import zipfile
from typing import Mapping, NamedTuple

import cv2
import numpy as np
from absl import logging as absl_logging
from etils import epath
import tensorflow_datasets as tfds

# docs/reference.md §2.1: Lifted-Struct preprocessing, square 256 x 256.
RESIZE_PAD_DEFAULT = 256
# Quality of re-encoded JPEGs (only when we must re-encode); a high value so
# that re-encoding adds little loss. Our choice, not from the released code.
JPEG_QUALITY = 95


class Record(NamedTuple):
    """One image of the official lists: where to read it and its class."""

    path: str  # absolute path on disk (or a key for `read_bytes`)
    label: int  # original class id, 0-based
    file_name: str  # path relative to the dataset root, as stored


@dataclasses.dataclass
class DemlConfig(tfds.core.BuilderConfig):
    """Options that change the stored data (hence part of the config name).

    val_classes: the LAST `val_classes` training classes (by class id) move to
      a class-disjoint 'val' split; 0 = no 'val' split.
    resize_pad: None, or S: aspect-preserving resize so the long side is S,
      then zero padding, centred, to S x S (docs/reference.md §2.1).
    """

    val_classes: int = 0
    resize_pad: int | None = None


def config_name(val_classes: int = 0, resize_pad: int | None = None, prefix: str = '') -> str:
    """Config name encoding the options, e.g. 'default', 'val20_pad256'."""
    parts = [prefix] if prefix else []
    if val_classes:
        parts.append(f'val{int(val_classes)}')
    if resize_pad:
        parts.append(f'pad{int(resize_pad)}')
    return '_'.join(parts) or 'default'


def locate(
    manual_dir: str, rel_path: str, *, archive: str | None, extract_root: str, what: str
) -> str:
    """Path of `rel_path`, found extracted or extracted now from `archive`.

    Looks in `manual_dir`, then in `extract_root` (earlier extractions); if
    only the official `archive` (.tgz/.tar/.zip) lies in `manual_dir`, it is
    extracted into `extract_root` (never into the user's manual directory).
    Raises FileNotFoundError naming the file, the archive and the directory.
    """
    for root in (manual_dir, extract_root):
        if os.path.exists(os.path.join(root, rel_path)):
            return os.path.join(root, rel_path)
    arch = os.path.join(manual_dir, archive) if archive else None
    if arch and os.path.isfile(arch):
        os.makedirs(extract_root, exist_ok=True)
        if arch.endswith('.zip'):
            with zipfile.ZipFile(arch) as z:
                z.extractall(extract_root)
        else:
            with tarfile.open(arch) as t:
                t.extractall(extract_root, filter='data')
        if os.path.exists(os.path.join(extract_root, rel_path)):
            return os.path.join(extract_root, rel_path)
    raise FileNotFoundError(
        f'{what}: expected {rel_path!r}'
        + (f' (or the archive {archive!r} containing it)' if archive else '')
        + f' in manual_dir {os.path.abspath(manual_dir)!r}; not found. See '
        'docs/datasets.md for the official layout.'
    )


def read_lines(path: str, *, skip: int = 0) -> list[list[str]]:
    """Whitespace-split non-empty lines of a text list, after `skip` lines."""
    with open(path, encoding='utf-8') as f:
        lines = f.read().splitlines()[skip:]
    return [line.split() for line in lines if line.strip()]


def resize_pad(image: np.ndarray, size: int = RESIZE_PAD_DEFAULT) -> np.ndarray:
    """Long side -> `size` keeping the aspect, zero-pad centred to size x size.

    docs/reference.md §2.1 (Lifted-Struct preprocessing, zero padding per the
    DeML README). The short side becomes max(1, round(short * size / long));
    padding top/left = (size - h) // 2, the rest bottom/right. INTER_AREA when
    shrinking (closest to MATLAB's antialiased imresize), INTER_LINEAR when
    enlarging. uint8 [H, W, 3] -> uint8 [size, size, 3].
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    out = np.zeros((size, size, 3), np.uint8)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = resized
    return out


def encode_checked(data: bytes | None, *, resize: int | None, ext: str = '.jpg') -> bytes | None:
    """Encoded 3-channel image ready to store, or None if undecodable.

    Keeps the original bytes when they already decode to uint8 H x W x 3 and no
    resizing is asked (no re-encoding loss); otherwise decodes as Caffe does
    (cv2 colour decode, docs/reference.md §2.3) and re-encodes with `ext`.
    """
    if not data:
        return None
    buf = np.frombuffer(data, np.uint8)
    raw = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if raw is None:
        return None
    if resize is None and raw.dtype == np.uint8 and raw.ndim == 3 and (raw.shape[2] == 3):
        return data
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    if resize is not None:
        bgr = resize_pad(bgr, resize)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if ext == '.jpg' else []
    return cv2.imencode(ext, bgr, params)[1].tobytes()


def read_file_bytes(path: str) -> bytes | None:
    """File content, or None when the file is missing or unreadable."""
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError:
        return None


def carve_val(splits: Mapping[str, list[Record]], val_classes: int) -> dict[str, list[Record]]:
    """Move the last `val_classes` training classes (by id) to 'val'."""
    out = dict(splits)
    if not val_classes:
        return out
    classes = sorted({r.label for r in splits['train']})
    if not 0 < val_classes < len(classes):
        raise ValueError(
            f'val_classes must be in [0, {len(classes)}) (the number '
            f'of training classes); got {val_classes}'
        )
    held = set(classes[-val_classes:])
    out['train'] = [r for r in splits['train'] if r.label not in held]
    out['val'] = [r for r in splits['train'] if r.label in held]
    return out


def check_counts(
    splits: Mapping[str, list[Record]], expected: Mapping[str, tuple[int, int]] | None, name: str
):
    """Assert (num_classes, num_images) per split of the official lists."""
    if expected is None:
        return
    for split, (n_cls, n_img) in expected.items():
        recs = splits.get(split, [])
        got = (len({r.label for r in recs}), len(recs))
        if got != (n_cls, n_img):
            raise ValueError(
                f'{name} split {split!r}: expected {n_cls} classes / {n_img} images '
                f'(the official benchmark), found {got[0]} / {got[1]}. The manual '
                'directory is incomplete or not the official release.'
            )


class UnreadableImageError(RuntimeError):
    """Some listed images could not be read or decoded (paths in message)."""


def verbose() -> bool:
    """Library chatter (TFDS progress bars and notices) on: absl --verbosity >= 0."""
    return absl_logging.get_verbosity() >= absl_logging.INFO


class DemlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our builders: subclasses implement `_list_splits` only.

    Constructor options (besides TFDS's data_dir / config / version):
      allow_skip_unreadable: skip (and count, in `self.unreadable`) images that
        cannot be read or decoded instead of failing the build.
      expected_counts: 'official' (default) asserts the benchmark's
        {split: (classes, images)}; None disables it (tests on tiny archives).
    """

    VERSION = tfds.core.Version('1.0.0')
    BUILDER_CONFIG_CLASS = DemlConfig
    DESCRIPTION = ''
    ENCODING = 'jpeg'  # stored format when we re-encode
    NEEDS_MANUAL_DIR = True
    EXPECTED_COUNTS: Mapping[str, tuple[int, int]] | None = None

    def __init__(
        self, *, allow_skip_unreadable: bool = False, expected_counts='official', **kwargs
    ):
        kwargs.setdefault('config', self.BUILDER_CONFIG_CLASS(name='default'))
        self.allow_skip_unreadable = bool(allow_skip_unreadable)
        self.expected_counts = (
            self.EXPECTED_COUNTS if expected_counts == 'official' else expected_counts
        )
        self.unreadable: dict[str, list[str]] = {}
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's default probes `importlib_resources` (not installed here) for
        # builders defined in packages; the plain file path is all it needs.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format=self.ENCODING),
                'label': np.int64,
                'file_name': tfds.features.Text(),
                'id': np.int64,
            }
        )
        # Records keep the official list order so that 'id' = position.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=features,
            supervised_keys=('image', 'label'),
            disable_shuffling=True,
        )

    def _list_splits(self, manual_dir: str | None) -> dict[str, list[Record]]:
        raise NotImplementedError

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and
    # "... downloaded and prepared" (nothing is downloaded): one line of ours
    # instead, TFDS's own behind --verbosity=0 (INFO) or more.
    def _log_download_bytes(self) -> None:
        if verbose():
            super()._log_download_bytes()
        else:
            print(f'building {self.name}/{self.builder_config.name} into {self.data_dir} '
                  '(nothing is downloaded)', file=sys.stderr, flush=True)

    def _log_download_done(self) -> None:
        if verbose():
            super()._log_download_done()

    @property
    def extract_root(self) -> str:
        """Where official archives are extracted (under data_dir, not manual)."""
        return os.path.join(os.fspath(self._data_dir_root), 'downloads', 'extracted', self.name)

    def _read(self, record: Record) -> bytes | None:
        return read_file_bytes(record.path)

    def _split_generators(self, dl_manager):
        manual_dir = None
        if self.NEEDS_MANUAL_DIR:
            manual_dir = os.fspath(dl_manager._manual_dir)  # pylint: disable=protected-access
            if not os.path.isdir(manual_dir):
                raise FileNotFoundError(
                    f'{self.name}: manual_dir {manual_dir!r} does not exist. '
                    f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}'
                )
        splits = self._list_splits(manual_dir)
        check_counts(splits, self.expected_counts, self.name)
        splits = carve_val(splits, self.builder_config.val_classes)
        return {k: self._generate_examples(v, k) for k, v in splits.items()}

    def _generate_examples(self, records: list[Record], split: str):
        ext = '.png' if self.ENCODING == 'png' else '.jpg'
        bad, i = [], 0
        for rec in records:
            data = encode_checked(self._read(rec), ext=ext, resize=self.builder_config.resize_pad)
            if data is None:
                bad.append(rec.path)
                continue
            yield i, {'image': data, 'label': rec.label, 'file_name': rec.file_name, 'id': i}
            i += 1
        self.unreadable[split] = bad
        if bad and not self.allow_skip_unreadable:
            raise UnreadableImageError(
                f'{self.name} split {split!r}: {len(bad)} unreadable image(s): '
                f'{bad[:20]}{" ..." if len(bad) > 20 else ""}. Nothing was written; '
                'fix the files or pass allow_skip_unreadable=True '
                '(--allow_skip_unreadable) to skip and count them.'
            )
