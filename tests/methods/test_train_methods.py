"""Each method end to end on the bundled digits (tiny trunk, CPU): pmap and
shard_map agree, a resumed run is bitwise the uninterrupted one, the test
split is evaluated, and the pretrained trunk lands where the method says.

DeML itself is covered by tests/test_train.py and tests/test_parallel.py; U512
is DeML(1, 1) with another config (its method module only checks that shape),
so it is left to those and to test_registry's config checks (CPU time).  ABE
runs with M = 2 learners here; where its pretrained trunks go is tested in
test_abe_method.py (it fills two trunks).
"""

import os

import chex
import jax
import numpy as np
import pytest

from deml_jax import config_lib, methods, parallel, train
from deml_jax.data import builders

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("ecaml", "cpf", "abe")
TOTAL = 4


def method_config(method, data_dir="", **overrides):
    c = config_lib.load_config(os.path.join(HERE, "method_config.py") + f":{method}")
    c.dataset.data_dir = data_dir
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    builders.prepare("digits", None, path, image_size=40, val_classes=2)
    return path


def _batches(num_devices, per_device, steps, size=32, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        labels = np.repeat(rng.permutation(4)[: num_devices * per_device // 2], 2)
        images = rng.normal(0, 50, (num_devices * per_device, size, size, 3))
        out.append({"image": images.reshape(num_devices, per_device, size, size, 3).astype(np.float32),
                    "label": labels.reshape(num_devices, per_device).astype(np.int32)})
    return out


def _run(config, batches, launcher):
    model, tx = train.create_model(config), train.create_optimizer(config)
    state = train.initial_state(config, model, tx, jax.random.PRNGKey(0))
    run = parallel.make_launcher(launcher, train.make_train_step(model, tx, config),
                                 jax.devices()[:2])
    dstate, losses = run.put_state(state), []
    for batch in batches:
        dstate, metrics = run.step(dstate, batch)
        losses.append(float(metrics["loss"]))
    return run.get_state(dstate), losses


@pytest.mark.parametrize("method", METHODS)
def test_pmap_equals_shard_map(method):
    config = method_config(method)
    batches = _batches(2, 4, 1)
    a, la = _run(config, batches, "pmap")
    b, lb = _run(config, batches, "shard_map")
    assert np.all(np.isfinite(la)) and la[0] > 0
    assert int(a["step"]) == int(b["step"]) == 1
    chex.assert_trees_all_close(a["params"], b["params"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(la, lb, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_trains_evaluates_and_resumes_bitwise(method, data_dir, tmp_path):
    ref = str(tmp_path / "ref")
    config = method_config(method, data_dir)
    config.eval.final_test = True
    results = train.train_and_evaluate(config, ref)
    assert 0.0 < results["recall@1"] <= 1.0 and results["num_queries"] == 896
    resumed = str(tmp_path / "resumed")
    train.train_and_evaluate(method_config(method, data_dir, total_steps=2), resumed)
    train.train_and_evaluate(method_config(method, data_dir), resumed)
    a = train.load_trained_state(config, ref)
    b = train.load_trained_state(config, resumed)
    assert int(a["step"]) == int(b["step"]) == TOTAL
    chex.assert_trees_all_equal(a["params"], b["params"])
    chex.assert_trees_all_equal(a["opt_state"], b["opt_state"])


@pytest.mark.parametrize("method", ("ecaml", "cpf"))
def test_pretrained_trunk_goes_into_the_trunk(method, tmp_path):
    from deml_jax.models.tiny import TinyNet
    from deml_jax.models.weights import save_converted

    trunk = TinyNet().init(jax.random.PRNGKey(7), np.zeros((1, 32, 32, 3), np.float32))
    path = str(tmp_path / "tiny.npz")
    save_converted(path, trunk, "tiny")
    config = method_config(method, **{"model.pretrained": path})
    model, tx = train.create_model(config), train.create_optimizer(config)
    state = train.initial_state(config, model, tx, jax.random.PRNGKey(0))
    config.model.pretrained = ""
    scratch = train.initial_state(config, model, tx, jax.random.PRNGKey(0))
    chex.assert_trees_all_equal(state["params"]["trunk"], trunk["params"])
    rest = lambda p: {k: v for k, v in p.items() if k != "trunk"}
    chex.assert_trees_all_equal(rest(state["params"]), rest(scratch["params"]))
    assert set(rest(state["params"])) == ({"embed", "proxies"} if method == "cpf" else {"embed"})
