"""CUB-200-2011 (classes 1-100 train / 101-200 test, 5,864 / 5,924 images): DeML(3,3) with the adversary constraint of §14.1 (gradient reversal).

Command:  python -m deml_jax.main --config configs/cub200_deml_adversary.py --workdir runs/cub200_deml_adversary
Smoke:    python -m deml_jax.main --config configs/cub200_deml_adversary.py:runlocal --workdir runs/cub200_deml_adversary_smoke
Hardware: 2 GPUs with > 11 GB each, 2 x (13 classes x 2 images).
Needs:    the prepared dataset (README "Bring a dataset") and BVLC GoogLeNet weights
          converted with `python -m deml_jax.tools.convert_weights` set as
          --config.model.pretrained=PATH (training from scratch will not get there).
Expected: R@1/2/4/8 = 65.4/75.3/83.7/89.5 (paper, via a third-party table, §14.3; unverified).
Measured: not yet run with deml_jax (no dataset or GPU on the development machines).
"""

from configs import common


def get_config(arg=None):
    return common.make_config("cub200", "deml_adversary", arg)
