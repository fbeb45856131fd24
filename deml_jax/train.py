"""Training loop of deml_jax: small testable pieces and ``train_and_evaluate``.

Shape (flax examples/imagenet, big_vision): the model knows nothing of files,
the loop knows nothing of the model's insides.  Resume order: checkpoint in the
workdir > ``config.model.pretrained`` > scratch.  The train state is a plain
dict pytree ``{params, batch_stats, opt_state, step, rng}``; the data stream is
a pure function of ``(seed, step)``, so resuming needs only the step.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deml_jax import checkpoint as ckpt_lib
from deml_jax import config_lib, logging_lib, optim, parallel
from deml_jax.models import build_model
from deml_jax.objective import deml_loss
from deml_jax.ops import dann_lambda

State = dict[str, Any]


def create_model(config):
    return build_model(config.model, config.dataset.mean_bgr, config.loss.diversity,
                       config.dataset.augmentation)


def init_state(config, model, tx, rng) -> State:
    """The scratch train state as a pure function (``jax.eval_shape``-able)."""
    init_rng, state_rng = jax.random.split(rng)
    size = config.dataset.crop_size
    variables = model.init(init_rng, jnp.zeros((1, size, size, 3)), train=False)
    return {
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats", {}),
        "opt_state": tx.init(variables["params"]),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(state_rng),
    }


def abstract_state(config, model, tx) -> State:
    """Shapes and dtypes of the train state, without allocating it."""
    return jax.eval_shape(lambda: init_state(config, model, tx, jax.random.PRNGKey(0)))


def initial_state(config, model, tx, rng) -> State:
    """Scratch state on the host, with pretrained trunks if configured (§3.2 "3nets")."""
    state = jax.tree.map(np.asarray, jax.jit(lambda r: init_state(config, model, tx, r))(rng))
    if config.model.pretrained:
        from deml_jax.models import weights
        trunk, variant = weights.load_converted(config.model.pretrained)
        if variant != config.model.backbone:
            raise ValueError(f"config.model.pretrained holds {variant!r} weights but "
                             f"config.model.backbone={config.model.backbone!r}")
        state["params"] = jax.tree.map(np.asarray, weights.replicate_into_branches(
            state["params"], trunk["params"]))
        if "batch_stats" in trunk:
            state["batch_stats"] = jax.tree.map(np.asarray, weights.replicate_into_branches(
                state["batch_stats"], trunk["batch_stats"]))
        state["opt_state"] = jax.tree.map(np.asarray, tx.init(state["params"]))
    return state


def make_train_step(model, tx, config):
    """The per-device step ``(state, batch) -> (state, metrics)`` (axis ``'data'``)."""
    loss_cfg, scope = config.loss, config.parallel.loss_scope
    gather = lambda x, axis=0: parallel.gather_for_loss(x, scope, axis)
    has_stats = config.model.backbone == "torchvision_bn"

    def loss_fn(params, state, batch, grl_scale):
        variables = {"params": params, "batch_stats": state["batch_stats"]}
        if has_stats:
            out, mutated = model.apply(variables, batch["image"], train=True,
                                       grl_scale=grl_scale, mutable=["batch_stats"])
        else:
            out, mutated = model.apply(variables, batch["image"], train=True,
                                       grl_scale=grl_scale), {}
        scoped = {"embeddings": gather(out["embeddings"], 2), "act": gather(out["act"], 1)}
        if "adversary" in out:
            scoped["adversary"] = tuple(gather(a, 2) for a in out["adversary"])
        loss, aux = deml_loss(scoped, gather(batch["label"]), params, loss_cfg)
        return loss, (aux, mutated.get("batch_stats", state["batch_stats"]))

    def step(state, batch):
        # Caffe counts the forward pass before the backward reads it (§9.1).
        grl_scale = dann_lambda(state["step"] + 1, config.total_steps,
                                gamma=loss_cfg.adversary_gamma)
        (_, (aux, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state, batch, grl_scale)
        grads = parallel.tree_pmean(grads)  # gradients averaged over devices (§2.2)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(aux, grad_norm=logging_lib.tree_norm(grads),
                       param_norm=logging_lib.tree_norm(params), grl_scale=grl_scale)
        new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1,
                         batch_stats=parallel.tree_pmean(stats))
        return new_state, parallel.tree_pmean(metrics)

    return step


def make_embed_fn(model, devices=None):
    """``bind(variables) -> embed(images [devices, per_device, S, S, 3]) -> [.., E]``."""
    devices = list(devices or jax.local_devices())
    apply = jax.pmap(lambda v, x: model.apply(v, x, train=False)["embedding"],
                     axis_name=parallel.AXIS, devices=parallel.pmap_devices(devices))

    def bind(variables):
        replicated = flax.jax_utils.replicate(variables, devices)
        # Device arrays: the evaluator fetches them after queueing the next batch.
        return lambda images: apply(replicated, images)
    return bind


def restore_or_init(config, model, tx, checkpointer) -> tuple[State, int]:
    """Checkpoint in the workdir > pretrained weights > scratch (big_vision's order)."""
    rng = jax.random.PRNGKey(config.seed)
    restored = checkpointer.restore_or_none(abstract_state(config, model, tx))
    if restored is not None:
        state, _ = restored
        state = jax.tree.map(np.asarray, state)
        return state, int(state["step"])
    return initial_state(config, model, tx, rng), 0


def select_devices(config):
    """The local devices to use (``config.parallel.num_devices``, 0 = all)."""
    devices = jax.local_devices()
    wanted = config.parallel.num_devices
    if wanted:
        if wanted > len(devices):
            raise ValueError(f"config.parallel.num_devices={wanted} but only "
                             f"{len(devices)} local devices exist")
        devices = devices[:wanted]
    return devices


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

    Returns the final test metrics (also written to ``workdir/results.json``).
    """
    from deml_jax import data_glue  # the data stack, imported only for real runs

    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    devices = select_devices(config)
    model, tx = create_model(config), optim.make_optimizer(config.optim)
    launcher = parallel.make_launcher(config.parallel.launcher,
                                      make_train_step(model, tx, config), devices)
    primary = jax.process_index() == 0
    checkpointer = ckpt_lib.Checkpointer(
        workdir, max_to_keep=config.keep_checkpoints,
        best_metric=f"val/{config.eval.best_metric}" if config.dataset.val_split else None)
    state, start = restore_or_init(config, model, tx, checkpointer)
    if primary:
        logging_lib.log(f"{'resuming at step ' + str(start) if start else 'starting'}: "
                        f"{len(devices)} local devices, {jax.device_count()} in all, "
                        f"launcher={config.parallel.launcher}")
        logging_lib.log(optim.describe_multipliers(config.optim, state["params"]))
    writer = logging_lib.MetricWriter(workdir, is_primary=primary)
    embed = make_embed_fn(model, devices)
    batches = data_glue.train_batches(config, start, len(devices))
    stop_flag = ckpt_lib.install_preemption_handler()
    try:
        state = _loop(config, launcher, launcher.put_state(state), batches, start,
                      writer, checkpointer, stop_flag, embed, data_glue)
        if state is None or not config.eval.final_test:  # pre-empted: checkpoint saved
            return {}
        evaluator = data_glue.make_evaluator(config, embed(variables_of(state)), "test", len(devices))
        results = evaluator.run()
        writer.write_scalars(int(state["step"]), {f"test/{k}": v for k, v in results.items()})
        if primary:
            with open(os.path.join(workdir, "results.json"), "w") as f:
                json.dump({"step": int(state["step"]), "test": results}, f, indent=2)
            print(logging_lib.format_table(results, title=f"test @ step {int(state['step'])}"))
            if config.eval.pictures:
                from deml_jax.evaluate import pictures
                paths = pictures(config, model, variables_of(state), evaluator,
                                 os.path.join(workdir, "pictures"), config.eval.num_pictures)
                logging_lib.log(f"wrote {len(paths)} pictures to {os.path.dirname(paths[0])}")
        return results
    finally:
        stop_flag.uninstall()
        writer.close()
        checkpointer.close()


def variables_of(state) -> dict:
    """The model variables ``{params, batch_stats}`` of a train state."""
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


def _loop(config, launcher, dstate, batches, start, writer, checkpointer, stop_flag,
          embed, data_glue):
    """The step loop; returns the final host state, or None when pre-empted."""
    bar = logging_lib.ProgressBar(config.total_steps, start, enabled=jax.process_index() == 0)
    images_per_step = (config.dataset.classes_per_device * config.dataset.images_per_class
                       * data_glue.global_num_devices(config))
    schedule = optim.lr_schedule(config.optim)
    for step in range(start, config.total_steps):
        tic = time.perf_counter()
        dstate, metrics = launcher.step(dstate, next(batches))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        done = step + 1
        logging_lib.check_finite(metrics, done)  # raises; the last good checkpoint stays
        metrics["images_per_s"] = images_per_step / (time.perf_counter() - tic)
        metrics["lr"] = float(schedule(step))
        bar.update(done, metrics)
        if done % config.log_every_steps == 0 or done == config.total_steps:
            writer.write_scalars(done, {f"train/{k}": v for k, v in metrics.items()})
        preempted = stop_flag.is_set()
        evaluate = config.dataset.val_split and (
            done % config.eval_every_steps == 0 or done == config.total_steps)
        save = (done % config.checkpoint_every_steps == 0 or done == config.total_steps
                or preempted or evaluate)  # an evaluated step is saved for best-tracking
        host = launcher.get_state(dstate) if save else None  # one device-to-host copy
        val = {}
        if evaluate:
            val = data_glue.evaluate(config, embed(variables_of(host)), "val", launcher.num_local_devices)
            val = {f"val/{k}": v for k, v in val.items()}
            writer.write_scalars(done, val)
        if save:
            checkpointer.save(done, host, {"step": done}, metrics=val or None)
        if preempted:
            logging_lib.log(f"pre-empted: saved step {done}; rerun the same command to resume")
            checkpointer.wait()
            return None
    return launcher.get_state(dstate)


def load_trained_state(config, workdir: str, which: str = "latest") -> State:
    """The host state of ``workdir``'s latest or best-on-validation checkpoint."""
    if which not in ("latest", "best"):
        raise ValueError(f"checkpoint must be 'latest' or 'best', got {which!r}")
    abstract = abstract_state(config, create_model(config), optim.make_optimizer(config.optim))
    best = f"val/{config.eval.best_metric}" if which == "best" else None
    with ckpt_lib.Checkpointer(workdir, best_metric=best) as checkpointer:
        restored = (checkpointer.restore_best(abstract) if which == "best"
                    else checkpointer.restore_or_none(abstract))
    if restored is None:
        raise FileNotFoundError(f"no {which} checkpoint in {workdir!r}"
                                + (" (best needs config.dataset.val_split)" if which == "best" else ""))
    return jax.tree.map(np.asarray, restored[0])


def trained_embedder(config, workdir: str, which: str = "latest"):
    """``(state, model, devices, embed)`` for a trained checkpoint (CLIs' common start)."""
    state = load_trained_state(config, workdir, which)
    model, devices = create_model(config), select_devices(config)
    embed = make_embed_fn(model, devices)(variables_of(state))
    return state, model, devices, embed
