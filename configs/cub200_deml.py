"""CUB-200-2011 (classes 1-100 train / 101-200 test, 5,864 / 5,924 images): DeML(3,3), 56-d learners, hinge diversity: the released recipe (§0, §5, §6).

Command:  python -m deml_jax.main --config configs/cub200_deml.py --workdir runs/cub200_deml
Smoke:    python -m deml_jax.main --config configs/cub200_deml.py:runlocal --workdir runs/cub200_deml_smoke
Hardware: 2 GPUs with > 11 GB each, 2 x (13 classes x 2 images) (§6).
Needs:    the prepared dataset (README "Bring a dataset") and BVLC GoogLeNet weights
          converted with `python -m deml_jax.tools.convert_weights` set as
          --config.model.pretrained=PATH (training from scratch will not get there).
Expected: R@1/2/4/8 = 64.7/75.1/83.2/89.4 (the released code's README, §11.2).
Measured: not yet run with deml_jax (no dataset or GPU on the development machines).
"""

from configs import common


def get_config(arg=None):
    return common.make_config("cub200", "deml", arg)
