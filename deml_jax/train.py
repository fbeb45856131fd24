"""Training loop of deml_jax: small testable pieces and ``train_and_evaluate``.

Shape (flax examples/imagenet, big_vision): the model knows nothing of files,
the loop knows nothing of the model's insides.  Resume order: checkpoint in the
workdir > ``config.model.pretrained`` > scratch.  The train state is a plain
dict pytree ``{params, batch_stats, opt_state, step, rng}``; the data stream is
a pure function of ``(seed, step)``, so resuming needs only the step.
"""

from __future__ import annotations

import contextlib
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
from deml_jax import workdir as workdir_lib
from deml_jax import loss_groups, methods, snapshots

State = dict[str, Any]


def create_model(config):
    """``config.method``'s model (deml_jax/methods/).

    Also fixes the trunk's gradient kernels (``config.model.kernels``, read when
    the step is traced; deml_jax/models/kernels.py).
    """
    from deml_jax.models import kernels
    kernels.set_kernels(config.model.get("kernels", "auto"))
    return methods.get_method(config.method).build_model(config)


def create_optimizer(config):
    """The optimiser of ``config.optim`` plus the method's own lr rules (e.g. CPF's proxies)."""
    return optim.make_optimizer(methods.optimizer_config(config), total_steps=config.total_steps)


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
        params, stats = methods.get_method(config.method).load_pretrained(
            state["params"], state["batch_stats"], trunk)
        state["params"] = jax.tree.map(np.asarray, params)
        state["batch_stats"] = jax.tree.map(np.asarray, stats)
        state["opt_state"] = jax.tree.map(np.asarray, tx.init(state["params"]))
    return state


def make_train_step(model, tx, config):
    """The per-device step ``(state, batch) -> (state, metrics)`` (axis ``'data'``)."""
    method, scope = methods.get_method(config.method), config.parallel.loss_scope
    # BatchNorm anywhere (torchvision_bn trunk, adversary_mhn): the initialised state has stats.
    has_stats = lambda state: bool(jax.tree_util.tree_leaves(state["batch_stats"]))

    def loss_fn(params, state, batch, model_kwargs):
        variables = {"params": params, "batch_stats": state["batch_stats"]}
        if has_stats(state):
            out, mutated = model.apply(variables, batch["image"], train=True,
                                       mutable=["batch_stats"], **model_kwargs)
        else:
            out, mutated = model.apply(variables, batch["image"], train=True, **model_kwargs), {}
        # The outputs the method's objective reads (batch axes from the method).
        outputs = {k: out[k] for k in method.batch_axes if k in out}
        # Per-step key for sampling objectives (ECAML's partners): a function of the state.
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        # The objective per loss group, averaged (§5.4; deml_jax/loss_groups.py).
        layout = loss_groups.make_layout(scope, config.parallel.loss_groups,
                                         jax.lax.axis_size(parallel.AXIS))
        loss, aux = loss_groups.grouped_objective(
            lambda o, l, **kw: method.objective(o, l, params, config, **kw), outputs,
            batch["label"], batch_axes=method.batch_axes, layout=layout, key=key)
        return loss, (aux, mutated.get("batch_stats", state["batch_stats"]))

    def step(state, batch):
        model_kwargs = method.model_kwargs(state, config) if method.model_kwargs else {}
        (_, (aux, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state, batch, model_kwargs)
        grads = parallel.tree_pmean(grads)  # gradients averaged over devices (§2.2)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(aux, grad_norm=logging_lib.tree_norm(grads),
                       param_norm=logging_lib.tree_norm(params), **model_kwargs)
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


def train_and_evaluate(config, workdir: str, *, allow_config_change=()) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

    Holds the workdir's lock for the whole run (process 0; a second run on the
    same workdir refuses to start), saves the resolved config to
    ``workdir/config.json`` and, on resume, refuses a config change that alters
    the model, the data or the objective unless its keys are in
    ``allow_config_change`` (see :mod:`deml_jax.workdir`).
    Returns the final test metrics (also written to ``workdir/results.json``).
    """
    config_lib.validate(config)
    primary = jax.process_index() == 0
    with (workdir_lib.WorkdirLock(workdir) if primary else contextlib.nullcontext()):
        workdir_lib.check_or_save_config(workdir, config, allow=allow_config_change,
                                         write=primary)
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict:
    from deml_jax import data_glue  # the data stack, imported only for real runs

    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    devices = select_devices(config)
    layout = data_glue.loss_layout(config)  # a batch that does not fit fails here
    model, tx = create_model(config), create_optimizer(config)
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
        logging_lib.log(optim.describe_multipliers(methods.optimizer_config(config),
                                                   state["params"]))
        logging_lib.log(f"batch: {config.dataset.global_batch_size} images a step in "
                        f"{layout.num_groups} loss group(s) (loss_scope={layout.scope!r}"
                        f"{', gathered' if layout.gather else ''})")
        _, skipped = snapshots.schedule(config)
        if skipped:
            logging_lib.log(f"config.eval.snapshot_steps past total_steps={config.total_steps} "
                            f"are not evaluated: {list(skipped)}")
    # Rows logged after the checkpoint we resume from are dropped (logged again).
    writer = logging_lib.MetricWriter(workdir, is_primary=primary, resume_step=start)
    embed = make_embed_fn(model, devices)
    batches = data_glue.train_batches(config, start, len(devices))
    stop_flag = ckpt_lib.install_preemption_handler()
    try:
        state = _loop(config, launcher, launcher.put_state(state), batches, start,
                      writer, checkpointer, stop_flag, embed, data_glue)
        if state is None:  # pre-empted: checkpoint saved
            return {}
        results, untrained = {}, None
        if config.eval.final_test:
            evaluator = data_glue.make_evaluator(config, embed(variables_of(state)), "test",
                                                 len(devices), on_degenerate="warn")
            results = evaluator.run()
            writer.write_scalars(int(state["step"]), {f"test/{k}": v for k, v in results.items()})
            if config.eval.get("untrained_control", False):
                # The same network at its initialisation (a pure function of config.seed
                # and the pretrained trunk, so resume-proof): one embedding pass, no training.
                init = initial_state(config, model, tx, jax.random.PRNGKey(config.seed))
                untrained = data_glue.evaluate(config, embed(variables_of(init)), "test",
                                               len(devices), on_degenerate="warn")
        # Every evaluated snapshot (this run's and those before a resume): results.json.
        summary = (snapshots.summarize(logging_lib.read_metrics(workdir), config.eval.best_metric)
                   if primary else {})  # host 0 writes metrics.jsonl
        if summary:
            if untrained is not None:
                summary[snapshots.UNTRAINED] = {"step": 0, "test": untrained}
            snapshots.write_results(workdir, summary)
            print(snapshots.format_summary(summary))
        if primary and results:
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
    images_per_step = config.dataset.global_batch_size  # whatever the device count
    test_steps = snapshots.loop_steps(config)  # config.eval.snapshot_steps
    schedule = optim.lr_schedule(config.optim, total_steps=config.total_steps)
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
        snapshot = done in test_steps  # a test evaluation (val too, for best_on_val)
        evaluate = config.dataset.val_split and (
            done % config.eval_every_steps == 0 or done == config.total_steps or snapshot)
        save = (done % config.checkpoint_every_steps == 0 or done == config.total_steps
                or preempted or evaluate or snapshot)  # evaluated steps are saved
        host = launcher.get_state(dstate) if save else None  # one device-to-host copy
        val = {}
        if evaluate:
            val = data_glue.evaluate(config, embed(variables_of(host)), "val",
                                     launcher.num_local_devices, on_degenerate="warn")
            val = {f"val/{k}": v for k, v in val.items()}
            writer.write_scalars(done, val)
        if snapshot:
            test = data_glue.evaluate(config, embed(variables_of(host)), "test",
                                      launcher.num_local_devices, on_degenerate="warn")
            writer.write_scalars(done, {f"test/{k}": v for k, v in test.items()})
        if save:
            # A degenerate val split (None metrics, warned) never selects "best".
            usable = val.get(f"val/{config.eval.best_metric}") is not None
            checkpointer.save(done, host, {"step": done}, metrics=val if usable else None)
        if preempted:
            logging_lib.log(f"pre-empted: saved step {done}; rerun the same command to resume")
            checkpointer.wait()
            return None
    return launcher.get_state(dstate)


def load_trained_state(config, workdir: str, which: str = "latest", *,
                       allow_config_change=()) -> State:
    """The host state of ``workdir``'s latest or best-on-validation checkpoint.

    Only reads: takes no lock, creates nothing (a missing workdir is an error
    naming it); compares ``config`` with the workdir's saved config (the
    training-only keys may differ, see :mod:`deml_jax.workdir`).
    """
    if which not in ("latest", "best"):
        raise ValueError(f"checkpoint must be 'latest' or 'best', got {which!r}")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist (expected the "
                                f"--workdir of a training run, holding checkpoints/)")
    workdir_lib.check_or_save_config(workdir, config, allow=allow_config_change,
                                     context="eval", write=False)
    abstract = abstract_state(config, create_model(config), create_optimizer(config))
    best = f"val/{config.eval.best_metric}" if which == "best" else None
    with ckpt_lib.Checkpointer(workdir, best_metric=best, read_only=True) as checkpointer:
        restored = (checkpointer.restore_best(abstract) if which == "best"
                    else checkpointer.restore_or_none(abstract))
    if restored is None:
        raise FileNotFoundError(f"no {which} checkpoint in {workdir!r}"
                                + (" (best needs config.dataset.val_split)"
                                   if which == "best" and not config.dataset.val_split else ""))
    return jax.tree.map(np.asarray, restored[0])


def trained_embedder(config, workdir: str, which: str = "latest", *, allow_config_change=()):
    """``(state, model, devices, embed)`` for a trained checkpoint (CLIs' common start)."""
    state = load_trained_state(config, workdir, which, allow_config_change=allow_config_change)
    model, devices = create_model(config), select_devices(config)
    embed = make_embed_fn(model, devices)(variables_of(state))
    return state, model, devices, embed
