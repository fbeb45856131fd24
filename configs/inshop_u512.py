"""DeepFashion In-Shop (3,997 train classes; 14,218 query / 12,612 gallery images): the U512 baseline of §8: one GoogLeNet, one 512-d learner, binomial loss.

Command:  python -m deml_jax.main --config configs/inshop_u512.py --workdir runs/inshop_u512
Smoke:    python -m deml_jax.main --config configs/inshop_u512.py:runlocal --workdir runs/inshop_u512_smoke
Hardware: 1 GPU, 65 classes x 2 images (§8).
Needs:    the prepared dataset (README "Bring a dataset") and BVLC GoogLeNet weights
          converted with `python -m deml_jax.tools.convert_weights` set as
          --config.model.pretrained=PATH (training from scratch will not get there).
Expected: no published figure (§14.3: the CUB recipe with this dataset's split and Recall@K set).
Measured: not yet run with deml_jax (no dataset or GPU on the development machines).
"""

from configs import common


def get_config(arg=None):
    return common.make_config("inshop", "u512", arg)
