"""Fashion-MNIST builder on small fake idx files written here (no download)."""

import gzip
import os
import struct

import numpy as np
import pytest

from deml_jax.data import builders, prepare

IMG = {'train': 'train-images-idx3-ubyte', 't10k': 't10k-images-idx3-ubyte'}
LAB = {'train': 'train-labels-idx1-ubyte', 't10k': 't10k-labels-idx1-ubyte'}


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format written by hand: 0, 0, 0x08 (uint8), ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(struct.pack('>I', d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_set(folder, *, gz=True):
    """train: 2 images per class 0-9 (labels 0..9, 0..9); t10k: 1 per class (9..0)."""
    rng = np.random.default_rng(0)
    data = {'train': np.tile(np.arange(10), 2), 't10k': np.arange(10)[::-1].copy()}
    out = {}
    for part, labels in data.items():
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        out[part] = (images, labels)
        for stem, arr in ((IMG[part], images), (LAB[part], labels)):
            raw = idx_bytes(arr)
            if gz:
                with gzip.open(os.path.join(folder, stem + '.gz'), 'wb') as f:
                    f.write(raw)
            else:
                with open(os.path.join(folder, stem), 'wb') as f:
                    f.write(raw)
    return out


@pytest.fixture
def fashion_dir(tmp_path):
    d = tmp_path / 'fashion'
    d.mkdir()
    return d, fake_set(str(d))


def build(manual, tmp_path, **opts):
    opts.setdefault('expected_counts', None)  # tiny fakes: counts relaxed
    return builders.prepare('fashion_mnist', str(manual), str(tmp_path / 'tfds'), **opts)


def rows(builder, split):
    src = builder.as_data_source(split)
    return [src[i] for i in range(len(src))]


def test_default_split_labels_and_pixels(fashion_dir, tmp_path):
    manual, data = fashion_dir
    b = build(manual, tmp_path, image_size=28)  # 28 -> 28: pixels unchanged
    assert set(b.info.splits) == {'train', 'test'}
    train, test = rows(b, 'train'), rows(b, 'test')
    # train: the official training file's images of classes 0-4, in file order
    want_train = [i for i, y in enumerate(data['train'][1]) if y < 5]
    assert [int(r['label']) for r in train] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    # test: the official test file's images of classes 5-9 (file order 9, 8, ..., 5)
    want_test = [i for i, y in enumerate(data['t10k'][1]) if y >= 5]
    assert [int(r['label']) for r in test] == [9, 8, 7, 6, 5]
    for recs, part, idx in ((train, 'train', want_train), (test, 't10k', want_test)):
        for r, i in zip(recs, idx):
            assert r['image'].shape == (28, 28, 3)
            for c in range(3):
                np.testing.assert_array_equal(r['image'][..., c], data[part][0][i])
    np.testing.assert_array_equal(np.load(os.path.join(b.data_dir, 'labels_test.npy')),
                                  [9, 8, 7, 6, 5])


def test_default_size_and_plain_idx_files(tmp_path):
    manual = tmp_path / 'plain'
    manual.mkdir()
    fake_set(str(manual), gz=False)  # already decompressed files are read too
    b = build(manual, tmp_path)
    assert os.path.basename(os.path.dirname(b.data_dir)) == 'default'
    assert rows(b, 'test')[0]['image'].shape == (64, 64, 3)


def test_configurable_split_and_validation(fashion_dir, tmp_path):
    manual, _ = fashion_dir
    b = build(manual, tmp_path, train_classes=('1', '3', '5', '7'), val_classes=1,
              image_size=16)
    assert os.path.basename(os.path.dirname(b.data_dir)) == 'size16_seen1357_val1'
    assert sorted({int(r['label']) for r in rows(b, 'train')}) == [1, 3, 5]
    assert [int(r['label']) for r in rows(b, 'val')] == [7, 7]  # the last seen class
    assert [int(r['label']) for r in rows(b, 'test')] == [9, 8, 6, 4, 2, 0]


def test_official_counts_asserted(fashion_dir, tmp_path):
    manual, _ = fashion_dir
    with pytest.raises(ValueError, match=r'train-images-idx3-ubyte\.gz.*holds 20 images.*60000'):
        build(manual, tmp_path, expected_counts='official')


def test_missing_file_says_where_files_come_from(fashion_dir, tmp_path):
    manual, _ = fashion_dir
    os.remove(manual / 't10k-labels-idx1-ubyte.gz')
    with pytest.raises(FileNotFoundError) as err:
        build(manual, tmp_path)
    msg = str(err.value)
    assert 't10k-labels-idx1-ubyte.gz' in msg and 'dataset-fashion-mnist' in msg
    assert 'zalandoresearch/fashion-mnist' in msg


@pytest.mark.parametrize('damage', ['truncated', 'not_gzip', 'bad_magic'])
def test_corrupt_or_truncated_file_named(fashion_dir, tmp_path, damage):
    manual, _ = fashion_dir
    path = manual / 'train-images-idx3-ubyte.gz'
    raw = gzip.decompress(path.read_bytes())
    if damage == 'truncated':  # valid gzip of an idx whose data is cut short
        path.write_bytes(gzip.compress(raw[:-100]))
    elif damage == 'not_gzip':  # the gzip stream itself cut short
        path.write_bytes(path.read_bytes()[:40])
    else:
        path.write_bytes(gzip.compress(b'\x00\x00\x08\x01' + raw[4:]))
    with pytest.raises(ValueError, match='train-images-idx3-ubyte.gz') as err:
        build(manual, tmp_path)
    if damage == 'truncated':
        assert '(20, 28, 28) = 15680 bytes of data, found 15580' in str(err.value)


def test_bad_train_classes(fashion_dir, tmp_path):
    manual, _ = fashion_dir
    with pytest.raises(ValueError, match='train_classes'):
        build(manual, tmp_path, train_classes=('0', '12'))


def test_prepare_cli_checks_official_counts(fashion_dir, tmp_path):
    manual, _ = fashion_dir  # the CLI asserts the official 60,000 / 10,000 images
    with pytest.raises(ValueError, match='60000'):
        prepare.main(['--dataset', 'fashion_mnist', '--manual_dir', str(manual),
                      '--data_dir', str(tmp_path / 'cli'), '--train_classes', '0,1,2,3,4,5'])


def test_datasets_table_and_config():
    from configs import common
    assert common.DATASETS['fashion_mnist']['ks'] == (1, 2, 4, 8)
    c = common.get_base_config()
    common.set_dataset(c, 'fashion_mnist')
    assert (c.dataset.name, c.dataset.variant, c.eval.mode) == ('fashion_mnist', '', 'self')
