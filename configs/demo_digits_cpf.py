"""Demo: CPF on scikit-learn's bundled digits, sized for 2 CPU cores (like demo_digits.py).

Trains on digits 0-4, evaluates Recall@K, NMI and F1 on the unseen digits 5-9.
Command:  python -m deml_jax.main --config configs/demo_digits_cpf.py --workdir runs/demo_digits_cpf
Args:     googlenet, runlocal (comma separated; any other argument is an error).
          ':googlenet' swaps the small trunk for BVLC GoogLeNet at 99 px;
          ':runlocal' is a 3-step smoke run.
Hardware: 2 CPU cores, one device.
Model:    CPF (related-methods.md §4; configs/cub200_cpf.py): trunk -> pool5 ->
          32-d embedding, the CPF proxy loss with 5 learned proxies and CUB's
          tau 0.38, s_p 9, s_n 9, mu 0, psi 0.2, b 2, on the small 4-stage trunk
          (models/tiny.py) at 56 px, batch 5 classes x 4.  Trained from scratch:
          Adam 1e-3 with a cosine schedule, 600 steps (as demo_digits.py); the
          released fc_lr ratio (x400) is for fine-tuning and is replaced by x10,
          the proxies at 1e-2 (the released proxy : network lr ratio of 10).
Expected: no published figure (none retrievable for CPF, related-methods.md §4.5); the run prints its own table.
"""

from configs import common
from deml_jax.methods import cpf


def get_config(arg=None):
    from deml_jax import methods
    c = common.get_base_config()
    common.set_dataset(c, "digits")
    cpf.configure(c, "digits")
    c.dataset.update(image_size=64, crop_size=56, images_per_class=4)
    c.model.update(backbone="tiny", embedding_dim=32)
    methods.set_batch(c, 5, 4, num_devices=1)
    methods.set_run_length(c, 600)
    c.optim.update(base_lr=1e-3, schedule="cosine", warmup_steps=20, weight_decay=1e-4,
                   lr_mults=((r"(^|/)embed/kernel$", 10.0), (r"bias$", 2.0)))
    c.loss.cpf_proxy_lr = 1e-2
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.eval.batch_size_per_device = 128
    c.eval.snapshot_steps = ()  # the last step only
    args = common.parse_args(arg, ("googlenet", "runlocal"))
    if "googlenet" in args:
        c.model.backbone = "bvlc"
        c.dataset.update(image_size=112, crop_size=99)
    if "runlocal" in args:
        common.apply_runlocal(c)
        methods.set_batch(c, 5, 2, num_devices=1)
    return c
