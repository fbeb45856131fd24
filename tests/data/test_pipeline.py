"""grain pipelines: shapes, purity in (seed, step), hosts, eval coverage."""

import functools
import os

import cv2
import numpy as np
import pytest

from deml_jax.data import builders, pipeline, transforms
from deml_jax.data.sampler import PKSampler

CLASSES = ['c0', 'c1', 'c2', 'c3', 'c4', 'c5', 'c6', 'c7']


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    """image_folder dataset: 8 classes x 3 PNGs 20 x 22; c0-c5 train."""
    root = tmp_path_factory.mktemp('folders')
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for k in range(3):
            img = np.random.default_rng(c * 7 + k).integers(0, 256, (20, 22, 3), np.uint8)
            cv2.imwrite(str(root / name / f'{k}.png'), img)
    data_dir = str(tmp_path_factory.mktemp('tfds'))
    builders.prepare('image_folder', None, data_dir, root=str(root), train_classes=CLASSES[:6])
    return root, data_dir


def raw(image, rng=None):
    """Identity 'transform': the decoded BGR pixels as float32."""
    return image.astype(np.float32)


def sources(prepared, split):
    return pipeline.load_source('image_folder', split, prepared[1])


def test_labels_of_matches_folders(prepared):
    src = sources(prepared, 'train')
    expected = [CLASSES.index(src[i]['file_name'].decode().split('/')[0]) for i in range(len(src))]
    np.testing.assert_array_equal(pipeline.labels_of(src), expected)


def test_train_batch_is_the_plan_decoded_bgr(prepared):
    src = sources(prepared, 'train')
    labels = pipeline.labels_of(src)
    s = PKSampler(labels, classes_per_batch=4, images_per_class=2, num_devices=2, seed=0)
    it = pipeline.train_batches(
        src,
        labels,
        s,
        start_step=0,
        process_index=0,
        process_count=1,
        transform=raw,
        seed=0,
        num_steps=3,
    )
    batches = list(it)
    assert len(batches) == 3
    for step, b in enumerate(batches):
        plan = s.global_plan(step)
        assert b['image'].shape == (2, 4, 20, 22, 3)
        assert b['image'].dtype == np.float32 and b['label'].dtype == np.int32
        np.testing.assert_array_equal(b['label'], labels[plan])
        for d, j in np.ndindex(plan.shape):
            name = src[int(plan[d, j])]['file_name'].decode()
            ref = cv2.imread(str(prepared[0] / name), cv2.IMREAD_COLOR)  # BGR
            np.testing.assert_array_equal(b['image'][d, j], ref)


def make_train(prepared, start, pi=0, pc=1, seed=5):
    src = sources(prepared, 'train')
    labels = pipeline.labels_of(src)
    s = PKSampler(labels, classes_per_batch=4, images_per_class=2, num_devices=4, seed=1)
    tf = functools.partial(transforms.caffe_train, crop=15)
    return pipeline.train_batches(
        src,
        labels,
        s,
        start_step=start,
        process_index=pi,
        process_count=pc,
        transform=tf,
        seed=seed,
        num_steps=6 - start,
    )


def test_resume_equals_continuing(prepared):
    full = list(make_train(prepared, 0))
    resumed = list(make_train(prepared, 4))
    assert len(resumed) == 2
    for a, b in zip(full[4:], resumed):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])
    other_seed = list(make_train(prepared, 4, seed=6))
    assert not np.array_equal(other_seed[0]['image'], resumed[0]['image'])


def test_hosts_together_give_the_single_host_batch(prepared):
    one = list(make_train(prepared, 0))
    two = [list(make_train(prepared, 0, pi=p, pc=2)) for p in range(2)]
    for t in range(6):
        assert two[0][t]['image'].shape[0] == 2
        for key in ('image', 'label'):
            np.testing.assert_array_equal(
                np.concatenate([two[0][t][key], two[1][t][key]]), one[t][key]
            )


@pytest.mark.parametrize('pc,per_device,local', [(1, 4, 2), (3, 2, 2), (3, 5, 1)])
def test_eval_each_image_exactly_once(prepared, pc, per_device, local):
    src = sources(prepared, 'test')
    n = len(src)
    crop = functools.partial(transforms.caffe_eval, crop=15)
    seen, counts = [], []
    for p in range(pc):
        batches = list(
            pipeline.eval_batches(
                src,
                batch_size_per_device=per_device,
                num_local_devices=local,
                process_index=p,
                process_count=pc,
                transform=crop,
            )
        )
        counts.append(len(batches))
        for b in batches:
            assert b['image'].shape == (local, per_device, 15, 15, 3)
            assert b['mask'].dtype == bool
            idx, m = b['index'][b['mask']], b['mask']
            seen += idx.tolist()
            assert (b['index'][~m] == -1).all() and (b['label'][~m] == -1).all()
            assert (b['image'][~m] == 0).all()
            for i, img, lab in zip(idx, b['image'][m], b['label'][m]):
                name = src[int(i)]['file_name'].decode()
                assert lab == CLASSES.index(name.split('/')[0])
                ref = cv2.imread(str(prepared[0] / name), cv2.IMREAD_COLOR)
                ref = ref[2:17, 3:18].astype(np.float32) - np.array([123, 117, 104])
                np.testing.assert_allclose(img, ref)  # centre crop (20-15)//2, (22-15)//2
    assert sorted(seen) == list(range(n))
    assert len(set(counts)) == 1  # all hosts, same batch count


def test_not_prepared_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match='deml_jax.data.prepare --dataset sop'):
        pipeline.load_source('sop', 'train', str(tmp_path))


def test_unknown_split(prepared):
    with pytest.raises(ValueError, match="'val'"):
        pipeline.load_source('image_folder', 'val', prepared[1])


def test_corrupt_record_is_named():
    with pytest.raises(ValueError, match='broken.jpg'):
        pipeline.decode_bgr({'image': b'garbage', 'file_name': b'broken.jpg', 'id': 3})


def test_labels_length_mismatch(prepared):
    src = sources(prepared, 'train')
    s = PKSampler(np.arange(8) % 4, classes_per_batch=2, images_per_class=2, num_devices=1, seed=0)
    with pytest.raises(ValueError, match='labels has 8 entries'):
        pipeline.train_batches(
            src,
            np.arange(8) % 4,
            s,
            start_step=0,
            process_index=0,
            process_count=1,
            transform=raw,
            seed=0,
        )


def test_worker_processes_give_the_same_batches(prepared):
    src = sources(prepared, 'train')
    labels = pipeline.labels_of(src)
    s = PKSampler(labels, classes_per_batch=2, images_per_class=2, num_devices=2, seed=3)
    tf = functools.partial(transforms.caffe_train, crop=15)
    runs = [
        list(
            pipeline.train_batches(
                src,
                labels,
                s,
                start_step=2,
                process_index=0,
                process_count=1,
                transform=tf,
                seed=0,
                num_steps=3,
                num_workers=w,
            )
        )
        for w in (0, 2)
    ]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a['image'], b['image'])
