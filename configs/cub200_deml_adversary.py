"""CUB-200-2011 (classes 1-100 train / 101-200 test, 5,864 / 5,924 images): DeML(3,3) with the adversary constraint of §14.1 (gradient reversal).

Command:  python -m deml_jax.main --config configs/cub200_deml_adversary.py --workdir runs/cub200_deml_adversary
Smoke:    python -m deml_jax.main --config configs/cub200_deml_adversary.py:runlocal --workdir runs/cub200_deml_adversary_smoke
Args:     runlocal (a 3-step smoke run on small images, as above); any other
          argument is an error.
Hardware: sized for 2 GPUs with > 11 GB each (§6); any device count (1, 2, 4, 8, ... or a
          TPU slice) runs the same 52 images a step in 2 loss groups of 13 classes x 2
          (§2.2, §5.4; dataset.global_batch_size=52, parallel.loss_groups=2).
Images:   the released preprocessing (§2.1): aspect-kept resize, zero padding to 256 x 256
          (dataset.variant='pad256'), built by
          python -m deml_jax.data.prepare --dataset cub200 --manual_dir DIR \\
              --data_dir data/tfds --resize_pad 256
          Raw images (a prepare without --resize_pad): --config.dataset.variant=''.
Eval:     the test split at the released snapshots 10,500 ... 15,000 every 500 (§6, §7;
          eval.snapshot_steps) and after the last step; results.json reports the last
          snapshot and, with a validation split (--config.dataset.variant=val20_pad256
          --config.dataset.val_split=val), the best on it; best-on-test is labelled so.
Needs:    the prepared dataset (Images above; README "Bring a dataset") and BVLC GoogLeNet weights
          converted with `python -m deml_jax.tools.convert_weights` set as
          --config.model.pretrained=PATH (training from scratch will not get there).
Expected: R@1/2/4/8 = 65.4/75.3/83.7/89.5 (paper, via a third-party table, §14.3; unverified).
Measured: not yet run with deml_jax (no dataset or GPU on the development machines).
"""

from configs import common


def get_config(arg=None):
    return common.make_config("cub200", "deml_adversary", arg)
