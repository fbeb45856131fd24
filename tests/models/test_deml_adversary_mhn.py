"""DeML with diversity='adversary_mhn' (related-methods.md §1.3): structure and one train step.

Small trunk, 32 px, one device, one branch (no object-attention chain to compile): the model builds the shared adversary per
branch, its BatchNorm statistics live in ``batch_stats`` and are updated by the
train step, and one optimiser step moves the adversary's parameters.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from deml_jax import parallel, train
from deml_jax.models import DeML


def _shapes(model, b=2, size=32, **kw):
    x = jnp.zeros((b, size, size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"], **kw)[0],
                         variables)
    return variables, out


def test_structure_and_single_learner():
    variables, out = _shapes(DeML(2, 3, 8, backbone="tiny", adversary_mhn=True,
                                  adversary_mhn_hidden=5))
    chex.assert_shape(out["adversary_mhn"], (2, 3, 2, 5))  # I, J, B, H
    adv = variables["params"]["branch_1"]["adversary_mhn"]
    assert set(adv) == {"fc1", "bn1", "fc2", "bn2"} and set(adv["fc1"]) == {"kernel"}
    chex.assert_shape(adv["fc1"]["kernel"], (8, 5))
    assert set(variables["batch_stats"]["branch_0"]["adversary_mhn"]) == {"bn1", "bn2"}
    assert "adversary" not in out
    # J = 1: no pair to keep apart, so no adversary at all.
    variables, out = _shapes(DeML(2, 1, 8, backbone="tiny", adversary_mhn=True))
    assert "adversary_mhn" not in out and "adversary_mhn" not in variables["params"]["branch_0"]


def test_a_train_step_moves_the_adversary():
    c = common.get_base_config()
    c.dataset.update(crop_size=32, image_size=32)
    c.model.update(num_branches=1, num_learners=2, embedding_dim=8, backbone="tiny")
    c.loss.update(diversity="adversary_mhn", adversary_mhn_hidden=6)
    c.optim.update(base_lr=1e-3, schedule="constant")
    c.parallel.loss_scope = "device"
    c.total_steps = 10
    model = train.create_model(c)
    tx = train.create_optimizer(c)
    state = train.initial_state(c, model, tx, jax.random.PRNGKey(0))
    stats0 = state["batch_stats"]["branch_0"]["adversary_mhn"]["bn1"]
    np.testing.assert_array_equal(stats0["mean"], np.zeros(6, np.float32))
    run = parallel.make_launcher("pmap", train.make_train_step(model, tx, c), jax.devices()[:1])
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(0, 50, (1, 4, 32, 32, 3)).astype(np.float32),
             "label": np.array([[3, 3, 7, 7]], np.int32)}
    new, metrics = run.step(run.put_state(state), batch)
    new = run.get_state(new)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["adversary_mhn"]) > 0
    # §9.1 DANN scale at Caffe's first forward: p = 1/10, lambda = 2/(1+e^-1) - 1.
    np.testing.assert_allclose(metrics["grl_scale"], 2 / (1 + np.exp(-1.0)) - 1, rtol=1e-5)
    for b in ("branch_0",):
        before = jax.tree.leaves(state["params"][b]["adversary_mhn"])
        after = jax.tree.leaves(new["params"][b]["adversary_mhn"])
        assert all(np.all(np.isfinite(a)) for a in after)
        assert all(np.abs(np.asarray(a) - np.asarray(p)).max() > 0 for a, p in zip(after, before))
    # Train-mode BatchNorm updated its running mean from the batch statistics.
    assert np.abs(new["batch_stats"]["branch_0"]["adversary_mhn"]["bn1"]["mean"]).max() > 0
