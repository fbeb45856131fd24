"""DeML train-step benchmark: images/s, compile time, the object-attention share.

Prints, on the machine at hand, for the released DeML(3,3) (BVLC trunks,
227 px) on one device:

* compile time of the full train step (forward + backward + Caffe-Adam update);
* images/s of the step (median of ``--steps`` timed steps after one warm-up);
* the time of the object-attention work inside one step (random walk on the
  7x7x1024 map, box, crop-resize to 227, for I-1 = 2 branch transitions) and
  its share of the step;
* with ``--dtype bfloat16`` the step in bf16 compute (float32 params);
* achieved TFLOP/s from XLA's cost analysis of the compiled step.

Usage:  python experiments/bench/deml_step.py [--batch 52] [--steps 3] [--dtype float32]
The released batch is 2 x 26 (two GPUs); on one device ``--batch 52`` has the
same arithmetic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from configs import common  # noqa: E402
from deml_jax import optim, train  # noqa: E402
from deml_jax.ops import object_attention_crop  # noqa: E402


def timed(fn, *args, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=52)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--size", type=int, default=227)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--backbone", default="bvlc")
    args = p.parse_args()

    config = common.make_config("cub200", "deml")
    config.model.dtype, config.model.backbone = args.dtype, args.backbone
    config.dataset.crop_size = args.size
    model, tx = train.create_model(config), optim.make_optimizer(config.optim, total_steps=config.total_steps)
    step_fn = train.make_train_step(model, tx, config)
    run = jax.pmap(step_fn, axis_name="data", donate_argnums=(0,))
    state = train.initial_state(config, model, tx, jax.random.PRNGKey(0))
    state = flax.jax_utils.replicate(state, jax.local_devices()[:1])
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-120, 130, (1, args.batch, args.size, args.size, 3)).astype(np.float32),
             "label": np.repeat(np.arange(args.batch // 2), 2)[None].astype(np.int32)}

    t = time.perf_counter()
    compiled = run.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    flops = _flops(compiled)
    state, _ = compiled(state, batch)  # warm-up
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)

    feats = jnp.asarray(rng.random((args.batch, 7, 7, 1024), np.float32))
    images = jnp.asarray(batch["image"][0])
    oam = jax.jit(lambda x, f: object_attention_crop(x, f, out_size=args.size)["crops"])
    jax.block_until_ready(oam(images, feats))
    oam_s = (config.model.num_branches - 1) * timed(oam, images, feats, repeats=5)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {args.dtype}, "
          f"DeML({config.model.num_branches},{config.model.num_learners}) {args.backbone} "
          f"at {args.size} px, batch {args.batch}")
    print(f"compile            {compile_s:8.1f} s")
    print(f"train step         {step_s:8.3f} s  (median of {args.steps})")
    print(f"images/s           {args.batch / step_s:8.2f}")
    print(f"object attention   {oam_s * 1e3:8.1f} ms per step ({100 * oam_s / step_s:.2f}% of the step)")
    if flops:
        print(f"achieved           {flops / step_s / 1e12:8.3f} TFLOP/s ({flops / 1e9:.0f} GFLOP per step)")


def _flops(compiled) -> float:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0))
    except Exception:  # cost analysis is optional per backend
        return 0.0


if __name__ == "__main__":
    main()
