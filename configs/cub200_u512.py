"""CUB-200-2011 (classes 1-100 train / 101-200 test, 5,864 / 5,924 images): the U512 baseline of §8: one GoogLeNet, one 512-d learner, binomial loss.

Command:  python -m deml_jax.main --config configs/cub200_u512.py --workdir runs/cub200_u512
Smoke:    python -m deml_jax.main --config configs/cub200_u512.py:runlocal --workdir runs/cub200_u512_smoke
Hardware: 1 GPU, 65 classes x 2 images (§8).
Needs:    the prepared dataset (README "Bring a dataset") and BVLC GoogLeNet weights
          converted with `python -m deml_jax.tools.convert_weights` set as
          --config.model.pretrained=PATH (training from scratch will not get there).
Expected: no published figure for this exact baseline in the released repository (§8).
Measured: not yet run with deml_jax (no dataset or GPU on the development machines).
"""

from configs import common


def get_config(arg=None):
    return common.make_config("cub200", "u512", arg)
