"""CUB-200-2011 (classes 1-100 train / 101-200 test, 5,864 / 5,924 images): ECAML (Chen & Deng, "Energy Confused Adversarial Metric Learning", AAAI 2019).

Recipe:   chenbinghui1/ECAML examples/car (related-methods.md §2): BVLC GoogLeNet,
          pool5 -> fc_embedding 1024 -> 512 with bias (lr_mult 10 / 20, Xavier),
          binomial deviance (C_n 25) on the unnormalised embedding + 0.13 x log
          energy confusion over R = 10 random different-class partners per anchor
          on a stop-gradient, shared-weight copy of fc_embedding + the W row-norm
          regulariser (lambda 0.5); batch 130 = 65 classes x 2 images; Adam 1e-5,
          coupled L2 2e-4, 10k steps, snapshots every 1000.
          The only released ECAML recipe is Cars196's (related-methods.md §2.6); this dataset
          reuses it unchanged (no CUB/SOP/In-Shop settings were found).
          --config.loss.metric=contrastive|triplet switches the base loss;
          --config.loss.confusion=none gives the same network without the EC term.
Command:  python -m deml_jax.main --config configs/cub200_ecaml.py --workdir runs/cub200_ecaml
Smoke:    python -m deml_jax.main --config configs/cub200_ecaml.py:runlocal --workdir runs/cub200_ecaml_smoke
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
    common.set_dataset(c, "cub200")
    ecaml.configure(c, "cub200")
    if "runlocal" in common.parse_args(arg):
        common.apply_runlocal(c)
    return c
