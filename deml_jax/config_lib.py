"""Config loading and validation (ml_collections, big_vision-style arguments).

``load_config("configs/cub200_deml.py:runlocal")`` imports the file and calls
``get_config("runlocal")``; :func:`validate` names the key of any bad value.
Unknown keys in overrides are rejected by ``ml_collections`` itself (the
config is locked), with the key named.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

# key -> allowed values
CHOICES = {
    "parallel.launcher": ("pmap", "shard_map"),
    "parallel.loss_scope": ("groups", "device", "global"),
    "model.backbone": ("bvlc", "torchvision_bn", "tiny"),
    "model.channel_attention": ("spatial", "se", "none"),
    "model.oam_method": ("device", "host"),
    "model.dtype": ("float32", "bfloat16"),
    "model.kernels": ("auto", "custom", "native"),
    "loss.diversity": ("hinge", "adversary", "adversary_mhn", "none"),
    "loss.adversary_mhn_schedule": ("constant", "dann"),
    "loss.adversary_form": ("regression", "correlation"),
    "loss.confusion": ("none", "ecaml"),
    "loss.ec_pairs": ("random", "all_neg"),
    "optim.schedule": ("step", "cosine", "constant"),
    "dataset.augmentation": ("caffe", "modern"),
    "eval.metric": ("cosine", "euclidean"),
    "eval.mode": ("self", "query_gallery"),
}
POSITIVE_INTS = (
    "total_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "model.num_branches", "model.num_learners", "model.embedding_dim",
    "model.oam_steps", "dataset.crop_size", "dataset.image_size",
    "dataset.global_batch_size", "dataset.images_per_class", "parallel.loss_groups", "eval.batch_size_per_device",
    "loss.adversary_mhn_hidden",
    "loss.ec_partners",
)
NON_NEGATIVE = ("optim.base_lr", "optim.weight_decay", "loss.act_weight",
                "loss.row_norm_lambda", "loss.diversity_weight", "parallel.num_devices",
                "loss.adversary_mhn_weight", "loss.ec_weight")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``"path/to/config.py[:arg]"`` -> the locked ``ConfigDict`` it returns."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path!r}")
    module_spec = importlib.util.spec_from_file_location("deml_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    return config


CONFIG_ARGS_HELP = """
Config arguments: `--config FILE:ARG1,ARG2` passes "ARG1,ARG2" to the file's
get_config; each config file lists its arguments on the "Args:" line of its
docstring (every benchmark config takes `runlocal`, a 3-step smoke run;
configs/demo_digits.py also takes `googlenet`; configs/image_folder.py takes
`root=DIR`).  An unknown argument is an error naming the known ones.  Give
--config FILE with --help to print that file's documentation here.
"""


HELP_FLAGS = ("-h", "--help", "-?", "--helpshort")


def run_absl_cli(main, doc: str, argv=None) -> None:
    """Runs an absl CLI (``deml-train``, ``deml-evaluate``, ``deml-export``).

    ``--help`` prints ``doc`` plus :func:`config_help` and exits 0 (absl's own
    ``--help`` exits 1, which reads as a failure in scripts and CI).
    """
    import sys

    from absl import app

    argv = sys.argv if argv is None else argv
    sys.modules["__main__"].__doc__ = doc + config_help(argv)
    if any(a in HELP_FLAGS for a in argv[1:]):
        from absl import flags

        print(sys.modules["__main__"].__doc__)
        print(f"Flags of {main.__module__}:")
        print(flags.FLAGS.module_help(main.__module__))
        print("\nTry --helpfull to get a list of all flags.")
        sys.exit(0)
    app.run(main, argv=argv)


def config_help(argv) -> str:
    """Text for a CLI's ``--help``: the ``--config`` file's docstring (its
    ``Args:`` line lists the config arguments), or where they are documented.

    Reads the file with ``ast`` (nothing is imported or run).
    """
    spec = None
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    path = (spec or "").partition(":")[0]
    if not path or not os.path.isfile(path):
        return CONFIG_ARGS_HELP
    import ast
    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or "(no docstring)"
    return f"\nConfig {path} (its arguments: the Args: line):\n\n{doc}\n"


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first key with a bad value."""
    from deml_jax import methods  # the method names come from deml_jax/methods/*.py

    if config.method not in methods.names():
        raise ValueError(f"config.method={config.method!r} is not one of {methods.names()}")
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ValueError(f"config.{key}={value!r} is not one of {allowed}")
    for key in POSITIVE_INTS:
        value = _get(config, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{key}={value!r} must be a positive integer")
    for key in NON_NEGATIVE:
        if _get(config, key) < 0:
            raise ValueError(f"config.{key}={_get(config, key)!r} must be >= 0")
    if config.dataset.crop_size > config.dataset.image_size:
        raise ValueError(f"config.dataset.crop_size={config.dataset.crop_size} exceeds "
                         f"config.dataset.image_size={config.dataset.image_size}")
    if config.dataset.val_split and config.dataset.val_split == config.dataset.test_split:
        raise ValueError("config.dataset.val_split must not be the test split: "
                         "model selection never looks at test data")
    if config.model.channel_attention == "none" and config.model.num_learners != 1:
        raise ValueError("config.model.channel_attention='none' needs model.num_learners=1")
    steps = config.eval.snapshot_steps
    if not isinstance(steps, (tuple, list)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps):
        raise ValueError(f"config.eval.snapshot_steps={steps!r} must be a tuple of positive "
                         "integer steps (e.g. the released 10500 ... 15000 every 500)")
    if config.parallel.loss_scope == "groups" and config.dataset.global_batch_size % (
            config.parallel.loss_groups * config.dataset.images_per_class):
        raise ValueError(
            f"config.dataset.global_batch_size={config.dataset.global_batch_size} must be a "
            f"multiple of config.parallel.loss_groups={config.parallel.loss_groups} x "
            f"config.dataset.images_per_class={config.dataset.images_per_class}: each loss "
            "group holds whole classes")
