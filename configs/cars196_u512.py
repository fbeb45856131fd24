"""Cars196 (classes 1-98 train / 99-196 test, 8,054 / 8,131 images): the U512 baseline of §8: one GoogLeNet, one 512-d learner, binomial loss.

Command:  python -m deml_jax.main --config configs/cars196_u512.py --workdir runs/cars196_u512
Smoke:    python -m deml_jax.main --config configs/cars196_u512.py:runlocal --workdir runs/cars196_u512_smoke
Hardware: 1 GPU, 65 classes x 2 images (§8).
Needs:    the prepared dataset (README "Bring a dataset") and BVLC GoogLeNet weights
          converted with `python -m deml_jax.tools.convert_weights` set as
          --config.model.pretrained=PATH (training from scratch will not get there).
Expected: no published figure (§14.3: the CUB recipe with this dataset's split and Recall@K set).
Measured: not yet run with deml_jax (no dataset or GPU on the development machines).
"""

from configs import common


def get_config(arg=None):
    return common.make_config("cars196", "u512", arg)
