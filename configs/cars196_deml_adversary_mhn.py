"""Cars196 (classes 1-98 train / 99-196 test, 8,054 / 8,131 images): DeML(3,3) with the MHN-form adversary constraint (related-methods.md §1.3).

One shared adversary MLP per branch (normalise, Dense 56->H no bias, BN, ReLU,
Dense H->H, BN, normalise; the authors' MHN code, ICCV 2019) minimises the mean
L2 distance between learners' maps of the same image; a gradient-reversal layer
makes the learners maximise it.  DeML's own values are NOT known; ours, each a
config value (configs/common.py):
  loss.adversary_mhn_hidden=128    MHN's width;
  loss.adversary_mhn_weight=1.4    per branch, MHN's IDE weight (PCB used 2);
  loss.adversary_mhn_schedule=dann  reversal scale lambda: the DANN schedule of
                                   DeML's shipped GradientsReverse layer (§9.1,
                                   gamma loss.adversary_gamma=10); 'constant' =
                                   lambda 1 as MHN;
  adversary lr multiplier 10 on all its params (optim.RELEASED_LR_MULTS);
  BatchNorm: batch statistics over the J learners' rows of a device's batch,
  PyTorch defaults (momentum 0.1, eps 1e-5).

Command:  python -m deml_jax.main --config configs/cars196_deml_adversary_mhn.py --workdir runs/cars196_deml_adversary_mhn
Smoke:    python -m deml_jax.main --config configs/cars196_deml_adversary_mhn.py:runlocal --workdir runs/cars196_deml_adversary_mhn_smoke
Args:     runlocal (a 3-step smoke run on small images, as above); any other
          argument is an error.
Hardware: 2 GPUs with > 11 GB each, 2 x (13 classes x 2 images).
Needs:    the prepared dataset (README "Bring a dataset") and BVLC GoogLeNet weights
          converted with `python -m deml_jax.tools.convert_weights` set as
          --config.model.pretrained=PATH (training from scratch will not get there).
Expected: no published figure (§14.3: the CUB recipe with this dataset's split and Recall@K set).
Measured: not yet run with deml_jax (no dataset or GPU on the development machines).
"""

from configs import common


def get_config(arg=None):
    return common.make_config("cars196", "deml_adversary_mhn", arg)
