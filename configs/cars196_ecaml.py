"""Cars196 (classes 1-98 train / 99-196 test, 8,054 / 8,131 images): ECAML (Chen & Deng, "Energy Confused Adversarial Metric Learning", AAAI 2019).

Recipe:   chenbinghui1/ECAML examples/car (related-methods.md §2): BVLC GoogLeNet,
          pool5 -> fc_embedding 1024 -> 512 with bias (lr_mult 10 / 20, Xavier),
          binomial deviance (C_n 25) on the unnormalised embedding + 0.13 x log
          energy confusion over R = 10 random different-class partners per anchor
          on a stop-gradient, shared-weight copy of fc_embedding + the W row-norm
          regulariser (lambda 0.5); batch 130 = 65 classes x 2 images; Adam 1e-5,
          coupled L2 2e-4, 10k steps, snapshots every 1000.
          --config.loss.metric=contrastive|triplet switches the base loss;
          --config.loss.confusion=none gives the same network without the EC term.
Command:  python -m deml_jax.main --config configs/cars196_ecaml.py --workdir runs/cars196_ecaml
Smoke:    python -m deml_jax.main --config configs/cars196_ecaml.py:runlocal --workdir runs/cars196_ecaml_smoke
Args:     runlocal (a 3-step smoke run on small images, as above); any other
          argument is an error.
Hardware: 1 GPU, 130 images of 227 px through one GoogLeNet per step (like U512, §8).
Needs:    the prepared dataset (README "Bring a dataset") and BVLC GoogLeNet weights
          converted with `python -m deml_jax.tools.convert_weights` set as
          --config.model.pretrained=PATH (training from scratch will not get there).
Expected: none: no ECAML result table (paper or third-party) could be retrieved
          (related-methods.md §2.7); do not read a target into any number.
Measured: not yet run with deml_jax (no dataset or GPU on the development machines).
"""

from configs import common
from deml_jax.methods import ecaml


def get_config(arg=None):
    c = common.get_base_config()
    common.set_dataset(c, "cars196")
    ecaml.configure(c, "cars196")
    if "runlocal" in common.parse_args(arg):
        common.apply_runlocal(c)
    return c
