"""Caffe-faithful optimiser: coupled L2 -> Adam -> per-parameter learning rates.

What the released solver does each iteration (docs/reference.md §5.4, §6):

1. gradients averaged over GPUs (done by the train step, not here);
2. ``Regularize``: ``g += weight_decay * decay_mult * theta`` (coupled L2, not AdamW);
3. ``ComputeUpdateValue`` of ``AdamSolver`` with ``t = iter + 1``::

       m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
       theta <- theta - lr(iter) * lr_mult * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

   i.e. Caffe adds ``eps`` to the *uncorrected* ``sqrt(v)``. In optax's form
   ``m_hat / (sqrt(v_hat) + eps_t)`` that is ``eps_t = eps / sqrt(1 - b2^t)``.

Per-parameter multipliers (``lr_mult``, ``decay_mult``) come from regex rules on
the '/'-joined Flax parameter path; the first rule whose regex is found
(``re.search``) in the path wins.  Parameters matched by a ``frozen`` regex get
exactly zero updates (``optax.multi_transform`` with ``optax.set_to_zero``) and
no Adam moments.  Every state is a plain pytree of arrays (orbax-saveable).
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

Rules = Sequence[tuple[str, float]]

# Learning-rate multipliers of the released prototxt (docs/reference.md §3.1,
# §3.3, §3.4, §6): trunk conv weights 1 and biases 2, CAM weights 10 and biases
# 20, branch FC W_b 10.  The adversary (§14.1) is ours: as fast as the CAMs.
# The MHN-form adversary (related-methods.md §1.3, ours too) takes 10 on every
# parameter (kernels, bias, BN scale/bias), the multiplier of the other new
# layers' weights (CAM, W_b); our choice.  Its kernels are decayed, BN scales not.
# '(^|/)' lets a group sit at the top of the tree ('adversary/pair_0_1/kernel')
# or under a prefix ('params/...'); ".*/adversary/" would miss the former.
# The same table is written in configs/common.py; keep the two equal.
RELEASED_LR_MULTS: tuple[tuple[str, float], ...] = (
    (r"(^|/)cam_\d+/.*kernel$", 10.0),
    (r"(^|/)cam_\d+/.*bias$", 20.0),
    (r"(^|/)embed/kernel$", 10.0),
    (r"(^|/)adversary/.*kernel$", 10.0),
    (r"(^|/)adversary/.*bias$", 20.0),
    (r"(^|/)adversary_mhn/", 10.0),
    (r"bias$", 2.0),
)
# Caffe decays weights only: decay_mult 1 on weights, 0 on biases (§3.1, §5.4).
RELEASED_DECAY_MULTS: tuple[tuple[str, float], ...] = ((r"kernel$", 1.0),)
DEFAULT_LR_MULT = 1.0  # Caffe ParamSpec.lr_mult default
DEFAULT_DECAY_MULT = 0.0  # unmatched params (biases) are not decayed, §5.4

SCHEDULES = ("step", "cosine", "constant")
# Error messages name keys as the user writes them (``--config.optim.base_lr``).
PREFIX = "config.optim."


def default_config(*, base_lr: float = 1e-5, schedule: str = "step",
                   step_size: int = 15_000, gamma: float = 0.8,
                   warmup_steps: int = 0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 2e-4, caffe_adam_eps: bool = True,
                   lr_mults: Rules = RELEASED_LR_MULTS,
                   decay_mults: Rules = RELEASED_DECAY_MULTS,
                   frozen: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The released DeML(3,3) solver (solver_DeML3-3_512.prototxt, §6).

    base_lr 1e-5, lr_policy step with gamma 0.8 every 15000 iterations,
    momentum 0.9, momentum2 0.999, delta 1e-8 (caffe.proto
    default), weight_decay 2e-4 with L2 regularisation.  The run length
    (max_iter 20000) is not here: it is ``config.total_steps``, the one source
    of truth, passed to :func:`lr_schedule` / :func:`make_optimizer`.
    """
    return ml_collections.ConfigDict(dict(
        base_lr=base_lr, schedule=schedule, step_size=step_size, gamma=gamma,
        warmup_steps=warmup_steps, b1=b1, b2=b2,
        eps=eps, weight_decay=weight_decay, caffe_adam_eps=caffe_adam_eps,
        lr_mults=tuple(lr_mults), decay_mults=tuple(decay_mults),
        frozen=tuple(frozen)))


# ----------------------------------------------------------------------------
# Config validation.

def _get(config, key: str):
    try:
        return config[key]
    except (KeyError, AttributeError):
        raise ValueError(f"{PREFIX[:-1]} is missing key {key!r}") from None


def _number(config, key: str, *, low: float, high: float = math.inf,
            low_open: bool = False, high_open: bool = False) -> float:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{PREFIX}{key} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{PREFIX}{key} must be in {lo}{low}, {high}{hi}, "
                         f"got {value!r}")
    return float(value)


def _int(config, key: str, *, low: int) -> int:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{PREFIX}{key} must be an int >= {low}, got {value!r}")
    return value


def _rules(config, key: str) -> tuple[tuple[str, float], ...]:
    """Validates ``((regex, float), ...)`` and returns it as a tuple."""
    value = _get(config, key)
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise ValueError(f"{PREFIX}{key} must be a tuple of (regex, float) "
                         f"pairs, got {value!r}")
    out = []
    for rule in value:
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2
        if not ok or not isinstance(rule[0], str) or isinstance(
                rule[1], bool) or not isinstance(rule[1], (int, float)):
            raise ValueError(f"{PREFIX}{key} entries must be (regex, float) "
                             f"pairs, got {rule!r}")
        _compile(key, rule[0])
        if not math.isfinite(rule[1]) or rule[1] < 0:
            raise ValueError(f"{PREFIX}{key} multiplier for {rule[0]!r} must "
                             f"be finite and >= 0, got {rule[1]!r}")
        out.append((rule[0], float(rule[1])))
    return tuple(out)


def _frozen(config) -> tuple[str, ...]:
    value = _get(config, "frozen")
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not all(
            isinstance(r, str) for r in value):
        raise ValueError(f"{PREFIX}frozen must be a tuple of regex strings, "
                         f"got {value!r}")
    for regex in value:
        _compile("frozen", regex)
    return tuple(value)


def _compile(key: str, regex: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as err:
        raise ValueError(f"{PREFIX}{key} has a bad regex {regex!r}: {err}") from None


# ----------------------------------------------------------------------------
# Learning-rate schedule.

def _total_steps(total_steps) -> int:
    if (isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral)
            or total_steps < 1):
        raise ValueError(f"config.total_steps must be an int >= 1, got {total_steps!r}")
    return int(total_steps)


def lr_schedule(config, *, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the 0-based iteration (an int32 scalar).

    ``config`` is the optimiser section (``config.optim``); ``total_steps`` is
    the run length ``config.total_steps`` (the one source of truth: the
    optimiser section has no run length of its own).

    * ``'step'``: Caffe's ``lr_policy: "step"`` (§6),
      ``base_lr * gamma ** floor(step / step_size)``;
    * ``'cosine'``: ``base_lr * (1 + cos(pi * t)) / 2`` with
      ``t = clip((step - warmup_steps) / (total_steps - warmup_steps), 0, 1)``;
    * ``'constant'``: ``base_lr``.

    ``warmup_steps > 0`` multiplies any of them by ``min(1, step / warmup_steps)``
    (a linear ramp from 0; not in the released solver, which has none).
    Returns float32 scalars.  Raises ValueError naming the bad key.
    """
    total = _total_steps(total_steps)
    base_lr = _number(config, "base_lr", low=0.0, low_open=True)
    kind = _get(config, "schedule")
    if kind not in SCHEDULES:
        raise ValueError(f"{PREFIX}schedule must be one of {SCHEDULES}, "
                         f"got {kind!r}")
    warmup = _int(config, "warmup_steps", low=0)
    if kind == "step":
        step_size = _int(config, "step_size", low=1)
        gamma = _number(config, "gamma", low=0.0, low_open=True)
        # Integer division: exact for any step, unlike a float32 quotient.
        decay = lambda c, s: gamma ** (c // step_size).astype(jnp.float32)
    elif kind == "cosine":
        if warmup >= total:
            raise ValueError(f"{PREFIX}warmup_steps must be < config.total_steps "
                             f"({total}) for the cosine schedule, got {warmup}")
        decay = lambda c, s: 0.5 * (1.0 + jnp.cos(
            jnp.pi * jnp.clip((s - warmup) / (total - warmup), 0.0, 1.0)))
    else:
        decay = lambda c, s: jnp.ones_like(s)

    def schedule(count):
        c = jnp.asarray(count).astype(jnp.int32)
        s = c.astype(jnp.float32)
        lr = base_lr * decay(c, s)
        if warmup > 0:
            lr = lr * jnp.minimum(1.0, s / warmup)
        return lr.astype(jnp.float32)

    return schedule


# ----------------------------------------------------------------------------
# Parameter paths and multipliers.

def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_string(path: Sequence[Any]) -> str:
    """'/'-joined path of a ``tree_flatten_with_path`` key tuple."""
    return "/".join(_key_name(k) for k in path)


def param_path_strings(params) -> list[str]:
    """'/'-joined paths of every leaf, in tree-flatten order.

    e.g. ``['branch_0/embed/kernel', 'branch_0/trunk/conv1_7x7_s2/bias', ...]``.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return [path_string(p) for p, _ in leaves]


def multiplier_for(path: str, rules: Rules, default: float) -> float:
    """The multiplier of the first rule whose regex is found in ``path``."""
    for regex, mult in rules:
        if re.search(regex, path):
            return float(mult)
    return float(default)


def multiplier_tree(params, rules: Rules, default: float):
    """Pytree like ``params`` with a Python float multiplier per leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: multiplier_for(path_string(p), rules, default), params)


def _is_frozen(path: str, frozen: Sequence[str]) -> bool:
    return any(re.search(regex, path) for regex in frozen)


# ----------------------------------------------------------------------------
# Gradient transformations (each state a NamedTuple of arrays).

class CaffeAdamState(NamedTuple):
    """Adam moments; ``count`` = iterations done (Caffe's ``iter``), int32."""
    count: jax.Array
    mu: Any
    nu: Any


def add_coupled_decay(weight_decay: float, decay_mults: Rules,
                      default: float = DEFAULT_DECAY_MULT
                      ) -> optax.GradientTransformation:
    """``g + weight_decay * decay_mult(path) * param`` (Caffe L2 ``Regularize``, §5.4).

    Leaves whose decay is 0 pass through untouched (bitwise).
    """
    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_coupled_decay needs params: call "
                             "update(grads, state, params)")

        def decay(path, g, p):
            rate = weight_decay * multiplier_for(path_string(path), decay_mults,
                                                 default)
            return g if rate == 0.0 else g + rate * p

        return jax.tree_util.tree_map_with_path(decay, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_caffe_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                        ) -> optax.GradientTransformation:
    """Caffe's ``AdamSolver`` direction, without the learning rate (§6).

    ``sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`` with ``t = count + 1``:
    ``eps`` is added to the uncorrected ``sqrt(v)`` (optax adds it to ``sqrt(v_hat)``).
    Moments have the parameters' dtypes.
    """
    def init_fn(params):
        zeros = lambda p: jnp.zeros_like(p)
        return CaffeAdamState(jnp.zeros([], jnp.int32),
                              jax.tree.map(zeros, params),
                              jax.tree.map(zeros, params))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g,
                          state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g,
                          state.nu, updates)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        correction = jnp.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        step = jax.tree.map(
            lambda m, v: (correction * m / (jnp.sqrt(v) + eps)).astype(m.dtype),
            mu, nu)
        return step, CaffeAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_lr(schedule: optax.Schedule, lr_mults: Rules,
                default: float = DEFAULT_LR_MULT) -> optax.GradientTransformation:
    """``-schedule(iter) * lr_mult(path) * u`` (Caffe's ``local_rate``, §6)."""
    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        lr = schedule(state.count)

        def scale(path, u):
            mult = multiplier_for(path_string(path), lr_mults, default)
            return (-(lr * mult) * u).astype(u.dtype)

        updates = jax.tree_util.tree_map_with_path(scale, updates)
        return updates, optax.ScaleByScheduleState(
            count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------
# The optimiser of a config.

def make_optimizer(config, *, total_steps: int) -> optax.GradientTransformation:
    """Coupled L2 -> Adam -> ``-lr(iter) * lr_mult`` (Caffe order, §5.4, §6).

    ``config`` is ``config.optim``; ``total_steps`` is ``config.total_steps``
    (the schedule's run length, see :func:`lr_schedule`).

    ``config.caffe_adam_eps=True`` uses Caffe's eps placement
    (:func:`scale_by_caffe_adam`), False optax's ``scale_by_adam``.  Params whose
    path matches a ``config.frozen`` regex get exactly zero updates and no
    moments.  ``update`` needs ``params`` (for the weight decay).
    """
    schedule = lr_schedule(config, total_steps=total_steps)
    b1 = _number(config, "b1", low=0.0, high=1.0, high_open=True)
    b2 = _number(config, "b2", low=0.0, high=1.0, high_open=True)
    eps = _number(config, "eps", low=0.0)
    weight_decay = _number(config, "weight_decay", low=0.0)
    caffe_eps = _get(config, "caffe_adam_eps")
    if not isinstance(caffe_eps, bool):
        raise ValueError(f"{PREFIX}caffe_adam_eps must be a bool, got {caffe_eps!r}")
    if not caffe_eps and eps == 0.0:
        raise ValueError(f"{PREFIX}eps must be > 0 when {PREFIX}caffe_adam_eps is False")
    adam = (scale_by_caffe_adam(b1, b2, eps) if caffe_eps
            else optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    chain = optax.chain(
        add_coupled_decay(weight_decay, _rules(config, "decay_mults")),
        adam,
        scale_by_lr(schedule, _rules(config, "lr_mults")))
    frozen = _frozen(config)
    if not frozen:
        return chain

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "frozen" if _is_frozen(path_string(p), frozen)
            else "train", params)

    return optax.multi_transform(
        {"train": chain, "frozen": optax.set_to_zero()}, labels)


def param_multipliers(params, config) -> dict[str, tuple[float, float, bool]]:
    """``{path: (lr_mult, decay_mult, frozen)}`` for every leaf of ``params``."""
    lr_rules, decay_rules = _rules(config, "lr_mults"), _rules(config, "decay_mults")
    frozen = _frozen(config)
    return {path: (multiplier_for(path, lr_rules, DEFAULT_LR_MULT),
                   multiplier_for(path, decay_rules, DEFAULT_DECAY_MULT),
                   _is_frozen(path, frozen))
            for path in param_path_strings(params)}


def describe_param_groups(params, config) -> str:
    """Human-readable table of the parameter groups, for start-up logs.

    One row per distinct (lr_mult, decay_mult, frozen) with the number of
    tensors and scalars and the first path of the group, e.g.::

        lr_mult decay_mult frozen tensors     params  example
            1.0        1.0     no      57  5,966,624  branch_0/trunk/conv1_7x7_s2/kernel
    """
    sizes = dict(zip(param_path_strings(params),
                     (int(x.size) for x in jax.tree.leaves(params))))
    groups: dict[tuple, list[str]] = {}
    for path, key in param_multipliers(params, config).items():
        groups.setdefault(key, []).append(path)
    lines = [f"{'lr_mult':>7} {'decay_mult':>10} {'frozen':>6} {'tensors':>7} "
             f"{'params':>12}  example"]
    for (lr, decay, frozen), paths in sorted(groups.items()):
        count = sum(sizes[p] for p in paths)
        lines.append(f"{lr:>7g} {decay:>10g} {'yes' if frozen else 'no':>6} "
                     f"{len(paths):>7} {count:>12,}  {paths[0]}")
    return "\n".join(lines)


def describe_multipliers(config, params) -> str:
    """:func:`describe_param_groups` with the (config, params) argument order."""
    return describe_param_groups(params, config)
