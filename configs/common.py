"""Shared defaults of every deml_jax config.

Every constant of the method lives here with its source in
``docs/reference.md`` (cited as §N).  Per-row config files
(``configs/<dataset>_<method>.py``) start from :func:`get_base_config` and
override what differs; ``runlocal`` shrinks any of them to a smoke run.

Config arguments follow big_vision: ``--config configs/cub200_deml.py:runlocal``
passes ``"runlocal"`` to ``get_config``; several arguments are comma separated.
"""

from __future__ import annotations

import ml_collections

from deml_jax.evaluation.metrics import RECALL_KS
from deml_jax.optim import RELEASED_DECAY_MULTS, RELEASED_LR_MULTS  # §3, §6

# Dataset table: split names and evaluation mode (§7, §14.3); the Recall@K sets
# come from the evaluation package so both always agree.
DATASETS = {
    "cub200": dict(train="train", test="test", ks=RECALL_KS["cub200"], mode="self"),
    "cars196": dict(train="train", test="test", ks=RECALL_KS["cars196"], mode="self"),
    "sop": dict(train="train", test="test", ks=RECALL_KS["sop"], mode="self"),
    "inshop": dict(train="train", test=("query", "gallery"), ks=RECALL_KS["inshop"],
                   mode="query_gallery"),
    "digits": dict(train="train", test="test", ks=(1, 2, 4, 8), mode="self"),
    "fashion_mnist": dict(train="train", test="test", ks=(1, 2, 4, 8), mode="self"),
    "image_folder": dict(train="train", test="test", ks=(1, 2, 4, 8), mode="self"),
}


# Arguments every config built by make_config accepts (its docstring's "Args:" line).
RUNLOCAL_ARGS = ("runlocal",)


def parse_args(arg: str | None, known=RUNLOCAL_ARGS) -> set[str]:
    """Splits a big_vision-style config argument ``"runlocal,foo"``.

    Raises ValueError naming the config's known arguments when one is not in
    ``known``: a mistyped ``:runlocl`` must not silently start the full run.
    """
    args = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = sorted(args - set(known))
    if unknown:
        raise ValueError(f"unknown config argument(s) {unknown} in {arg!r}; this config "
                         f"accepts {sorted(known) or 'no arguments'} (comma separated)")
    return args


def get_base_config() -> ml_collections.ConfigDict:
    """The released DeML(3,3) recipe on CUB (§0, §2, §5, §6)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "deml"  # deml_jax/methods/: 'deml' | 'u512' | 'abe' | 'ecaml' | 'cpf'
    c.total_steps = 20_000  # max_iter, §6
    c.log_every_steps = 1  # every step to metrics.jsonl and TensorBoard
    c.eval_every_steps = 500  # snapshot interval, §6
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.eval_on_split = "val"  # model selection never on test (§7: the release selects nothing)

    c.dataset = _dataset_config()
    c.model = _model_config()
    c.loss = _loss_config()
    c.optim = _optim_config()  # run length: c.total_steps only
    c.parallel = ml_collections.ConfigDict(dict(
        launcher="pmap",  # 'pmap' | 'shard_map' (deml_jax/parallel.py)
        # The global batch is split into loss_groups groups of whole classes, each
        # with its own losses (pairs never cross groups), whatever the device count
        # (deml_jax/loss_groups.py): the released 2 GPUs x 26 images (§2.2, §5.4).
        loss_groups=2,
        loss_scope="groups",  # 'groups' | 'device' (one group per device) | 'global' (one group)
        num_devices=0,  # 0 = all local devices
    ))
    c.eval = ml_collections.ConfigDict(dict(
        ks=(1, 2, 4, 8), mode="self", metric="cosine", clustering=True,
        batch_size_per_device=50,  # §2.3 TEST batch
        chunk_size=1024, pictures=True, num_pictures=8,
        best_metric="recall@1",  # model selection on the validation split
        final_test=True,  # evaluate the test split after the last step
        # Also evaluate the network at its initialisation (same seed, pretrained trunk
        # if configured; one extra embedding pass, no training): results.json
        # "untrained_control" and a column of the final table.
        untrained_control=False,
        # Test-split evaluations during training: the released snapshots 10,500 ...
        # 15,000 every 500 (§6 extractfeatures.sh, §7); steps past total_steps are
        # skipped. results.json reports the last snapshot and the best on val.
        snapshot_steps=tuple(range(10_500, 15_001, 500)),
    ))
    return c


def _dataset_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="cub200",
        # Builder variant written by prepare: 'pad256' = the released preprocessing
        # (aspect-kept resize + zero padding to 256 x 256, §2.1; prepare --resize_pad
        # 256), 'val20_pad256' with a 20-class validation split, '' = raw images.
        variant="pad256",
        data_dir="data/tfds",  # where `python -m deml_jax.data.prepare` wrote it
        train_split="train", val_split="", test_split="test",
        image_size=256,  # stored image size (§2.1; used by the digits builder)
        crop_size=227,  # §2.3
        augmentation="caffe",  # 'caffe' (§2.3) | 'modern'
        mean_bgr=(123.0, 117.0, 104.0),  # §2.3 (swapped vs BVLC, faithful)
        global_batch_size=52,  # §2.2: 2 GPUs x 26 images = 2 loss groups of 13 classes x 2
        images_per_class=2,  # §2.2
        num_workers=0,
    ))


def _model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_branches=3,  # I, §0
        num_learners=3,  # J, §0
        embedding_dim=56,  # per learner, §3.4
        backbone="bvlc",  # 'bvlc' (§3.2) | 'torchvision_bn'
        channel_attention="spatial",  # released per-position masks (§3.3) | 'se'
        cam_hidden=64,  # §3.3
        oam_steps=10,  # §4 step 4
        oam_sigma_ratio=0.15,  # §4 step 2
        oam_method="device",  # 'device' | 'host' (exact OpenCV, §4)
        oam_converged=False,
        object_attention=True,  # False: ablation, the whole image to every branch (no §3.5 walk/box)
        adversary_hidden=0,  # 0 = linear d->d regressors (§14.1)
        dtype="float32",  # compute dtype: 'float32' | 'bfloat16'
        kernels="auto",  # conv/max-pool gradients: 'auto' (custom on CPU, XLA's native on GPU/TPU) | 'custom' | 'native'
        pretrained="",  # converted weights (python -m deml_jax.tools.convert_weights)
    ))


def _loss_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        alpha=2.0, beta=0.5, cost_pos=1.0,
        cost_neg=35.0,  # DeML 35 (§5.1 table); U512 uses 25
        shrinkage=0.06,
        diversity="hinge",  # 'hinge' (§5.2) | 'adversary' (§14.1) | 'adversary_mhn' | 'none'
        diversity_weight=0.2,  # §5.2
        margin=2.0,  # §5.2
        adversary_weight=1.0,
        adversary_form="regression",
        adversary_gamma=10.0,  # §9.1
        adversary_row_norm_lambda=0.5,  # §14.1
        # diversity='adversary_mhn' (related-methods.md §1.3, the authors' MHN code).
        # DeML's values are not known for any of these three: our choices.
        adversary_mhn_hidden=128,  # width of both adversary layers: MHN's 128
        adversary_mhn_weight=1.4,  # per branch; MHN alpha 1.4 (IDE) / 2 (PCB)
        adversary_mhn_schedule="dann",  # GRL lambda: 'dann' (§9.1 layer, gamma
        # adversary_gamma) | 'constant' (lambda = 1, as MHN)
        act_weight=0.014,  # §5.3
        # ECAML's energy confusion (related-methods.md §2.2) on DeML's act branch
        # (related-methods.md §1.5) or ECAML's fc_embedding_a: 'none' | 'ecaml'.
        confusion="none",
        ec_weight=0.13,  # related-methods.md §2.6 loss_weight
        ec_pairs="random",  # 'random' (R partners per anchor, released) | 'all_neg'
        ec_partners=10,  # R, related-methods.md §2.6 random_num
        row_norm_lambda=0.5,  # §5.3 (unweighted, added once)
    ))


def _optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        base_lr=1e-5, schedule="step", step_size=15_000, gamma=0.8,  # §6
        warmup_steps=0,
        b1=0.9, b2=0.999, eps=1e-8, caffe_adam_eps=True,
        weight_decay=2e-4,  # coupled L2, §5.4
        lr_mults=RELEASED_LR_MULTS, decay_mults=RELEASED_DECAY_MULTS,
        frozen=(),
    ))


def apply_runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any config to a smoke run that finishes on a laptop CPU."""
    c.total_steps = 3
    c.optim.warmup_steps = 0
    c.log_every_steps = 1
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 2
    # 2 classes per loss group (the recipe's group count and layout kept)
    c.dataset.global_batch_size = 2 * c.parallel.loss_groups * c.dataset.images_per_class
    c.eval.snapshot_steps = ()  # the last step only
    c.dataset.crop_size = min(c.dataset.crop_size, 99)
    c.dataset.image_size = min(c.dataset.image_size, 112)
    c.eval.batch_size_per_device = 8
    c.eval.pictures = False
    return c


def set_dataset(c: ml_collections.ConfigDict, name: str) -> None:
    """Points a config at one benchmark's splits and Recall@K set."""
    info = DATASETS[name]
    c.dataset.name = name
    c.dataset.train_split = info["train"]
    c.dataset.test_split = ",".join(info["test"]) if isinstance(info["test"], tuple) else info["test"]
    c.eval.ks = info["ks"]
    c.eval.mode = info["mode"]
    if name in ("digits", "fashion_mnist"):  # stored at their own small size: no padded variant
        c.dataset.variant = ""
    if name == "sop":  # k-means with 11,316 clusters: ~0.7 TFLOP a pass, for accelerators only
        c.eval.clustering = False


METHODS = ("deml", "deml_adversary", "deml_adversary_mhn", "u512")


def make_config(dataset: str, method: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """One (benchmark x method) row: the released recipe with the row's changes.

    * ``deml``: DeML(3,3), hinge diversity (§5.2), the released code.
    * ``deml_adversary``: the paper's adversary constraint as reconstructed in
      §14.1 (gradient-reversal regressors between learners), else the same.
    * ``deml_adversary_mhn``: the adversary constraint in the form of the
      authors' MHN code (related-methods.md §1.3): one shared adversary MLP per
      branch minimises the learners' pairwise distance, the learners maximise it
      through gradient reversal; else the same.
    * ``u512``: the single-learner baseline of §8 (I=1, J=1, 512-d, no CAM,
      binomial loss only, cost_neg 25, 1 x (65 x 2) batch, 5k steps).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    c = get_base_config()
    set_dataset(c, dataset)
    if method == "deml_adversary":
        c.loss.diversity = "adversary"
    elif method == "deml_adversary_mhn":
        c.loss.diversity = "adversary_mhn"
    elif method == "u512":
        c.method = "u512"
        _make_u512(c)
    args = parse_args(arg)
    if "runlocal" in args:
        apply_runlocal(c)
    return c


def _make_u512(c: ml_collections.ConfigDict) -> None:
    """§8: examples/CUB/U512."""
    c.model.update(num_branches=1, num_learners=1, embedding_dim=512,
                   channel_attention="none")
    c.loss.update(diversity="none", cost_neg=25.0, act_weight=0.0, row_norm_lambda=0.0)
    c.dataset.update(global_batch_size=130, images_per_class=2)  # 65 classes x 2, 1 GPU
    c.parallel.loss_groups = 1  # one loss over the 130 images
    c.eval.snapshot_steps = ()  # §8 names no snapshot: the last (5,000)
    c.parallel.num_devices = 1
    c.total_steps = 5_000
    c.optim.update(step_size=5_000, gamma=0.1)  # constant lr in practice
    c.eval.batch_size_per_device = 200
