"""Tests of deml_jax.optim against a NumPy re-implementation of Caffe's solver.

The reference below is written from docs/reference.md §6 (adam_solver.cu,
sgd_solver.cpp): lr_policy "step", Regularize (coupled L2), Adam with eps on the
uncorrected sqrt(v), per-blob lr_mult / decay_mult.  The multipliers are
assigned by hand from the prose of §3 and §6, not from the regex tables.
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deml_jax import optim

# Hand-assigned (lr_mult, decay_mult) of the released prototxt (§3.1, §3.3,
# §3.4, §6) and of the adversary (§14.1: like the CAMs).
HAND_MULTS = {
    "adversary/pair_0_1/bias": (20.0, 0.0),
    "adversary/pair_0_1/kernel": (10.0, 1.0),
    "branch_0/embed/kernel": (10.0, 1.0),
    "branch_0/trunk/conv1_7x7_s2/bias": (2.0, 0.0),
    "branch_0/trunk/conv1_7x7_s2/kernel": (1.0, 1.0),
    "branch_0/trunk/inception_3a_1x1/bias": (2.0, 0.0),
    "branch_0/trunk/inception_3a_1x1/kernel": (1.0, 1.0),
    "branch_1/cam_2/expand/bias": (20.0, 0.0),
    "branch_1/cam_2/expand/kernel": (10.0, 1.0),
    "branch_1/cam_2/reduce/bias": (20.0, 0.0),
    "branch_1/cam_2/reduce/kernel": (10.0, 1.0),
}
SHAPES = {
    "adversary/pair_0_1/bias": (4,),
    "adversary/pair_0_1/kernel": (4, 4),
    "branch_0/embed/kernel": (6, 4),
    "branch_0/trunk/conv1_7x7_s2/bias": (3,),
    "branch_0/trunk/conv1_7x7_s2/kernel": (3, 3, 2, 3),
    "branch_0/trunk/inception_3a_1x1/bias": (5,),
    "branch_0/trunk/inception_3a_1x1/kernel": (1, 1, 3, 5),
    "branch_1/cam_2/expand/bias": (6,),
    "branch_1/cam_2/expand/kernel": (1, 1, 2, 6),
    "branch_1/cam_2/reduce/bias": (2,),
    "branch_1/cam_2/reduce/kernel": (1, 1, 6, 2),
}


def nest(flat):
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}} (independent of optim's paths)."""
    out = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = np.asarray(value)
    return out


def random_problem(seed=0, steps=30):
    rng = np.random.default_rng(seed)
    params = {p: rng.normal(size=s).astype(np.float32) for p, s in SHAPES.items()}
    grads = [{p: (rng.normal(size=s) * rng.uniform(0.1, 3.0)).astype(np.float32)
              for p, s in SHAPES.items()} for _ in range(steps)]
    return params, grads


def caffe_adam_reference(params, grads_seq, *, base_lr, gamma, stepsize, b1,
                         b2, eps, weight_decay, mults):
    """Caffe's solver loop (§6) in float64; returns the parameters per iteration."""
    theta = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    v = {k: np.zeros_like(x) for k, x in theta.items()}
    history = []
    for it, grads in enumerate(grads_seq):
        rate = base_lr * gamma ** math.floor(it / stepsize)  # GetLearningRate
        t = it + 1
        for k in theta:
            lr_mult, decay_mult = mults[k]
            g = grads[k].astype(np.float64) + weight_decay * decay_mult * theta[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            local_rate = rate * lr_mult * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            theta[k] = theta[k] - local_rate * m[k] / (np.sqrt(v[k]) + eps)
        history.append({k: x.copy() for k, x in theta.items()})
    return history


def run_optimizer(tx, params, grads_seq):
    params = jax.tree.map(jnp.asarray, nest(params))
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = []
    for grads in grads_seq:
        params, state = step(params, state, nest(grads))
        history.append(flatten(params))
    return history, state


CAFFE_KW = dict(base_lr=1e-2, gamma=0.5, stepsize=10, b1=0.9, b2=0.999,
                eps=1e-3, weight_decay=0.05)


def caffe_config(**overrides):
    kw = dict(base_lr=CAFFE_KW["base_lr"], schedule="step",
              step_size=CAFFE_KW["stepsize"], gamma=CAFFE_KW["gamma"],
              b1=CAFFE_KW["b1"], b2=CAFFE_KW["b2"], eps=CAFFE_KW["eps"],
              weight_decay=CAFFE_KW["weight_decay"], caffe_adam_eps=True)
    kw.update(overrides)
    return optim.default_config(**kw)


def test_matches_numpy_caffe_solver_over_30_steps():
    params, grads = random_problem()
    # eps is large (1e-3) so Caffe's eps placement is visible; lr steps at 10, 20.
    want = caffe_adam_reference(params, grads, mults=HAND_MULTS, **CAFFE_KW)
    got, _ = run_optimizer(optim.make_optimizer(caffe_config(), total_steps=30), params, grads)
    for it in (0, 9, 10, 19, 20, 29):
        for k in SHAPES:
            step_want = want[it][k] - (want[it - 1][k] if it else params[k])
            step_got = got[it][k] - (got[it - 1][k] if it else params[k])
            chex.assert_trees_all_close(step_got, step_want.astype(np.float32),
                                        rtol=2e-3, atol=5e-7)
    chex.assert_trees_all_close(got[-1], {k: x.astype(np.float32)
                                          for k, x in want[-1].items()},
                                rtol=1e-5, atol=2e-5)  # 30 float32 steps of ~0.1


def test_optax_eps_mode_differs_from_caffe_reference():
    """Guards the test above: optax's eps placement must not match Caffe's."""
    params, grads = random_problem(steps=3)
    want = caffe_adam_reference(params, grads, mults=HAND_MULTS, **CAFFE_KW)
    got, _ = run_optimizer(optim.make_optimizer(caffe_config(caffe_adam_eps=False), total_steps=30),
                           params, grads)
    k = "branch_0/trunk/conv1_7x7_s2/kernel"
    assert not np.allclose(got[-1][k] - params[k], want[-1][k] - params[k],
                           rtol=1e-3, atol=0)


def test_optax_eps_mode_equals_optax_adam_with_unit_multipliers():
    params, grads = random_problem(seed=1)
    config = optim.default_config(base_lr=3e-3, schedule="constant", b1=0.8,
                                  b2=0.99, eps=1e-6, weight_decay=0.0,
                                  caffe_adam_eps=False, lr_mults=(),
                                  decay_mults=())
    got, _ = run_optimizer(optim.make_optimizer(config, total_steps=30), params, grads)
    want, _ = run_optimizer(optax.adam(3e-3, b1=0.8, b2=0.99, eps=1e-6),
                            params, grads)
    chex.assert_trees_all_close(got[-1], want[-1], rtol=1e-5, atol=1e-5)


def test_frozen_params_are_bitwise_unchanged_even_with_nan_grads():
    params, grads = random_problem(steps=5)
    frozen = [k for k in SHAPES if "/trunk/" in k]
    for g in grads:
        for k in frozen:
            g[k] = np.full_like(g[k], np.nan)
    config = caffe_config(frozen=(r"/trunk/",))
    got, state = run_optimizer(optim.make_optimizer(config, total_steps=5), params, grads)
    for k in SHAPES:
        if k in frozen:
            np.testing.assert_array_equal(got[-1][k], params[k])
        else:
            assert np.all(np.isfinite(got[-1][k])) and not np.array_equal(
                got[-1][k], params[k])
    # Frozen leaves carry no Adam moments (memory), the others do.
    assert len(jax.tree.leaves(state)) < 2 * len(SHAPES)


def test_step_schedule_at_caffe_boundaries():
    schedule = optim.lr_schedule(optim.default_config(), total_steps=20_000)  # released §6
    cases = {0: 1e-5, 14999: 1e-5, 15000: 8e-6, 29999: 8e-6, 30000: 6.4e-6}
    for step, lr in cases.items():
        np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-5)
        np.testing.assert_allclose(
            float(jax.jit(schedule)(jnp.int32(step))), lr, rtol=1e-5)


def test_cosine_and_constant_schedules_by_hand():
    cosine = optim.lr_schedule(optim.default_config(
        base_lr=1.0, schedule="cosine", warmup_steps=10), total_steps=110)
    # warmup 0 -> 1 over 10 steps, then (1 + cos(pi * (s - 10) / 100)) / 2.
    cases = {0: 0.0, 5: 0.5, 10: 1.0, 35: (1 + math.cos(math.pi / 4)) / 2,
             60: 0.5, 110: 0.0, 500: 0.0}
    for step, lr in cases.items():
        np.testing.assert_allclose(float(cosine(step)), lr, atol=1e-5)
    constant = optim.lr_schedule(optim.default_config(base_lr=0.25,
                                                      schedule="constant"), total_steps=9)
    assert float(constant(0)) == float(constant(123456)) == 0.25


def test_param_paths_and_multiplier_table():
    params = nest({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    assert optim.param_path_strings(params) == sorted(SHAPES)
    got = optim.param_multipliers(params, optim.default_config(frozen=("conv1",)))
    want = {k: (lr, dec, "conv1" in k) for k, (lr, dec) in HAND_MULTS.items()}
    assert got == want
    table = optim.describe_param_groups(params, optim.default_config())
    rows = table.splitlines()[1:]
    # Groups: (1,1) trunk kernels, (2,0) trunk biases, (10,1) cam/embed/adv
    # kernels, (20,0) cam/adv biases.
    assert len(rows) == 4
    assert rows[0].split()[:5] == ["1", "1", "no", "2", str(54 + 15)]


@pytest.mark.parametrize("key, value", [
    ("schedule", "linear"), ("step_size", 0), ("gamma", 0.0), ("base_lr", -1.0),
    ("b2", 1.0), ("eps", -1e-8), ("weight_decay", float("nan")),
    ("caffe_adam_eps", "yes"), ("lr_mults", (("(unclosed", 1.0),)),
    ("decay_mults", ((r"kernel$", "one"),)), ("frozen", "conv1"),
])
def test_bad_config_names_the_key(key, value):
    config = optim.default_config().to_dict()  # a plain dict: no type locking
    config[key] = value
    with pytest.raises(ValueError, match=f"config.optim.{key}"):
        optim.make_optimizer(config, total_steps=100)


def test_missing_key_and_cosine_warmup_errors():
    config = optim.default_config().to_dict()
    del config["b1"]
    with pytest.raises(ValueError, match="config.optim is missing key 'b1'"):
        optim.make_optimizer(config, total_steps=100)
    with pytest.raises(ValueError, match=r"config\.optim\.warmup_steps must be < "
                                         r"config\.total_steps \(5\)"):
        optim.lr_schedule(optim.default_config(schedule="cosine", warmup_steps=5),
                          total_steps=5)


def test_describe_multipliers_argument_order_alias():
    params = nest({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    config = optim.default_config()
    assert optim.describe_multipliers(config, params) == \
        optim.describe_param_groups(params, config)


def test_total_steps_override_reaches_the_schedule():
    """``--config.total_steps=50`` on the demo: the cosine anneals over 50 steps.

    Caffe Adam with eps 0, no decay and unit multipliers moves a parameter with
    a constant gradient by exactly lr(step) each step, so the last update is the
    schedule's last value, computed here by hand.
    """
    from deml_jax import config_lib
    config = config_lib.load_config("configs/demo_digits.py")
    config.total_steps = 50  # what the absl override does to the locked config
    config.optim.update(eps=0.0, weight_decay=0.0, lr_mults=(), decay_mults=())
    assert "total_steps" not in config.optim  # one source of truth for the run length
    tx = optim.make_optimizer(config.optim, total_steps=config.total_steps)
    base, warm = config.optim.base_lr, config.optim.warmup_steps
    assert (base, warm, config.optim.schedule) == (1e-3, 20, "cosine")
    params = {"w": jnp.zeros((2,), jnp.float32)}
    grads = {"w": jnp.array([1.0, -1.0], jnp.float32)}
    state = tx.init(params)
    steps = []
    for _ in range(50):
        updates, state = tx.update(grads, state, params)
        steps.append(np.asarray(updates["w"]))
    want = base * 0.5 * (1.0 + math.cos(math.pi * (49 - warm) / (50 - warm)))  # 2.74e-6
    np.testing.assert_allclose(steps[-1], [-want, want], rtol=1e-4)
    mid = base * 0.5 * (1.0 + math.cos(math.pi * (25 - warm) / (50 - warm)))
    np.testing.assert_allclose(steps[25], [-mid, mid], rtol=1e-4)


def test_total_steps_is_validated_with_its_real_key():
    with pytest.raises(ValueError, match=r"config\.total_steps must be an int >= 1, got 0"):
        optim.lr_schedule(optim.default_config(schedule="cosine"), total_steps=0)
    with pytest.raises(TypeError):  # the run length is never implicit
        optim.make_optimizer(optim.default_config())
