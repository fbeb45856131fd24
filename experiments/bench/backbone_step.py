"""Benchmark: images/s of one GoogLeNet train step, deml_jax (JAX/Flax) vs torch CPU.

Step = forward + backward + optimizer update (Adam by default, lr 1e-5 as in
docs/reference.md) of a GoogLeNet + 1024->C classifier with softmax cross-entropy:

* jax torchvision_bn: ``GoogLeNet(variant='torchvision_bn', num_classes=C)``, train
  mode (batch-stat BN, dropout), jit with the state donated.
* torch: ``googlenet_pytorch.GoogLeNet`` (torchvision's architecture), same batch,
  ``torch.set_num_threads(--threads)``.
* jax bvlc: ``GoogLeNet(variant='bvlc')`` (§3.2, LRN, no BN) pool5 + a 1024->C head,
  at --bvlc_size (227, the released code's crop).

Defaults: batch 52 (one DeML iteration, §2.2), 224 px for the torchvision pair.
XLA flags must be set before jax starts, so --xla_flags is applied here; run the
script once per flag set to compare them.  Prints compile time, median step time,
images/s and the torch/jax time ratio.

  python experiments/bench/backbone_step.py --batch 52 --steps 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=52)
    p.add_argument("--size", type=int, default=224, help="input size, torchvision pair")
    p.add_argument("--bvlc_size", type=int, default=227, help="input size, bvlc step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compile")
    p.add_argument("--num_classes", type=int, default=100)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS")
    p.add_argument("--no_fuse_1x1", action="store_true", help="unfused inception 1x1s")
    p.add_argument("--torch_channels_last", action="store_true")
    p.add_argument("--skip", default="", help="comma list of jax_tv,torch,jax_bvlc")
    p.add_argument("--with_plain", action="store_true", help="add a jax_tv row that uses "
                   "XLA's default conv/max-pool gradients (our custom VJPs off)")
    return p.parse_args(argv)


def interleaved(runs: dict, steps: int, warmup: int) -> dict:
    """Times each ``runs[name]()`` ``steps`` times, round-robin so that a busy
    shared machine slows every implementation alike; returns per-name medians of
    (wall seconds, process CPU seconds)."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for _ in range(steps):
        for name, fn in runs.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in runs}


def plain_autodiff_ops():
    """lax conv / reduce_window with XLA's default gradients (the 'naive' JAX step)."""
    from jax import lax

    def conv2d(x, kernel, bias, *, stride=1, pad=0, dtype=None):
        y = lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (stride, stride),
                                     ((pad, pad), (pad, pad)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if bias is None else y + bias.astype(dtype)

    def max_pool_ceil(x, k, s, p=0):
        from deml_jax.models.googlenet import ceil_pool_padding
        _, hl, hh = ceil_pool_padding(x.shape[1], k, s, p)
        _, wl, wh = ceil_pool_padding(x.shape[2], k, s, p)
        return lax.reduce_window(x, -float("inf"), lax.max, (1, k, k, 1), (1, s, s, 1),
                                 ((0, 0), (hl, hh), (wl, wh), (0, 0)))
    return {"conv2d": conv2d, "max_pool_ceil": max_pool_ceil}


def jax_step_bench(args, variant, plain=False):
    """Compiles the step (with the plain ops patched in while tracing if asked)."""
    from deml_jax.models import googlenet as G
    saved = {k: getattr(G, k) for k in ("conv2d", "max_pool_ceil")}
    if plain:
        for k, v in plain_autodiff_ops().items():
            setattr(G, k, v)
    try:
        return _jax_step_bench(args, variant)
    finally:
        for k, v in saved.items():
            setattr(G, k, v)


def _jax_step_bench(args, variant):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from deml_jax.models.googlenet import GoogLeNet

    tv = variant == "torchvision_bn"
    size = args.size if tv else args.bvlc_size
    model = GoogLeNet(variant=variant, num_classes=args.num_classes if tv else None,
                      dtype=jnp.dtype(args.dtype), fuse_1x1=not args.no_fuse_1x1)
    stop = "logits" if tv else "pool5"
    # Param shapes do not depend on the input size: initialise on a tiny image.
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3)), stop=stop))(
        jax.random.key(0))
    params = {"net": variables["params"]}
    if not tv:
        params["head"] = 0.01 * jax.random.normal(jax.random.key(1), (1024, args.num_classes))
    stats = variables.get("batch_stats", {})
    tx = optax.adam(1e-5) if args.optimizer == "adam" else optax.sgd(1e-3, momentum=0.9)
    state = (params, stats, tx.init(params))

    def loss_fn(params, stats, x, y, rng):
        out, new = model.apply({"params": params["net"], "batch_stats": stats}, x, train=True,
                               stop=stop, mutable=["batch_stats"], rngs={"dropout": rng})
        logits = out[0] if tv else out[0] @ params["head"].astype(out[0].dtype)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
        return loss.mean(), new.get("batch_stats", {})

    def step(state, x, y, rng):
        params, stats, opt = state
        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, rng)
        updates, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, updates), stats, opt), loss

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0, 50, (args.batch, size, size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, args.num_classes, args.batch))
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, x, y, jax.random.key(2)).compile()
    compile_s = time.perf_counter() - t
    holder = [state]

    def run():
        holder[0], loss = compiled(holder[0], x, y, jax.random.key(3))
        loss.block_until_ready()

    return compile_s, run, size


def torch_step_bench(args):
    import torch
    import torch.nn.functional as F
    from googlenet_pytorch import GoogLeNet as TorchGoogLeNet

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TorchGoogLeNet.from_name("googlenet", override_params={
        "num_classes": args.num_classes, "aux_logits": False, "transform_input": False})
    model.train()
    x = torch.randn(args.batch, 3, args.size, args.size) * 50
    if args.torch_channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch,))
    opt = (torch.optim.Adam(model.parameters(), 1e-5) if args.optimizer == "adam"
           else torch.optim.SGD(model.parameters(), 1e-3, momentum=0.9))

    def run():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return 0.0, run, args.size


def main(argv=None):
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    skip = set(filter(None, args.skip.split(",")))
    setups = {}
    for name, fn in [("jax_tv", lambda: jax_step_bench(args, "torchvision_bn")),
                     ("torch", lambda: torch_step_bench(args)),
                     ("jax_bvlc", lambda: jax_step_bench(args, "bvlc")),
                     ("jax_tv_plain", lambda: jax_step_bench(args, "torchvision_bn", True))]:
        if name not in skip and (name != "jax_tv_plain" or args.with_plain):
            setups[name] = fn()
            print(f"  set up {name}: compile {setups[name][0]:.1f} s", flush=True)
    times = interleaved({k: v[1] for k, v in setups.items()}, args.steps, args.warmup)
    print(f"\nbatch {args.batch}, optimizer {args.optimizer}, threads {args.threads}, "
          f"dtype {args.dtype}, median of {args.steps} interleaved steps after "
          f"{args.warmup} warm-up, XLA_FLAGS='{os.environ['XLA_FLAGS']}', "
          f"fuse_1x1={not args.no_fuse_1x1}, torch channels_last={args.torch_channels_last}")
    print(f"{'impl':<13}{'size':>6}{'compile_s':>11}{'step_s':>9}{'cpu_s':>8}{'img/s':>8}")
    for name, (comp, _, size) in setups.items():
        wall, cpu = times[name]
        print(f"{name:<13}{size:>6}{comp:>11.1f}{wall:>9.3f}{cpu:>8.2f}{args.batch / wall:>8.2f}")
    if "jax_tv" in times and "torch" in times:
        print(f"jax_tv step time / torch step time = "
              f"{times['jax_tv'][0] / times['torch'][0]:.2f}")

if __name__ == "__main__":
    main()
