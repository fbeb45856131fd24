"""Demo: ECAML on scikit-learn's bundled digits, sized for 2 CPU cores (like demo_digits.py).

Trains on digits 0-4, evaluates Recall@K, NMI and F1 on the unseen digits 5-9.
Command:  python -m deml_jax.main --config configs/demo_digits_ecaml.py --workdir runs/demo_digits_ecaml
Args:     googlenet, runlocal (comma separated; any other argument is an error).
          ':googlenet' swaps the small trunk for BVLC GoogLeNet at 99 px;
          ':runlocal' is a 3-step smoke run.
Hardware: 2 CPU cores, one device.
Model:    ECAML's structure (related-methods.md §2; configs/cars196_ecaml.py):
          trunk -> pool5 -> fc_embedding with bias, binomial deviance + 0.13 x
          log energy confusion (R = 10 random negatives per anchor) on the
          stop-gradient copy of fc_embedding + the W row-norm regulariser, on the
          small 4-stage trunk (models/tiny.py) at 56 px, 32-d, batch 5 classes x 4.
          Trained from scratch: Adam 1e-3, cosine schedule, 600 steps (as demo_digits.py).
Expected: no published figure (none exists for ECAML, related-methods.md §2.7); the run prints its own table.
"""

from configs import common
from deml_jax.methods import ecaml


def get_config(arg=None):
    from deml_jax import methods
    c = common.get_base_config()
    common.set_dataset(c, "digits")
    ecaml.configure(c, "digits")
    c.dataset.update(image_size=64, crop_size=56, images_per_class=4)
    c.model.update(backbone="tiny", embedding_dim=32)
    methods.set_batch(c, 5, 4, num_devices=1)
    methods.set_run_length(c, 600)
    c.optim.update(base_lr=1e-3, schedule="cosine", warmup_steps=20, weight_decay=1e-4)
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.eval.batch_size_per_device = 128
    c.eval.snapshot_steps = ()  # the last step only
    args = common.parse_args(arg, ("googlenet", "runlocal"))
    if "googlenet" in args:
        c.model.backbone = "bvlc"
        c.dataset.update(image_size=112, crop_size=99)
    if "runlocal" in args:
        common.apply_runlocal(c)
        methods.set_batch(c, 5, 2, num_devices=1)
    return c
