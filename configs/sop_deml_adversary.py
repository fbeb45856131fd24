"""Stanford Online Products (11,318 train / 11,316 test classes, 59,551 / 60,502 images): DeML(3,3) with the adversary constraint of §14.1 (gradient reversal).

Command:  python -m deml_jax.main --config configs/sop_deml_adversary.py --workdir runs/sop_deml_adversary
Smoke:    python -m deml_jax.main --config configs/sop_deml_adversary.py:runlocal --workdir runs/sop_deml_adversary_smoke
Hardware: 2 GPUs with > 11 GB each, 2 x (13 classes x 2 images).
Needs:    the prepared dataset (README "Bring a dataset") and BVLC GoogLeNet weights
          converted with `python -m deml_jax.tools.convert_weights` set as
          --config.model.pretrained=PATH (training from scratch will not get there).
Expected: no published figure (§14.3: the CUB recipe with this dataset's split and Recall@K set).
Measured: not yet run with deml_jax (no dataset or GPU on the development machines).
"""

from configs import common


def get_config(arg=None):
    return common.make_config("sop", "deml_adversary", arg)
