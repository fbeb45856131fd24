"""Tiny fake datasets in the EXACT official layouts, written by the tests."""

import os

import cv2
import numpy as np
import pytest
import scipy.io


def write_jpg(path, seed, size=(12, 10)):
    """A small random JPEG; returns what OpenCV decodes from it (BGR)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, size + (3,), np.uint8)
    assert cv2.imwrite(path, img)
    return cv2.imread(path, cv2.IMREAD_COLOR)


@pytest.fixture
def cub_dir(tmp_path):
    """CUB_200_2011/ with classes 1, 2 (train) and 101, 102 (test), 2 images each."""
    root = tmp_path / 'manual' / 'CUB_200_2011'
    classes = {
        1: '001.Black_footed_Albatross',
        2: '002.Laysan_Albatross',
        101: '101.White_Pelican',
        102: '102.Western_Wood_Pewee',
    }
    images, labels = [], []
    for cls, folder in classes.items():
        for k in range(2):
            rel = f'{folder}/{folder[4:]}_{cls:04d}_{k}.jpg'
            images.append(rel)
            labels.append(cls)
            write_jpg(str(root / 'images' / rel), seed=cls * 10 + k)
    (root / 'images.txt').write_text(''.join(f'{i + 1} {r}\n' for i, r in enumerate(images)))
    (root / 'image_class_labels.txt').write_text(
        ''.join(f'{i + 1} {c}\n' for i, c in enumerate(labels))
    )
    (root / 'classes.txt').write_text(''.join(f'{c} {f}\n' for c, f in classes.items()))
    return tmp_path / 'manual'


def _annos(rows):
    """MATLAB struct array 1 x N like cars_*_annos.mat 'annotations'."""
    dt = [
        ('bbox_x1', 'O'),
        ('bbox_y1', 'O'),
        ('bbox_x2', 'O'),
        ('bbox_y2', 'O'),
        ('class', 'O'),
        ('fname', 'O'),
    ]
    arr = np.zeros((1, len(rows)), dtype=dt)
    for i, (fname, cls) in enumerate(rows):
        arr[0, i] = (np.uint8(1), np.uint8(1), np.uint8(9), np.uint8(7), np.uint8(cls), fname)
    return arr


@pytest.fixture
def cars_dir(tmp_path):
    """Official Cars release: cars_train/, cars_test/, devkit/, test annos."""
    man = tmp_path / 'manual'
    train = [('00001.jpg', 1), ('00002.jpg', 99), ('00003.jpg', 1)]
    test = [('00001.jpg', 2), ('00002.jpg', 100)]
    for folder, rows in (('cars_train', train), ('cars_test', test)):
        for i, (f, _) in enumerate(rows):
            write_jpg(str(man / folder / f), seed=len(folder) * 10 + i)
    (man / 'devkit').mkdir(parents=True)
    names = np.array([f'Car {i}' for i in range(1, 197)], dtype=object)
    scipy.io.savemat(str(man / 'devkit' / 'cars_meta.mat'), {'class_names': names.reshape(1, -1)})
    scipy.io.savemat(str(man / 'devkit' / 'cars_train_annos.mat'), {'annotations': _annos(train)})
    scipy.io.savemat(str(man / 'cars_test_annos_withlabels.mat'), {'annotations': _annos(test)})
    return man


@pytest.fixture
def sop_dir(tmp_path):
    """Stanford_Online_Products/ with Ebay_train.txt / Ebay_test.txt."""
    root = tmp_path / 'manual' / 'Stanford_Online_Products'
    header = 'image_id class_id super_class_id path\n'
    rows = {
        'train': [
            (1, 1, 'bicycle_final/111085122871_0.JPG'),
            (2, 1, 'bicycle_final/111085122871_1.JPG'),
            (3, 2, 'bicycle_final/111265328556_0.JPG'),
        ],
        'test': [
            (4, 3, 'cabinet_final/111278535551_0.JPG'),
            (5, 4, 'chair_final/111282315220_0.JPG'),
            (6, 4, 'chair_final/111282315220_1.JPG'),
        ],
    }
    for split, lst in rows.items():
        for image_id, cls, rel in lst:
            write_jpg(str(root / rel), seed=image_id)
        sup = {'bicycle': 1, 'cabinet': 2, 'chair': 3}
        (root / f'Ebay_{split}.txt').write_text(
            header + ''.join(f'{i} {c} {sup[r.split("_")[0]]} {r}\n' for i, c, r in lst)
        )
    return tmp_path / 'manual'


@pytest.fixture
def inshop_dir(tmp_path):
    """list_eval_partition.txt (2 header lines) and img/..."""
    man = tmp_path / 'manual'
    rows = [
        ('img/WOMEN/Dresses/id_00000002/02_1_front.jpg', 'id_00000002', 'train'),
        ('img/WOMEN/Dresses/id_00000002/02_2_side.jpg', 'id_00000002', 'train'),
        ('img/MEN/Denim/id_00000080/01_1_front.jpg', 'id_00000080', 'query'),
        ('img/MEN/Denim/id_00000080/01_2_side.jpg', 'id_00000080', 'gallery'),
        ('img/MEN/Denim/id_00000081/01_1_front.jpg', 'id_00000081', 'gallery'),
    ]
    for i, (rel, _, _) in enumerate(rows):
        write_jpg(str(man / rel), seed=i)
    body = ''.join(f'{r:<60}{i:<16}{s}\n' for r, i, s in rows)
    (man / 'list_eval_partition.txt').write_text(
        f'{len(rows)}\nimage_name item_id evaluation_status\n' + body
    )
    return man


@pytest.fixture
def folder_dir(tmp_path):
    """root/<class>/ images: 4 classes x 3 PNG images of 24 x 24."""
    root = tmp_path / 'folders'
    for c, name in enumerate(['ant', 'bee', 'cat', 'dog']):
        (root / name).mkdir(parents=True)
        for k in range(3):
            img = np.random.default_rng(c * 10 + k).integers(0, 256, (24, 24, 3), np.uint8)
            cv2.imwrite(str(root / name / f'{k}.png'), img)
    return root
