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
    "parallel.loss_scope": ("device", "global"),
    "model.backbone": ("bvlc", "torchvision_bn", "tiny"),
    "model.channel_attention": ("spatial", "se", "none"),
    "model.oam_method": ("device", "host"),
    "model.dtype": ("float32", "bfloat16"),
    "loss.diversity": ("hinge", "adversary", "none"),
    "loss.adversary_form": ("regression", "correlation"),
    "optim.schedule": ("step", "cosine", "constant"),
    "dataset.augmentation": ("caffe", "modern"),
    "eval.metric": ("cosine", "euclidean"),
    "eval.mode": ("self", "query_gallery"),
}
POSITIVE_INTS = (
    "total_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "model.num_branches", "model.num_learners", "model.embedding_dim",
    "model.oam_steps", "dataset.crop_size", "dataset.image_size",
    "dataset.classes_per_device", "dataset.images_per_class", "eval.batch_size_per_device",
)
NON_NEGATIVE = ("optim.base_lr", "optim.weight_decay", "loss.act_weight",
                "loss.row_norm_lambda", "loss.diversity_weight", "parallel.num_devices")


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


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first key with a bad value."""
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
