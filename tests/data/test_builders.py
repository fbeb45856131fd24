"""Each builder on a tiny fake archive in the official layout (no download)."""

import os
import shutil
import tarfile

import cv2
import numpy as np
import pytest

from deml_jax.data import builders
from deml_jax.data.builders import base


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Any download attempt by TFDS fails the test (builders must never fetch)."""
    import tensorflow_datasets as tfds

    def refuse(*args, **kwargs):
        raise AssertionError(f'download attempted: {args} {kwargs}')

    for meth in ('download', 'download_and_extract', 'download_kaggle_data'):
        monkeypatch.setattr(tfds.download.DownloadManager, meth, refuse)


def build(name, manual, tmp_path, **opts):
    opts.setdefault('expected_counts', None)  # tiny fakes: counts relaxed
    return builders.prepare(name, str(manual) if manual else None, str(tmp_path / 'tfds'), **opts)


def read_split(builder, split):
    src = builder.as_data_source(split)
    return [src[i] for i in range(len(src))]


def labels(builder, split):
    return [int(r['label']) for r in read_split(builder, split)]


def test_cub_split_labels_and_pixels(cub_dir, tmp_path):
    b = build('cub200', cub_dir, tmp_path)
    assert set(b.info.splits) == {'train', 'test'}
    assert labels(b, 'train') == [0, 0, 1, 1]  # CUB classes 1, 2
    assert labels(b, 'test') == [100, 100, 101, 101]  # classes 101, 102
    for i, rec in enumerate(read_split(b, 'test')):
        assert int(rec['id']) == i
        path = cub_dir / 'CUB_200_2011' / 'images' / rec['file_name'].decode()
        ref = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]  # TFDS gives RGB
        np.testing.assert_array_equal(rec['image'], ref)
    np.testing.assert_array_equal(
        np.load(os.path.join(b.data_dir, 'labels_test.npy')), [100, 100, 101, 101]
    )


def test_cub_official_counts_asserted(cub_dir, tmp_path):
    with pytest.raises(ValueError, match=r'expected 100 classes / 5864 images'):
        build('cub200', cub_dir, tmp_path, expected_counts='official')


def test_cub_val_carve_out(cub_dir, tmp_path):
    b = build('cub200', cub_dir, tmp_path, val_classes=1)
    assert os.path.basename(os.path.dirname(b.data_dir)) == 'val1'
    assert labels(b, 'train') == [0, 0]
    assert labels(b, 'val') == [1, 1]  # the LAST training class
    assert labels(b, 'test') == [100, 100, 101, 101]


def test_cub_from_official_tgz(cub_dir, tmp_path):
    arch_dir = tmp_path / 'archives'
    arch_dir.mkdir()
    with tarfile.open(arch_dir / 'CUB_200_2011.tgz', 'w:gz') as t:
        t.add(cub_dir / 'CUB_200_2011', arcname='CUB_200_2011')
    b = build('cub200', arch_dir, tmp_path)
    assert labels(b, 'test') == [100, 100, 101, 101]


def test_cub_missing_file_names_file_and_dir(cub_dir, tmp_path):
    os.remove(cub_dir / 'CUB_200_2011' / 'image_class_labels.txt')
    with pytest.raises(FileNotFoundError) as err:
        build('cub200', cub_dir, tmp_path)
    assert 'image_class_labels.txt' in str(err.value)
    assert str(cub_dir) in str(err.value)


def test_missing_manual_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        build('sop', tmp_path / 'nowhere', tmp_path)


def test_corrupt_image_fails_then_skip_counts(cub_dir, tmp_path):
    bad = (
        cub_dir
        / 'CUB_200_2011'
        / 'images'
        / '002.Laysan_Albatross'
        / ('Laysan_Albatross_0002_1.jpg')
    )
    bad.write_bytes(b'not a jpeg at all')
    with pytest.raises(base.UnreadableImageError) as err:
        build('cub200', cub_dir, tmp_path)
    assert str(bad) in str(err.value) and '1 unreadable' in str(err.value)
    final = tmp_path / 'tfds' / 'deml_cub200' / 'default' / '1.0.0'
    assert not (final / 'dataset_info.json').exists()  # nothing half-written
    b = build('cub200', cub_dir, tmp_path, allow_skip_unreadable=True)
    assert b.unreadable['train'] == [str(bad)]
    assert labels(b, 'train') == [0, 0, 1]
    assert str(bad) in (final / 'unreadable.txt').read_text()


def test_resize_pad_hand_worked():
    img = np.full((8, 12, 3), 200, np.uint8)
    out = base.resize_pad(img, 16)
    # long side 12 -> 16, short 8 -> round(8 * 16 / 12) = 11; top pad (16-11)//2 = 2
    ref = np.zeros((16, 16, 3), np.uint8)
    ref[2:13, :] = 200
    np.testing.assert_array_equal(out, ref)
    tall = base.resize_pad(np.full((20, 5, 3), 7, np.uint8), 8)  # 20x5 -> 8x2
    ref = np.zeros((8, 8, 3), np.uint8)
    ref[:, 3:5] = 7
    np.testing.assert_array_equal(tall, ref)


def test_builder_resize_pad_option(cub_dir, tmp_path):
    b = build('cub200', cub_dir, tmp_path, resize_pad=32)
    assert os.path.basename(os.path.dirname(b.data_dir)) == 'pad32'
    for rec in read_split(b, 'train'):
        assert rec['image'].shape == (32, 32, 3)
        # 12 x 10 source: width 10 -> round(10 * 32 / 12) = 27, padded 2 | 3 cols
        assert rec['image'][:, :1].max() < 20 and rec['image'][:, -2:].max() < 20


def test_cars_merge_and_class_split(cars_dir, tmp_path):
    b = build('cars196', cars_dir, tmp_path)
    train, test = read_split(b, 'train'), read_split(b, 'test')
    assert [(r['file_name'].decode(), int(r['label'])) for r in train] == [
        ('cars_train/00001.jpg', 0),
        ('cars_train/00003.jpg', 0),
        ('cars_test/00001.jpg', 1),
    ]
    assert [(r['file_name'].decode(), int(r['label'])) for r in test] == [
        ('cars_train/00002.jpg', 98),
        ('cars_test/00002.jpg', 99),
    ]
    ref = cv2.imread(str(cars_dir / 'cars_test' / '00002.jpg'))[..., ::-1]
    np.testing.assert_array_equal(test[1]['image'], ref)


def test_cars_missing_test_annotations(cars_dir, tmp_path):
    os.remove(cars_dir / 'cars_test_annos_withlabels.mat')
    with pytest.raises(FileNotFoundError, match='cars_test_annos_withlabels.mat'):
        build('cars196', cars_dir, tmp_path)


def test_sop_split(sop_dir, tmp_path):
    b = build('sop', sop_dir, tmp_path)
    assert labels(b, 'train') == [0, 0, 1]
    assert labels(b, 'test') == [2, 3, 3]
    assert read_split(b, 'test')[0]['file_name'] == (b'cabinet_final/111278535551_0.JPG')


def test_sop_missing_list(sop_dir, tmp_path):
    os.remove(sop_dir / 'Stanford_Online_Products' / 'Ebay_test.txt')
    with pytest.raises(FileNotFoundError, match='Ebay_test.txt'):
        build('sop', sop_dir, tmp_path)


def test_inshop_train_query_gallery(inshop_dir, tmp_path):
    b = build('inshop', inshop_dir, tmp_path)
    assert set(b.info.splits) == {'train', 'query', 'gallery'}
    assert labels(b, 'train') == [1, 1]  # id_00000002 -> 1
    assert labels(b, 'query') == [79]
    assert labels(b, 'gallery') == [79, 80]  # shares items with query
    assert read_split(b, 'gallery')[1]['file_name'] == (b'img/MEN/Denim/id_00000081/01_1_front.jpg')


def test_inshop_missing_images(inshop_dir, tmp_path):
    shutil.rmtree(inshop_dir / 'img')
    with pytest.raises(FileNotFoundError, match=r"'img'.*img\.zip"):
        build('inshop', inshop_dir, tmp_path)


def test_image_folder_explicit_split(folder_dir, tmp_path):
    b = build('image_folder', None, tmp_path, root=str(folder_dir), train_classes=['ant', 'cat'])
    assert labels(b, 'train') == [0, 0, 0, 2, 2, 2]  # sorted folder index
    assert labels(b, 'test') == [1, 1, 1, 3, 3, 3]


def test_image_folder_fraction_split(folder_dir, tmp_path):
    b = build(
        'image_folder', None, tmp_path, root=str(folder_dir), train_fraction=0.25, split_seed=7
    )
    perm = np.random.default_rng(7).permutation(4)
    assert set(labels(b, 'train')) == {int(perm[0])}


def test_image_folder_errors(folder_dir, tmp_path):
    for f in os.listdir(folder_dir / 'bee'):
        os.remove(folder_dir / 'bee' / f)
    with pytest.raises(ValueError, match='bee.*holds no image'):
        build('image_folder', None, tmp_path, root=str(folder_dir))
    with pytest.raises(ValueError, match='zebra'):
        build('image_folder', None, tmp_path, root=str(folder_dir), train_classes=['zebra'])
    with pytest.raises(FileNotFoundError, match='root'):
        build('image_folder', None, tmp_path, root=str(tmp_path / 'none'))


def test_digits_builds_with_official_counts(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    b = builders.prepare('digits', None, str(tmp_path / 'tfds'))  # counts asserted
    train, test = read_split(b, 'train'), read_split(b, 'test')
    assert sorted(set(r['label'] for r in train)) == [0, 1, 2, 3, 4]
    assert sorted(set(r['label'] for r in test)) == [5, 6, 7, 8, 9]
    assert len(train) == int(np.sum(d.target < 5))
    assert len(test) == int(np.sum(d.target >= 5))
    img = train[0]['image']
    assert img.shape == (64, 64, 3)
    np.testing.assert_array_equal(img[..., 0], img[..., 2])  # grey
    # Block means of the upscaled image follow the 8x8 original (x 255/16).
    blocks = img[..., 0].reshape(8, 8, 8, 8).mean(axis=(1, 3))
    orig = d.images[d.target < 5][0] * 255 / 16
    assert np.corrcoef(blocks.ravel(), orig.ravel())[0, 1] > 0.9


def test_unknown_dataset_and_option(tmp_path):
    with pytest.raises(ValueError, match='cub200'):
        builders.make_builder('cub', str(tmp_path))
    with pytest.raises(TypeError, match='colour'):
        builders.make_builder('cub200', str(tmp_path), colour=1)


def test_image_folder_root_from_manual_dir(folder_dir, tmp_path):
    b = build('image_folder', folder_dir, tmp_path, train_classes=['dog', 'bee'])
    assert labels(b, 'train') == [1, 1, 1, 3, 3, 3]


def test_prepare_cli(folder_dir, tmp_path, capsys):
    from deml_jax.data import prepare

    assert (
        prepare.main(
            [
                '--dataset',
                'image_folder',
                '--root',
                str(folder_dir),
                '--data_dir',
                str(tmp_path / 'tfds'),
                '--train_classes',
                'ant,bee,cat',
                '--val_classes',
                '1',
                '--resize_pad',
                '16',
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert 'train: 6 images' in out and 'val: 3 images' in out
    assert 'test: 3 images' in out and 'skipped: 0' in out
    final = tmp_path / 'tfds' / 'deml_image_folder' / 'val1_pad16' / '1.0.0'
    np.testing.assert_array_equal(np.load(final / 'labels_val.npy'), [2, 2, 2])
