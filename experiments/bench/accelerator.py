"""The accelerator benchmark: one prepared script, one JSON, one Markdown table.

Run on one GPU/TPU (synthetic data and random init: no dataset, no weights)::

    python experiments/bench/accelerator.py --out runs/bench/accelerator
    python experiments/bench/accelerator.py --reduced --out runs/bench/accelerator_cpu   # CPU smoke (CI)

It measures, in one process on one device:

* ``methods``: one train step (forward + backward + optimiser) of DeML(3,3),
  U512 and every other method of the framework at its released batch and
  227 px (configs/cub200_<method>.py), in float32 and bfloat16: compile time,
  step time, images/s, peak device memory, achieved TFLOP/s (XLA's cost
  analysis of the compiled step) and MFU against the chip's peak;
* ``backbone``: the GoogLeNet (torchvision BatchNorm variant) train step,
  deml_jax vs torch on the same device (torchvision's ``googlenet``, else
  ``googlenet-pytorch``; cuDNN, channels-last and AMP as a torch user runs it);
* ``kernels``: the BVLC trunk's train step with the 'custom' (CPU-tuned) and
  'native' (XLA) gradient kernels (deml_jax/models/kernels.py);
* ``oam_share``: the random walk + boxes + crops of DeML(3,3)'s two branch
  transitions as a share of its step;
* ``knn``: exact retrieval metrics at SOP scale (60,502 x 504: Recall@1..1000
  and MAP@R) vs a torch ``matmul + topk`` k-NN on the same device;
* ``embed``: DeML(3,3) inference embedding throughput (images/s).

Every field is a number, or ``null`` with the reason next to it in
``reasons`` (a backend without memory statistics, torch missing, ...).
``--reduced`` (the default on CPU) shrinks batches, sizes and step counts so
that the whole script finishes in a few minutes on 2 CPU cores; CI runs it as
a smoke test.  Imports: jax, flax, optax, numpy, ml_collections (configs) and
optionally torch; never the data stack (TFDS, grain).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

# Dense peak TFLOP/s per chip: (bf16, fp32 as XLA runs it by default).  XLA's
# default matmul/conv precision on Ampere+ GPUs rounds fp32 inputs to TF32, so
# the fp32 peak is the TF32 tensor-core one there.  Vendor data sheets.
PEAK_TFLOPS = {
    "H200": (989.4, 494.7), "H100": (989.4, 494.7), "A100": (312.0, 156.0),
    "L4": (121.0, 60.0), "TPU v4": (275.0, None), "TPU v5 lite": (197.0, None),
    "TPU v5p": (459.0, None), "TPU v6 lite": (918.0, None),
}
METHOD_CONFIGS = {  # row name -> config file of the CUB recipe (released batch)
    "deml": "configs/cub200_deml.py", "u512": "configs/cub200_u512.py",
    "deml_adversary_mhn": "configs/cub200_deml_adversary_mhn.py",
    "abe8": "configs/cub200_abe8.py", "ecaml": "configs/cub200_ecaml.py",
    "cpf": "configs/cub200_cpf.py",
}


class Recorder:
    """Results plus the reason of every ``null``."""

    def __init__(self):
        self.data, self.reasons = {}, {}

    def put(self, path, value, reason=None):
        node = self.data
        *head, last = path.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
        if value is None:
            self.reasons[path] = reason or "not measured"

    def section(self, name, fn, *args):
        """Runs one section; a failure nulls it with the exception as the reason."""
        t = time.perf_counter()
        try:
            fn(self, *args)
        except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not stop
            self.put(name, None, f"error: {type(e).__name__}: {e}".splitlines()[0][:300])
            traceback.print_exc()
        print(f"[{name}] {time.perf_counter() - t:.1f} s", flush=True)


def device_info():
    d = jax.devices()[0]
    return {"platform": d.platform, "kind": d.device_kind, "count": jax.device_count(),
            "jax": jax.__version__, "date": datetime.date.today().isoformat()}


def peak_tflops(kind: str, dtype: str):
    for name, (bf16, fp32) in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def peak_memory():
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return (peak / 2**30, None) if peak else (None, "the backend reports no peak memory")


def flops_of(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 - cost analysis is optional per backend
        return None


def median_time(fn, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------
# Method train steps.

def method_config(path, args, dtype):
    from deml_jax import config_lib
    config = config_lib.load_config(os.path.join(ROOT, path))
    config.model.dtype = dtype
    config.parallel.num_devices = 1
    if args.reduced:
        if "backbone" in config.model:
            config.model.backbone = args.reduced_backbone
        config.dataset.crop_size = args.size
        config.dataset.image_size = max(config.dataset.image_size, args.size)
    return config


def synthetic_batch(config, batch, size, rng):
    ipc = config.dataset.images_per_class
    labels = np.repeat(np.arange(batch // ipc), ipc).astype(np.int32)
    if len(labels) != batch:
        raise ValueError(f"batch {batch} is not a whole number of {ipc}-image classes")
    images = rng.uniform(-120, 130, (1, batch, size, size, 3)).astype(np.float32)
    return {"image": images, "label": labels[None]}


def bench_method(rec, name, path, args, dtype):
    from deml_jax import train
    config = method_config(path, args, dtype)
    batch = args.batch or config.dataset.global_batch_size
    if args.reduced:  # a small batch of 2-image classes in at most its released groups
        config.dataset.global_batch_size = batch
        config.dataset.images_per_class = 2
        config.parallel.loss_groups = max(1, min(config.parallel.loss_groups, batch // 4))
    model, tx = train.create_model(config), train.create_optimizer(config)
    run = jax.pmap(train.make_train_step(model, tx, config), axis_name="data",
                   devices=jax.local_devices()[:1], donate_argnums=(0,))
    state = train.initial_state(config, model, tx, jax.random.PRNGKey(0))
    state = flax.jax_utils.replicate(state, jax.local_devices()[:1])
    data = synthetic_batch(config, batch, config.dataset.crop_size, np.random.default_rng(0))
    t = time.perf_counter()
    compiled = run.lower(state, data).compile()
    compile_s = time.perf_counter() - t
    holder = {"s": compiled(state, data)[0]}  # warm-up

    def one():
        holder["s"], metrics = compiled(holder["s"], data)
        return metrics

    step_s = median_time(one, args.steps)
    flops = flops_of(compiled)
    key = f"methods.{name}.{dtype}"
    rec.put(f"{key}.batch", batch)
    rec.put(f"{key}.size", config.dataset.crop_size)
    rec.put(f"{key}.compile_s", compile_s)
    rec.put(f"{key}.step_s", step_s)
    rec.put(f"{key}.images_per_s", batch / step_s)
    mem, why = peak_memory()
    rec.put(f"{key}.peak_memory_gib", mem, why)
    rec.put(f"{key}.tflops", flops / step_s / 1e12 if flops else None,
            "XLA's cost analysis gave no flop count")
    peak = peak_tflops(jax.devices()[0].device_kind, dtype)
    rec.put(f"{key}.mfu", flops / step_s / 1e12 / peak if flops and peak else None,
            "no peak TFLOP/s known for this chip" if not peak else "no flop count")


def bench_methods(rec, args):
    for name, path in METHOD_CONFIGS.items():
        if not os.path.exists(os.path.join(ROOT, path)):
            rec.put(f"methods.{name}", None, f"{path} does not exist")
            continue
        for dtype in args.dtypes:
            rec.section(f"methods.{name}.{dtype}", bench_method, name, path, args, dtype)


# ----------------------------------------------------------------------------
# GoogLeNet BN train step: deml_jax vs torch; the two kernel paths.

def googlenet_step_jax(variant, batch, size, steps, dtype="float32"):
    import optax
    from deml_jax.models.googlenet import GoogLeNet
    tv = variant == "torchvision_bn"
    model = GoogLeNet(variant=variant, num_classes=1000 if tv else None, dtype=jnp.dtype(dtype))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 1000, batch))
    variables = model.init(jax.random.PRNGKey(0), x[:1], stop="logits" if tv else "pool5")
    tx = optax.adam(1e-4)
    opt = tx.init(variables["params"])

    def loss_fn(params, stats, x, y, rng):
        (out, _), upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                    stop="logits" if tv else "pool5", mutable=["batch_stats"],
                                    rngs={"dropout": rng})
        logits = out.astype(jnp.float32)
        if not tv:
            logits = logits[:, :1000]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    @jax.jit
    def step(params, stats, opt, x, y, rng):
        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, rng)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), upd.get("batch_stats", stats), opt, loss

    params, stats = variables["params"], variables.get("batch_stats", {})
    rngk = jax.random.PRNGKey(1)
    t = time.perf_counter()
    compiled = step.lower(params, stats, opt, x, y, rngk).compile()
    compile_s = time.perf_counter() - t
    holder = [params, stats, opt]

    def one():
        holder[0], holder[1], holder[2], loss = compiled(*holder, x, y, rngk)
        return loss

    one()
    return compile_s, median_time(one, steps)


def torch_googlenet_step(batch, size, steps, amp):
    import torch
    try:
        import torchvision
        model, source = torchvision.models.googlenet(weights=None, aux_logits=False,
                                                     init_weights=True), "torchvision"
    except ImportError:
        from googlenet_pytorch import GoogLeNet as TorchGoogLeNet
        model, source = TorchGoogLeNet.from_name("googlenet"), "googlenet-pytorch"
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    model = model.to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=dev)
    use_amp = amp and cuda
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def one():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16 if dev.type == "cpu" else torch.float16,
                            enabled=use_amp):
            out = model(x)
            out = out.logits if hasattr(out, "logits") else out
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if cuda:
            torch.cuda.synchronize()
        return None

    one()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    return statistics.median(times), source, use_amp


def bench_backbone(rec, args):
    batch, size = args.backbone_batch, args.backbone_size
    for dtype in args.dtypes:
        compile_s, step_s = googlenet_step_jax("torchvision_bn", batch, size, args.steps, dtype)
        rec.put(f"backbone.deml_jax_{dtype}.step_s", step_s)
        rec.put(f"backbone.deml_jax_{dtype}.images_per_s", batch / step_s)
        rec.put(f"backbone.deml_jax_{dtype}.compile_s", compile_s)
    rec.put("backbone.batch", batch)
    rec.put("backbone.size", size)
    try:
        import torch  # noqa: F401
    except ImportError:
        rec.put("backbone.torch", None, "torch is not installed")
        return
    for amp in (False, True):
        tag = "torch_amp" if amp else "torch_fp32"
        step_s, source, used = torch_googlenet_step(batch, size, args.steps, amp)
        if amp and not used:
            rec.put(f"backbone.{tag}", None, "AMP measured on CUDA only")
            continue
        rec.put(f"backbone.{tag}.step_s", step_s)
        rec.put(f"backbone.{tag}.images_per_s", batch / step_s)
        rec.put("backbone.torch_model", source)
    best_torch = min(v["step_s"] for k, v in rec.data["backbone"].items()
                     if k.startswith("torch_") and isinstance(v, dict))
    best_ours = min(v["step_s"] for k, v in rec.data["backbone"].items()
                    if k.startswith("deml_jax_") and isinstance(v, dict))
    rec.put("backbone.ours_over_torch", best_ours / best_torch)


def bench_kernels(rec, args):
    from deml_jax.models import kernels
    for mode in ("custom", "native"):
        with kernels.use_kernels(mode):
            compile_s, step_s = googlenet_step_jax("bvlc", args.backbone_batch,
                                                   args.backbone_size, args.steps)
        rec.put(f"kernels.{mode}.step_s", step_s)
        rec.put(f"kernels.{mode}.compile_s", compile_s)
    rec.put("kernels.default", kernels.resolve())
    rec.put("kernels.native_over_custom",
            rec.data["kernels"]["native"]["step_s"] / rec.data["kernels"]["custom"]["step_s"])


# ----------------------------------------------------------------------------
# Object attention share, k-NN evaluation, embedding throughput.

def bench_oam_share(rec, args):
    from deml_jax.ops import object_attention_crop
    batch, size = args.batch or 52, args.size
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.random((batch, 7, 7, 1024), np.float32))
    images = jnp.asarray(rng.uniform(-120, 130, (batch, size, size, 3)).astype(np.float32))
    oam = jax.jit(lambda x, f: object_attention_crop(x, f, out_size=size)["crops"])
    jax.block_until_ready(oam(images, feats))
    oam_s = 2 * median_time(lambda: oam(images, feats), max(args.steps, 3))  # I-1 transitions
    rec.put("oam_share.oam_s", oam_s)
    deml = (rec.data.get("methods") or {}).get("deml") or {}
    step = (deml.get("float32") or {}).get("step_s")
    rec.put("oam_share.fraction_of_deml_step", oam_s / step if step else None,
            "the DeML float32 step was not measured")


def bench_knn(rec, args):
    from deml_jax.evaluation import retrieval_metrics
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from knn import make_data  # experiments/bench/knn.py: SOP-like classes of 2..12

    n = args.knn_n
    x, labels = make_data("sop", n=n)
    labels = labels.astype(np.int32)
    ks = tuple(k for k in (1, 10, 100, 1000) if k < n)
    t = time.perf_counter()
    out = retrieval_metrics(jnp.asarray(x), jnp.asarray(labels), ks=ks)
    jax.block_until_ready(jax.tree.leaves(out))
    first = time.perf_counter() - t
    warm = median_time(lambda: jax.tree.leaves(retrieval_metrics(
        jnp.asarray(x), jnp.asarray(labels), ks=ks)), 2)
    rec.put("knn.n", n)
    rec.put("knn.ks", list(ks))
    rec.put("knn.ours_first_s", first)
    rec.put("knn.ours_warm_s", warm)
    try:
        import torch
    except ImportError:
        rec.put("knn.torch_s", None, "torch is not installed")
        return
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    xt = torch.from_numpy(x).to(dev)
    k = max(ks) + 1

    def torch_knn():
        for start in range(0, n, 4096):
            sims = xt[start:start + 4096] @ xt.T
            torch.topk(sims, k, dim=1)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    torch_knn()
    t = time.perf_counter()
    torch_knn()
    rec.put("knn.torch_topk_s", time.perf_counter() - t)
    rec.put("knn.torch_device", dev.type)
    rec.put("knn.ours_over_torch", warm / rec.data["knn"]["torch_topk_s"])


def bench_embed(rec, args):
    from deml_jax import train
    config = method_config(METHOD_CONFIGS["deml"], args, "bfloat16" if not args.reduced else "float32")
    model = train.create_model(config)
    size, batch = config.dataset.crop_size, args.embed_batch
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)
    x = jnp.asarray(np.random.default_rng(0).uniform(-120, 130, (batch, size, size, 3)),
                    jnp.float32)
    embed = jax.jit(lambda v, x: model.apply(v, x, train=False)["embedding"])
    jax.block_until_ready(embed(variables, x))
    step_s = median_time(lambda: embed(variables, x), max(args.steps, 3))
    rec.put("embed.batch", batch)
    rec.put("embed.dtype", config.model.dtype)
    rec.put("embed.images_per_s", batch / step_s)


# ----------------------------------------------------------------------------
# Report.

def fmt(v, digits=2):
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(rec) -> str:
    d, info = rec.data, rec.data["device"]
    lines = [f"Measured {info['date']} on {info['kind']} ({info['platform']}), JAX {info['jax']}"
             + (" - reduced CPU mode" if d.get("reduced") else "") + ".", "",
             "| train step | dtype | batch x px | compile s | step s | images/s | peak GiB | TFLOP/s | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, rows in (d.get("methods") or {}).items():
        for dtype, r in (rows or {}).items():
            if isinstance(r, dict):
                lines.append(f"| {name} | {dtype} | {r['batch']} x {r['size']} | {fmt(r['compile_s'], 1)} "
                             f"| {fmt(r['step_s'], 4)} | {fmt(r['images_per_s'], 1)} "
                             f"| {fmt(r['peak_memory_gib'])} | {fmt(r['tflops'])} | {fmt(r['mfu'], 3)} |")
    b = d.get("backbone") or {}
    if b:
        lines += ["", f"GoogLeNet (BN) train step, batch {b.get('batch')} at {b.get('size')} px:", "",
                  "| implementation | step s | images/s |", "| --- | --- | --- |"]
        for k, v in b.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {fmt(v['step_s'], 4)} | {fmt(v['images_per_s'], 1)} |")
        lines.append(f"\ndeml_jax / torch step time: {fmt(b.get('ours_over_torch'), 2)}")
    k = d.get("kernels") or {}
    if k:
        lines.append(f"\nBVLC trunk step, custom vs native kernels: {fmt(k['custom']['step_s'], 4)} s vs "
                     f"{fmt(k['native']['step_s'], 4)} s (native / custom {fmt(k['native_over_custom'])}; "
                     f"default here: {k['default']})")
    o = d.get("oam_share") or {}
    if o:
        lines.append(f"\nObject attention (2 transitions): {fmt(o['oam_s'] * 1e3, 1)} ms = "
                     f"{fmt((o['fraction_of_deml_step'] or 0) * 100, 2)} % of the DeML float32 step")
    n = d.get("knn") or {}
    if n:
        lines.append(f"\nExact retrieval metrics, {n['n']:,} x 504 (Recall@{n['ks']}, MAP@R): "
                     f"{fmt(n['ours_warm_s'], 3)} s warm ({fmt(n['ours_first_s'], 2)} s first); "
                     f"torch matmul + topk k-NN only: {fmt(n.get('torch_topk_s'), 3)} s "
                     f"(ours / torch {fmt(n.get('ours_over_torch'))})")
    e = d.get("embed") or {}
    if e:
        lines.append(f"\nDeML(3,3) embedding at evaluation ({e['dtype']}): {fmt(e['images_per_s'], 1)} images/s")
    if rec.reasons:
        lines += ["", "Nulls: " + "; ".join(f"`{k}`: {v}" for k, v in rec.reasons.items())]
    return "\n".join(lines) + "\n"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/accelerator", help="directory for the JSON and .md")
    p.add_argument("--reduced", action="store_true", default=None,
                   help="small batches/sizes/steps (default on CPU)")
    p.add_argument("--full", dest="reduced", action="store_false", help="full sizes even on CPU")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--only", default="", help="comma list of sections to run")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if a section failed (a null whose reason is an error); CI uses it")
    args = p.parse_args(argv)
    if args.reduced is None:
        args.reduced = jax.default_backend() == "cpu"
    r = args.reduced
    args.steps = args.steps or (2 if r else 10)
    args.size = 56 if r else 227
    args.batch = 8 if r else None  # None: each method's released global batch
    args.reduced_backbone = "tiny"
    args.dtypes = ("float32",) if r else ("float32", "bfloat16")
    args.backbone_batch, args.backbone_size = (4, 64) if r else (52, 224)
    args.knn_n = 3000 if r else 60502
    args.embed_batch = 16 if r else 256
    return args


SECTIONS = ("methods", "backbone", "kernels", "oam_share", "knn", "embed")


def main(argv=None) -> dict:
    args = parse(argv)
    rec = Recorder()
    rec.put("device", device_info())
    rec.put("reduced", bool(args.reduced))
    only = set(filter(None, args.only.split(","))) or set(SECTIONS)
    for name in SECTIONS:
        if name not in only:
            rec.put(name, None, "not selected (--only)")
        elif name == "methods":
            bench_methods(rec, args)
        else:
            rec.section(name, globals()[f"bench_{name}"], args)
    os.makedirs(args.out, exist_ok=True)
    payload = dict(rec.data, reasons=rec.reasons)
    with open(os.path.join(args.out, "accelerator.json"), "w") as f:
        json.dump(payload, f, indent=2, allow_nan=False)
    table = markdown(rec)
    with open(os.path.join(args.out, "accelerator.md"), "w") as f:
        f.write(table)
    print(table)
    errors = {k: v for k, v in rec.reasons.items() if v.startswith("error:")}
    if args.strict and errors:
        raise SystemExit(f"accelerator benchmark: {len(errors)} section(s) failed: {errors}")
    return payload


if __name__ == "__main__":
    main()
