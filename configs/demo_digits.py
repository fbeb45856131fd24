"""Demo: DeML(3,3) on scikit-learn's bundled digits, sized for 2 CPU cores.

Trains on digits 0-4 (seen classes), evaluates Recall@K, NMI and F1 on the
unseen digits 5-9, prints the table.  The digits ship inside scikit-learn, so
nothing is downloaded; the dataset is built on first use into data/tfds.

Command:  python -m deml_jax.main --config configs/demo_digits.py --workdir runs/demo_digits
          (`make demo` sets up the venv and runs exactly this.)
Args:     googlenet, runlocal (comma separated; any other argument is an error).
          ':googlenet' swaps the small trunk for BVLC GoogLeNet at 99 px
          (the real trunk; about 30 s per step on 2 CPU cores); ':runlocal' is
          a 3-step smoke run.
Hardware: 2 CPU cores, 24 GB (the development machines); one device.
Model:    the full DeML(3,3) structure (object-attention random walk + crops,
          3 channel-attention learners per branch, binomial + hinge diversity
          + activation losses) on a small 4-stage conv trunk (models/tiny.py)
          at 56 px, whose inception_5b map is 7x7 as GoogLeNet's is at 227 px.
          Trained from scratch, so the optimiser is Adam 1e-3 with a cosine
          schedule instead of the released fine-tuning rate.
Expected: see the README's demo table (measured there).
"""

from configs import common

ARGS = ("googlenet", "runlocal")  # the docstring's Args: line


def get_config(arg=None):
    c = common.get_base_config()
    common.set_dataset(c, "digits")
    # One loss over 1 x (5 classes x 4 images), as measured in the README.
    c.dataset.update(image_size=64, crop_size=56, global_batch_size=20, images_per_class=4)
    c.parallel.loss_groups = 1
    c.eval.snapshot_steps = ()  # the last step only
    c.model.update(backbone="tiny", embedding_dim=32)
    c.total_steps = 600
    c.optim.update(base_lr=1e-3, schedule="cosine", warmup_steps=20,
                   weight_decay=1e-4)
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.parallel.num_devices = 1
    c.eval.batch_size_per_device = 128
    c.eval.untrained_control = True  # the final table's untrained column
    args = common.parse_args(arg, ARGS)
    if "googlenet" in args:
        c.model.backbone = "bvlc"
        c.dataset.update(image_size=112, crop_size=99)
    if "runlocal" in args:
        common.apply_runlocal(c)
        c.dataset.update(global_batch_size=10, images_per_class=2)
    return c
