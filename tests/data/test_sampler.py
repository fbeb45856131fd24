"""PKSampler invariants, checked with plain loops against the written spec."""

import numpy as np
import pytest

from deml_jax.data.sampler import PKSampler


def make_labels(counts, seed=0):
    """Shuffled labels with counts[c] examples of class 10 + 3c (non-contiguous ids)."""
    labels = np.concatenate([np.full(n, 10 + 3 * c) for c, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


CONFIGS = [  # (class counts, P, K, devices)
    ([5] * 30, 26, 2, 2),  # the released layout: 2 devices x 13 x 2
    ([3, 1, 4, 6, 2, 5, 7, 3, 2, 4, 9], 4, 3, 4),  # some classes have < K
    ([8] * 17, 6, 4, 3),
    ([2] * 8, 8, 2, 1),
]


@pytest.mark.parametrize('counts,P,K,D', CONFIGS)
def test_plan_layout_whole_classes_adjacent(counts, P, K, D):
    labels = make_labels(counts)
    s = PKSampler(labels, classes_per_batch=P, images_per_class=K, num_devices=D, seed=3)
    for step in range(25):
        plan = s.global_plan(step)
        assert plan.shape == (D, P // D * K) and plan.dtype == np.int64
        seen = set()
        for d in range(D):
            groups = labels[plan[d]].reshape(P // D, K)
            for g, idx in zip(groups, plan[d].reshape(P // D, K)):
                assert len(set(g.tolist())) == 1  # K adjacent of one class
                c = int(g[0])
                assert c not in seen  # whole class on one device
                seen.add(c)
                n_c = int((labels == c).sum())
                if n_c >= K:  # no replacement unless needed
                    assert len(set(idx.tolist())) == K
        assert len(seen) == P


@pytest.mark.parametrize('counts,P,K,D', CONFIGS)
def test_pass_coverage_and_class_order_spec(counts, P, K, D):
    labels = make_labels(counts)
    classes = np.unique(labels)
    s = PKSampler(labels, classes_per_batch=P, images_per_class=K, num_devices=D, seed=11)
    spp = len(classes) // P
    assert s.steps_per_pass == spp
    for p in range(3):
        used = []
        perm = np.random.default_rng((11, p)).permutation(len(classes))
        for i in range(spp):
            step = p * spp + i
            cls = labels[s.global_plan(step)].reshape(-1)[::K]
            np.testing.assert_array_equal(cls, classes[perm[i * P : (i + 1) * P]])
            used += cls.tolist()
        assert len(used) == len(set(used)) == spp * P  # no class twice per pass


def test_images_follow_spec_rng():
    labels = make_labels([3, 1, 4, 6, 2, 5])
    s = PKSampler(labels, classes_per_batch=2, images_per_class=3, num_devices=1, seed=5)
    for step in range(12):
        plan = s.global_plan(step).reshape(-1, 3)
        for idx in plan:
            c = int(labels[idx[0]])
            members = np.flatnonzero(labels == c)  # ascending index order
            ref = np.random.default_rng((5, step, c)).choice(members, 3, replace=len(members) < 3)
            np.testing.assert_array_equal(idx, ref)


def test_deterministic_any_call_order_and_seed_dependent():
    labels = make_labels([4] * 20)
    kw = dict(classes_per_batch=6, images_per_class=2, num_devices=3)
    a = PKSampler(labels, seed=1, **kw)
    b = PKSampler(labels.copy(), seed=1, **kw)
    c = PKSampler(labels, seed=2, **kw)
    steps = list(range(40))
    forward = [a.global_plan(t) for t in steps]
    backward = [b.global_plan(t) for t in reversed(steps)][::-1]
    for x, y in zip(forward, backward):
        np.testing.assert_array_equal(x, y)
    assert any((c.global_plan(t) != forward[t]).any() for t in steps)


@pytest.mark.parametrize('pc', [1, 2, 4])
def test_union_of_host_slices_is_global_plan(pc):
    labels = make_labels([5] * 30)
    s = PKSampler(labels, classes_per_batch=16, images_per_class=2, num_devices=8, seed=0)
    for step in range(10):
        parts = [s.host_plan(step, p, pc) for p in range(pc)]
        assert all(x.shape == (8 // pc, 4) for x in parts)
        np.testing.assert_array_equal(np.concatenate(parts), s.global_plan(step))


def test_global_batch_is_the_same_on_any_device_count():
    """The loss-group geometry (§2.2): the flattened global plan does not depend on
    the device count, and each loss group (a contiguous block of P/G classes) holds
    whole classes of K adjacent images, even when devices split a class."""
    labels = make_labels([5] * 30)
    P, K, G = 8, 2, 2
    plans = {
        D: PKSampler(labels, classes_per_batch=P, images_per_class=K, num_devices=D, seed=4,
                     num_groups=G)
        for D in (1, 2, 4, 8, 16)
    }
    for step in range(12):
        ref = plans[1].global_plan(step).reshape(-1)
        for D, s in plans.items():
            plan = s.global_plan(step)
            assert plan.shape == (D, P * K // D)
            np.testing.assert_array_equal(plan.reshape(-1), ref)
        group_labels = labels[ref].reshape(G, P // G, K)
        assert (group_labels == group_labels[..., :1]).all()  # K adjacent of one class
        per_group = [set(g[:, 0].tolist()) for g in group_labels]
        assert all(len(c) == P // G for c in per_group)  # whole, distinct classes
        assert not per_group[0] & per_group[1]


@pytest.mark.parametrize('D,pc', [(16, 2), (16, 4), (8, 8), (4, 2)])
def test_host_slices_when_devices_split_classes(D, pc):
    """16 images on 16 devices: one image per device, half a class each."""
    labels = make_labels([5] * 30)
    s = PKSampler(labels, classes_per_batch=8, images_per_class=2, num_devices=D, seed=2)
    for step in range(6):
        parts = [s.host_plan(step, p, pc) for p in range(pc)]
        assert all(x.shape == (D // pc, 16 // D) for x in parts)
        np.testing.assert_array_equal(np.concatenate(parts), s.global_plan(step))


def test_errors_name_the_values():
    labels = make_labels([4] * 10)
    with pytest.raises(ValueError, match=r'5 x 1 images must be divisible by num_devices \(2\)'):
        PKSampler(labels, classes_per_batch=5, images_per_class=1, num_devices=2, seed=0)
    with pytest.raises(ValueError, match=r'classes_per_batch \(5\).*num_groups \(2\)'):
        PKSampler(labels, classes_per_batch=5, images_per_class=2, num_devices=2, seed=0,
                  num_groups=2)
    with pytest.raises(ValueError, match='exceeds the number of classes'):
        PKSampler(labels, classes_per_batch=12, images_per_class=2, num_devices=2, seed=0)
    with pytest.raises(ValueError, match='images_per_class'):
        PKSampler(labels, classes_per_batch=2, images_per_class=0, num_devices=2, seed=0)
    with pytest.raises(ValueError, match='1-D integer'):
        PKSampler(
            labels.astype(float), classes_per_batch=2, images_per_class=2, num_devices=2, seed=0
        )
    s = PKSampler(labels, classes_per_batch=4, images_per_class=2, num_devices=4, seed=0)
    with pytest.raises(ValueError, match='divisible by process_count'):
        s.host_plan(0, 0, 3)
    with pytest.raises(ValueError, match='process_index'):
        s.host_plan(0, 2, 2)
