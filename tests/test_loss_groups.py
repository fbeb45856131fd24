"""Loss groups (deml_jax/loss_groups.py) on the 8 fake CPU devices of conftest.py.

A toy objective with outputs on different batch axes (one inside a tuple) is
run through ``grouped_objective`` under pmap on 1, 2, 4 devices; the averaged
gradient must equal that of a plain single-device function that slices the
global batch into the groups by hand (no collectives, no loss_groups code).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deml_jax import loss_groups, parallel

GLOBAL = 8  # images in the global batch


def outputs(w, x):
    """'emb' [B, 3] (batch axis 0) and 'pair' ([2, B],) (batch axis 1)."""
    return {"emb": x * w, "pair": (jnp.stack([x @ w, 2.0 * (x @ w) ** 2]),)}


AXES = {"emb": 0, "pair": 1}


def objective(o, labels, key=None):
    """Depends non-linearly on the group's rows, so grouping changes the value."""
    e = o["emb"]
    centre = jnp.mean(e, axis=0)
    loss = jnp.mean(jnp.sum((e - centre) ** 2, -1) * (labels + 1.0)) + jnp.mean(o["pair"][0][1])
    aux = {"centre_norm": jnp.sum(centre ** 2)}
    if key is not None:
        aux["draw"] = jax.random.uniform(key)
    return loss, aux


def reference(w, x, labels, groups):
    """Mean of the group losses on the whole batch, groups sliced by hand."""
    size = len(labels) // groups
    losses = [objective(outputs(w, x[g * size:(g + 1) * size]),
                        labels[g * size:(g + 1) * size])[0] for g in range(groups)]
    return sum(losses) / groups


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(GLOBAL, 3)).astype(np.float32)
    labels = rng.integers(0, 3, GLOBAL).astype(np.float32)
    w = rng.normal(size=(3,)).astype(np.float32)
    return w, x, labels


def run(scope, groups, devices, w, x, labels, key=None):
    layout = loss_groups.make_layout(scope, groups, devices)

    def step(w, x, labels):
        def loss_fn(w):
            return loss_groups.grouped_objective(
                objective, outputs(w, x), labels, batch_axes=AXES, layout=layout, key=key)
        (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(w)
        return parallel.tree_pmean((loss, aux, grad))

    fn = jax.pmap(step, axis_name=parallel.AXIS, devices=jax.devices()[:devices],
                  in_axes=(None, 0, 0))
    shard = lambda a: a.reshape((devices, -1) + a.shape[1:])
    loss, aux, grad = fn(w, shard(x), shard(labels))
    return float(loss[0]), jax.tree.map(lambda a: float(a[0]), aux), np.asarray(grad[0])


@pytest.mark.parametrize("scope,groups,devices,ref_groups", [
    ("groups", 2, 1, 2),  # 2 groups on one device (the released batch on 1 GPU)
    ("groups", 2, 2, 2),  # one group per device (the released 2 GPUs)
    ("groups", 2, 4, 2),  # devices gather: 2 images a device, a group spans 2 devices
    ("groups", 4, 2, 4),  # 2 groups on each device
    ("groups", 1, 4, 1),  # one group gathered from 4 devices
    ("device", 2, 4, 4),  # one group per device, loss_groups ignored
    ("global", 2, 4, 1),  # one group: the global batch
])
def test_grouped_gradient_equals_the_hand_sliced_reference(scope, groups, devices, ref_groups):
    w, x, labels = data()
    loss, _, grad = run(scope, groups, devices, w, x, labels)
    ref_loss, ref_grad = jax.value_and_grad(functools.partial(reference, groups=ref_groups))(
        w, x, labels)
    np.testing.assert_allclose(loss, float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(grad, np.asarray(ref_grad), rtol=1e-5, atol=1e-5)


def test_grouping_changes_the_value():
    """The reference itself must tell 1 group from 2 (else the test above is void)."""
    w, x, labels = data()
    assert abs(float(reference(w, x, labels, 1)) - float(reference(w, x, labels, 2))) > 1e-3


def test_group_keys_and_aux_do_not_depend_on_the_device_count():
    w, x, labels = data(1)
    key = jax.random.PRNGKey(3)
    results = [run("groups", 2, d, w, x, labels, key=key) for d in (1, 2, 4)]
    for loss, aux, _ in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-5)
        for k in ("centre_norm", "draw"):
            np.testing.assert_allclose(aux[k], results[0][1][k], rtol=1e-5)
    # the two groups drew differently: their mean is not one group's draw
    draws = [float(jax.random.uniform(jax.random.fold_in(key, g))) for g in (0, 1)]
    np.testing.assert_allclose(results[0][1]["draw"], np.mean(draws), rtol=1e-5)
    assert abs(draws[0] - draws[1]) > 1e-3


def test_layouts_and_errors_name_the_keys():
    assert loss_groups.make_layout("groups", 2, 1).local_groups == 2
    assert loss_groups.make_layout("groups", 2, 8).gather
    assert loss_groups.make_layout("groups", 2, 2) == loss_groups.GroupLayout(
        "groups", 2, 2, 1, False)
    with pytest.raises(ValueError, match=r"loss_groups=2 and 3 devices.*global_batch_size=52"):
        loss_groups.make_layout("groups", 2, 3, 52, 2)
    with pytest.raises(ValueError, match=r"global_batch_size=52.*6 devices"):
        loss_groups.make_layout("groups", 2, 6, 52, 2)  # 52 images do not split over 6
    with pytest.raises(ValueError, match=r"multiple of 4 x images_per_class"):
        loss_groups.make_layout("groups", 4, 2, 52, 2)  # 13 images a group: half a class
    with pytest.raises(ValueError, match="config.parallel.loss_scope"):
        loss_groups.make_layout("host", 2, 2)
    with pytest.raises(ValueError, match="config.parallel.loss_groups"):
        loss_groups.make_layout("groups", 0, 2)
    assert loss_groups.classes_per_group(52, 2, 2) == 13  # the released 2 x (13 x 2)
