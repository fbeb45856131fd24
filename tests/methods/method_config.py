"""The tiny trainer config of tests/methods/: ``method_config.py:<method>``.

Each method's recipe (its ``configure``, or ``make_config`` for the DeML rows)
on the small trunk at 32 px on digits with a 2-class validation carve-out;
4 steps, a checkpoint every 2.  Pass --config.dataset.data_dir.
"""

import importlib

from configs import common
from deml_jax import methods


def get_config(arg="ecaml"):
    method = arg or "ecaml"
    if method in ("deml", "u512"):
        c = common.make_config("digits", method)
    else:
        c = common.get_base_config()
        common.set_dataset(c, "digits")
        importlib.import_module(f"deml_jax.methods.{method}").configure(c, "digits")
    c.dataset.update(data_dir="", variant="size40_val2", val_split="val", image_size=40,
                     crop_size=32)
    methods.set_batch(c, 2, 2, num_devices=1)
    c.model.update(embedding_dim=8, backbone="tiny")
    if method == "deml":
        c.model.update(num_branches=2, num_learners=2)
    if method == "abe":
        c.model.num_learners = 2  # ABE-2: the same code path as ABE-8 at a quarter of the cost
    c.optim.update(base_lr=1e-3, schedule="constant")
    methods.set_run_length(c, 4)
    c.update(log_every_steps=1, eval_every_steps=100, checkpoint_every_steps=2,
             keep_checkpoints=10)
    c.eval.update(batch_size_per_device=64, clustering=False, final_test=False, pictures=False,
                  snapshot_steps=())
    return c
