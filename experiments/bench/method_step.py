"""Train-step cost of every method at its released batch, side by side (same run, same machine).

For each method of deml_jax/methods/ (its ``configs/cub200_<row>.py``), one
train step (forward + backward + optimiser update) on one device with the
row's released global batch: DeML(3,3) 52 (2 x 26), U512 130, ECAML 130 (65 x 2),
CPF 90 (45 x 2), ABE-8 as its config says.  Prints the median step time over
``--steps`` timed steps after one warm-up, images/s, and the cost per image
relative to U512.

Default: a reduced CPU mode (the tiny trunk at 56 px, models/tiny.py), whose
figures compare the methods' structure, not GoogLeNet; ``--full`` uses the
configs' BVLC GoogLeNet at 227 px (for an accelerator).  The released batch
runs on one device, so a loss sees the whole batch (the 2-GPU DeML recipe's
per-GPU loss halves differ only in the loss, a negligible part of the step).

Usage:  python experiments/bench/method_step.py [--full] [--steps 3] [--methods deml,u512,ecaml,cpf]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import flax.jax_utils
import jax
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)

from deml_jax import config_lib, methods, train  # noqa: E402

ROWS = {"deml": "deml", "u512": "u512", "ecaml": "ecaml", "cpf": "cpf", "abe": "abe8"}


def released_batch(c) -> int:
    return int(c.dataset.global_batch_size)  # the same on any device count


def bench(method: str, full: bool, steps: int, dataset: str):
    path = os.path.join(ROOT, "configs", f"{dataset}_{ROWS[method]}.py")
    if not os.path.exists(path):
        return None
    c = config_lib.load_config(path)
    if not full:
        c.model.backbone = "tiny"
        c.dataset.update(crop_size=56, image_size=64)
    c.parallel.update(num_devices=1, loss_scope="device")
    return dict(method=method, **time_train_step(c, steps))


def time_train_step(c, steps: int) -> dict:
    """One device, ``c``'s global batch of synthetic images: compile time and the median
    of ``steps`` timed train steps after one warm-up -> {batch, compile_s, step_s, images_per_s}."""
    batch = released_batch(c)
    model, tx = train.create_model(c), train.create_optimizer(c)
    run = jax.pmap(train.make_train_step(model, tx, c), axis_name="data", donate_argnums=(0,))
    state = train.initial_state(c, model, tx, jax.random.PRNGKey(0))
    state = flax.jax_utils.replicate(state, jax.local_devices()[:1])
    rng = np.random.default_rng(0)
    size = c.dataset.crop_size
    ipc = c.dataset.images_per_class
    labels = np.repeat(np.arange(batch // ipc), ipc)[:batch]
    if "num_classes" in c.model:
        labels = labels % c.model.num_classes
    data = {"image": rng.uniform(-120, 130, (1, batch, size, size, 3)).astype(np.float32),
            "label": labels[None].astype(np.int32)}
    t = time.perf_counter()
    compiled = run.lower(state, data).compile()
    compile_s = time.perf_counter() - t
    state, _ = compiled(state, data)  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    return dict(batch=batch, compile_s=compile_s, step_s=step_s, images_per_s=batch / step_s)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="BVLC GoogLeNet at 227 px")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dataset", default="cub200")
    p.add_argument("--methods", default=",".join(m for m in ROWS if m in methods.names()))
    args = p.parse_args()
    rows = []
    for m in args.methods.split(","):
        r = bench(m, args.full, args.steps, args.dataset)
        if r:
            rows.append(r)
            print(f"  {m}: {r['images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["method"] == "u512"), None)
    mode = "BVLC GoogLeNet, 227 px" if args.full else "reduced CPU mode: tiny trunk, 56 px"
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); {mode}; "
          f"median of {args.steps} steps")
    print(f"{'method':8} {'batch':>5} {'compile s':>10} {'step s':>8} {'images/s':>9} "
          f"{'s/image vs U512':>16}")
    for r in rows:
        rel = (base["images_per_s"] / r["images_per_s"]) if base else float("nan")
        print(f"{r['method']:8} {r['batch']:5d} {r['compile_s']:10.1f} {r['step_s']:8.3f} "
              f"{r['images_per_s']:9.1f} {rel:16.2f}")


if __name__ == "__main__":
    main()
