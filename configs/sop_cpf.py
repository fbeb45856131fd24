"""Stanford Online Products (11,318 train / 11,316 test classes, 59,551 / 60,502 images): CPF (Liu et al., "Consistent Penalizing Field loss", Expert Systems with Applications 236, 2024).

Recipe:   cloudlc/CPF criteria/cpf.py and "Running Scripts CPF.sh" (related-methods.md
          related-methods.md §4): the CPF proxy loss with learned class proxies [C, d] (Xavier-uniform),
          tau 0.38, s_p 3, s_n 8, mu 1, psi 0.2, b 2; batch 90 = 45 classes x 2 images; Adam 5e-5
          with the embedding layer at 0.02 (fc_lr), weight decay 4e-4, constant
          lr, 100 epochs (66,100 steps).  The paper's ResNet-34 (frozen BN) with a
          128-d embedding is not in this package: CPF runs here on our BVLC
          GoogLeNet trunk with one 512-d embedding layer (pool5 -> 512, bias).
          Proxy lr (--config.loss.cpf_proxy_lr) 5e-4: undefined in the released
          code (related-methods.md §4.4), our default is the ArcFace proxy lr of the same framework.
Command:  python -m deml_jax.main --config configs/sop_cpf.py --workdir runs/sop_cpf
Smoke:    python -m deml_jax.main --config configs/sop_cpf.py:runlocal --workdir runs/sop_cpf_smoke
Args:     runlocal (a 3-step smoke run on small images, as above); any other
          argument is an error.
Hardware: 1 GPU, 90 images of 227 px through one GoogLeNet per step.
Needs:    the prepared dataset (README "Bring a dataset") and BVLC GoogLeNet weights
          converted with `python -m deml_jax.tools.convert_weights` set as
          --config.model.pretrained=PATH (training from scratch will not get there).
Expected: none: no CPF result (paper or third-party) could be retrieved
          (related-methods.md §4.5); the paper's figures, were they found, are for
          ResNet-34/128-d and would not be targets for this trunk anyway.
Measured: not yet run with deml_jax (no dataset or GPU on the development machines).
"""

from configs import common
from deml_jax.methods import cpf


def get_config(arg=None):
    c = common.get_base_config()
    common.set_dataset(c, "sop")
    cpf.configure(c, "sop")
    if "runlocal" in common.parse_args(arg):
        common.apply_runlocal(c)
    return c
