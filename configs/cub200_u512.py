"""CUB-200-2011 (classes 1-100 train / 101-200 test, 5,864 / 5,924 images): the U512 baseline of §8: one GoogLeNet, one 512-d learner, binomial loss.

Command:  python -m deml_jax.main --config configs/cub200_u512.py --workdir runs/cub200_u512
Smoke:    python -m deml_jax.main --config configs/cub200_u512.py:runlocal --workdir runs/cub200_u512_smoke
Args:     runlocal (a 3-step smoke run on small images, as above); any other
          argument is an error.
Hardware: 1 GPU: 130 images a step (65 classes x 2) in one loss group (§8;
          dataset.global_batch_size=130, parallel.loss_groups=1).
Images:   the released preprocessing (§2.1): aspect-kept resize, zero padding to 256 x 256
          (dataset.variant='pad256'), built by
          python -m deml_jax.data.prepare --dataset cub200 --manual_dir DIR \\
              --data_dir data/tfds --resize_pad 256
          Raw images (a prepare without --resize_pad): --config.dataset.variant=''.
Eval:     the test split after the last step (5,000; §8 names no snapshot); results.json
          holds every evaluated snapshot, the last and, with a validation split, the best on it.
Needs:    the prepared dataset (Images above; README "Bring a dataset") and BVLC GoogLeNet weights
          converted with `python -m deml_jax.tools.convert_weights` set as
          --config.model.pretrained=PATH (training from scratch will not get there).
Expected: no published figure for this exact baseline in the released repository (§8).
Measured: not yet run with deml_jax (no dataset or GPU on the development machines).
"""

from configs import common


def get_config(arg=None):
    return common.make_config("cub200", "u512", arg)
