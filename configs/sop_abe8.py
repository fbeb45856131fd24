"""Stanford Online Products (11,318 train / 11,316 test classes, 59,551 / 60,502 images): ABE-8 (Kim et al., "Attention-based Ensemble for Deep Metric Learning", ECCV 2018).

Recipe:   reconstructed (related-methods.md §3; no official code): ABE-M with M = 8
          learners of 64 dims (512 in all) on one BVLC GoogLeNet: shared stem to
          pool3, a separate copy of inception_4a..4e feeding 8 sigmoid 1x1-conv
          masks, the shared rest of the trunk and one shared embedding layer
          (deml_jax/models/abe.py, deml_jax/methods/abe.py); contrastive loss
          (m_c 1) per learner + the same-image divergence hinge (m_div 1,
          lambda_div 1/224).  m_c, m_div, lambda_div, the optimiser and the batch
          are not known from the paper (§3.3): batch 40 classes x 2 images (ours: 2-12 images per class),
          Adam 1e-5 with DeML's lr multipliers and coupled L2 2e-4, constant lr,
          8,000 steps, test evaluations every 1,000 steps (ABE reports the best
          R@1 over regular evaluations, §3.3).
Command:  python -m deml_jax.main --config configs/sop_abe8.py --workdir runs/sop_abe8
Smoke:    python -m deml_jax.main --config configs/sop_abe8.py:runlocal --workdir runs/sop_abe8_smoke
Args:     runlocal (a 3-step smoke run on small images, as above); any other
          argument is an error.
Hardware: 1 GPU; the upper trunk runs on 8 x 80 = 640 masked feature maps per step
          (the learners are folded into the batch), several times U512's step.
Needs:    the prepared dataset (README "Bring a dataset") and BVLC GoogLeNet weights
          converted with `python -m deml_jax.tools.convert_weights` set as
          --config.model.pretrained=PATH (training from scratch will not get there).
Expected: R@1/10/100/1000 76.3 / 88.4 / 94.8 / 98.2 (ABE-8, GoogLeNet, 512-d; the ABIR
          README and RaMBO's Table 2 agree).
          These are the paper's figures for the paper's (unknown) recipe, not a
          validated target for this reconstruction.
Measured: not yet run with deml_jax (no dataset or GPU on the development machines).
"""

from configs import common
from deml_jax.methods import abe


def get_config(arg=None):
    c = common.get_base_config()
    common.set_dataset(c, "sop")
    abe.configure(c, "sop", num_learners=8)
    if "runlocal" in common.parse_args(arg):
        common.apply_runlocal(c)
    return c
