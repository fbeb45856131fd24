"""Every released constant, checked in every benchmark config (docs/reference.md).

The table below is written from the reference (released Caffe prototxts and
solvers, as documented in docs/reference.md), one row per constant: (config
key, released value, source section).  It is checked against the resolved
config of each ``configs/<benchmark>_<method>.py`` file, never against
``configs/common.py``, so changing a constant in ``common.py`` or in a
benchmark config fails here.  Configs are discovered by glob, so new rows of
a known method (e.g. ``*_deml_adversary_mhn.py``) are covered when they land.
"""

import glob
import importlib.util
import math
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = ("cub200", "cars196", "sop", "inshop")
REQUIRED_METHODS = ("deml", "deml_adversary", "u512")
OPTIONAL_METHODS = ("deml_adversary_mhn",)

# (key, released value, source section) shared by every benchmark row.
COMMON = [
    ("loss.alpha", 2.0, "§5.1"),
    ("loss.beta", 0.5, "§5.1"),
    ("loss.cost_pos", 1.0, "§5.1"),
    ("loss.shrinkage", 0.06, "§5.1"),
    ("optim.base_lr", 1e-5, "§6"),
    ("optim.schedule", "step", "§6"),
    ("optim.b1", 0.9, "§6"),
    ("optim.b2", 0.999, "§6"),
    ("optim.eps", 1e-8, "§6"),
    ("optim.weight_decay", 2e-4, "§5.4, §6"),
    ("dataset.mean_bgr", (123.0, 117.0, 104.0), "§2.3"),
    ("dataset.crop_size", 227, "§2.3"),
    ("dataset.image_size", 256, "§2.1"),
    ("dataset.variant", "pad256", "§2.1"),
    ("dataset.augmentation", "caffe", "§2.3"),
    ("dataset.images_per_class", 2, "§2.2"),
    ("model.backbone", "bvlc", "§3.2"),
]

# DeML(3,3) rows: examples/CUB/DeML3-3_512.
DEML = [
    ("model.num_branches", 3, "§0"),
    ("model.num_learners", 3, "§0"),
    ("model.embedding_dim", 56, "§3.4"),
    ("model.channel_attention", "spatial", "§3.3"),
    ("model.cam_hidden", 64, "§3.3"),
    ("model.oam_steps", 10, "§4 step 4"),
    ("model.oam_sigma_ratio", 0.15, "§4 step 2"),
    ("model.oam_converged", False, "§4 step 4"),
    ("loss.cost_neg", 35.0, "§5.1"),
    ("loss.margin", 2.0, "§5.2"),
    ("loss.diversity_weight", 0.2, "§5.2"),
    ("loss.act_weight", 0.014, "§5.3"),
    ("loss.row_norm_lambda", 0.5, "§5.3"),
    ("dataset.global_batch_size", 52, "§2.2"),
    ("parallel.loss_groups", 2, "§2.2, §5.4"),
    ("total_steps", 20_000, "§6"),
    ("optim.step_size", 15_000, "§6"),
    ("optim.gamma", 0.8, "§6"),
    ("eval.snapshot_steps", tuple(range(10_500, 15_001, 500)), "§6, §7"),
    ("eval.batch_size_per_device", 50, "§2.3"),
]

# U512 rows: examples/CUB/U512 (§8).
U512 = [
    ("model.num_branches", 1, "§8"),
    ("model.num_learners", 1, "§8"),
    ("model.embedding_dim", 512, "§8"),
    ("model.channel_attention", "none", "§8"),
    ("loss.cost_neg", 25.0, "§5.1, §8"),
    ("loss.diversity", "none", "§8"),
    ("loss.act_weight", 0.0, "§8"),
    ("loss.row_norm_lambda", 0.0, "§8"),
    ("dataset.global_batch_size", 130, "§2.2, §8"),
    ("parallel.loss_groups", 1, "§8"),
    ("total_steps", 5_000, "§6, §8"),
    ("optim.step_size", 5_000, "§6"),
    ("optim.gamma", 0.1, "§6"),
    ("eval.batch_size_per_device", 200, "§2.3, §8"),
]

PER_METHOD = {
    "deml": DEML + [("loss.diversity", "hinge", "§5.2, §14")],
    "deml_adversary": DEML + [
        ("loss.diversity", "adversary", "§14.1"),
        ("loss.adversary_gamma", 10.0, "§9.1"),
        ("loss.adversary_row_norm_lambda", 0.5, "§14.1"),
    ],
    "deml_adversary_mhn": DEML + [
        ("loss.diversity", "adversary_mhn", "related-methods.md §1.3"),
        ("loss.adversary_gamma", 10.0, "§9.1"),
    ],
    "u512": U512,
}

# Recall@K set and evaluation mode of each benchmark (§7, §14.3).
PER_BENCHMARK = {
    "cub200": [("eval.ks", (1, 2, 4, 8), "§7"), ("eval.mode", "self", "§7")],
    "cars196": [("eval.ks", (1, 2, 4, 8), "§14.3"), ("eval.mode", "self", "§14.3")],
    "sop": [("eval.ks", (1, 10, 100, 1000), "§14.3"), ("eval.mode", "self", "§14.3")],
    "inshop": [("eval.ks", (1, 10, 20, 30, 40, 50), "§14.3"),
               ("eval.mode", "query_gallery", "§14.3")],
}

# Learning-rate and decay multipliers (§3.1, §3.3, §3.4, §6): parameter path ->
# (lr_mult, decay_mult), resolved through the config's first-match regex rules.
MULTIPLIERS = {
    "branch_0/trunk/conv1_7x7_s2/kernel": (1.0, 1.0),
    "branch_0/trunk/conv1_7x7_s2/bias": (2.0, 0.0),
    "branch_2/trunk/inception_5b_pool_proj/kernel": (1.0, 1.0),
    "branch_1/trunk/inception_4b_3x3/bias": (2.0, 0.0),
    "branch_1/cam_2/reduce/kernel": (10.0, 1.0),
    "branch_0/cam_0/expand/bias": (20.0, 0.0),
    "branch_2/embed/kernel": (10.0, 1.0),
}
CAFFE_DEFAULT_LR_MULT, UNMATCHED_DECAY_MULT = 1.0, 0.0

MISSING = object()


def config_files():
    """(name, dataset, method, path) of every benchmark config of a known method."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        name = os.path.basename(path)[:-3]
        dataset, _, method = name.partition("_")
        if dataset in BENCHMARKS and method in REQUIRED_METHODS + OPTIONAL_METHODS:
            found.append((name, dataset, method, path))
    return found


def load_config(name, path):
    spec = importlib.util.spec_from_file_location(f"_released_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def lookup(cfg, key):
    node = cfg
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            return MISSING
    return node


def same(got, want):
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want or (isinstance(got, bool) and got == want)
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(want, tuple):
        try:
            got = tuple(got)
        except TypeError:
            return False
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    return got == want


def multiplier(path, rules, default):
    for regex, mult in rules:
        if re.search(regex, path):
            return float(mult)
    return default


def test_every_benchmark_row_exists():
    names = {n for n, *_ in config_files()}
    missing = [f"configs/{d}_{m}.py" for d in BENCHMARKS for m in REQUIRED_METHODS
               if f"{d}_{m}" not in names]
    assert not missing, f"benchmark configs missing: {missing}"


@pytest.mark.parametrize("name,dataset,method,path", config_files(),
                         ids=[c[0] for c in config_files()])
def test_released_constants(name, dataset, method, path):
    cfg = load_config(name, path)
    table = COMMON + PER_METHOD[method] + PER_BENCHMARK[dataset]
    wrong = []
    for key, want, source in table:
        got = lookup(cfg, key)
        if got is MISSING:
            wrong.append(f"{key}: missing (released {want!r}, {source})")
        elif not same(got, want):
            wrong.append(f"{key}: {got!r} != released {want!r} ({source})")
    optim = lookup(cfg, "optim")
    if optim is not MISSING:
        for path_, (lr, decay) in MULTIPLIERS.items():
            got = (multiplier(path_, tuple(optim.get("lr_mults", ())), CAFFE_DEFAULT_LR_MULT),
                   multiplier(path_, tuple(optim.get("decay_mults", ())), UNMATCHED_DECAY_MULT))
            if got != (lr, decay):
                wrong.append(f"optim.lr_mults/decay_mults on {path_}: {got} != released "
                             f"{(lr, decay)} (§3.1, §3.3, §3.4, §6)")
    assert not wrong, f"configs/{name}.py:\n  " + "\n  ".join(wrong)


def test_classes_per_loss_group_is_released_13_for_deml():
    """§2.2: each 26-image sub-batch is 13 classes x 2 images (65 x 2 for U512)."""
    for name, _, method, path in config_files():
        cfg = load_config(name, path)
        batch = lookup(cfg, "dataset.global_batch_size")
        groups = lookup(cfg, "parallel.loss_groups")
        per_class = lookup(cfg, "dataset.images_per_class")
        assert MISSING not in (batch, groups, per_class), (name, batch, groups, per_class)
        want = 65 if method == "u512" else 13
        assert batch == groups * per_class * want, (name, batch, groups, per_class)
