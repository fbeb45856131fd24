"""The small trunk's gradient kernels: XLA's own ('native') vs the GEMM kernel gradient ('custom').

The CPU demos train on the small trunk (models/tiny.py), whose 3x3
convolutions are GoogLeNet's ``conv2d`` with per-backend gradient kernels
(models/kernels.py).  In one process this prints

1. per layer shape of the trunk at the demos' batch (20 images at 56 px; ABE-8
   runs its trunk tail on 8 x 20 = 160 images): the median time of one jitted
   gradient of ``sum(tanh(conv(x, k)))`` in both inputs, native then custom,
   their ratio and the largest gradient difference relative to the largest
   gradient;
2. per CPU demo recipe of configs/fashion_mnist_demo.py: the median train step
   (forward, backward, optimiser) with ``config.model.kernels`` native, then
   custom, and their ratio.

Usage:  python experiments/bench/conv_grad.py [--repeats 5] [--methods deml,u512,ecaml,cpf,abe8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)

from deml_jax import config_lib  # noqa: E402
from deml_jax.models import kernels  # noqa: E402
from deml_jax.models.googlenet import conv2d  # noqa: E402
from experiments.bench import method_step  # noqa: E402

# (name, input shape, output channels, stride)
LAYERS = [
    ("conv1        B=20", (20, 56, 56, 3), 16, 1),
    ("conv2        B=20", (20, 56, 56, 16), 32, 2),
    ("inception_4b B=20", (20, 28, 28, 32), 64, 2),
    ("inception_5b B=20", (20, 14, 14, 64), 128, 2),
    ("ABE 4a      B=160", (160, 28, 28, 32), 64, 1),
    ("ABE 4b      B=160", (160, 28, 28, 64), 64, 2),
]


def timed(fn, args, repeats):
    """Median seconds of ``repeats`` calls after a compiling warm-up, and the last output."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def layer_rows(repeats):
    rng = np.random.default_rng(0)
    print(f"{'layer':18} {'native ms':>10} {'custom ms':>10} {'speed-up':>8} {'max rel diff':>12}")
    for name, shape, cout, stride in LAYERS:
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        k = jnp.asarray(rng.normal(size=(3, 3, shape[3], cout)) * 0.1, jnp.float32)
        loss = lambda a, b: jnp.sum(jnp.tanh(conv2d(a, b, None, stride=stride, pad=1)))
        times, grads = {}, {}
        for mode in ("native", "custom"):
            with kernels.use_kernels(mode):  # traced inside the block
                fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
                times[mode], grads[mode] = timed(fn, (x, k), repeats)
        diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                   for a, b in zip(grads["native"], grads["custom"]))
        print(f"{name:18} {1e3 * times['native']:10.1f} {1e3 * times['custom']:10.1f} "
              f"{times['native'] / times['custom']:8.2f} {diff:12.1e}", flush=True)


def step_time(spec, mode, repeats):
    c = config_lib.load_config(spec)
    c.model.kernels = mode  # create_model fixes the kernels before the step is traced
    c.parallel.num_devices = 1
    r = method_step.time_train_step(c, repeats)
    return r["step_s"], r["batch"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", default="deml,u512,ecaml,cpf,abe8")
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"JAX {jax.__version__}; median of {args.repeats}")
    layer_rows(args.repeats)
    print(f"\n{'demo recipe':24} {'batch':>5} {'native s':>9} {'custom s':>9} {'speed-up':>8}")
    for m in args.methods.split(","):
        spec = os.path.join(ROOT, "configs", "fashion_mnist_demo.py") + ("" if m == "deml" else f":{m}")
        native, batch = step_time(spec, "native", args.repeats)
        custom, _ = step_time(spec, "custom", args.repeats)
        print(f"{'fashion_mnist_demo ' + m:24} {batch:5d} {native:9.3f} {custom:9.3f} "
              f"{native / custom:8.2f}", flush=True)


if __name__ == "__main__":
    main()
