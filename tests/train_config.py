"""The tiny trainer config of tests/test_train.py (also run through the CLI there).

DeML(2,2) on the small trunk at 32 px on digits with a 2-class validation
carve-out (digits 3, 4: one class would be a degenerate evaluation); 6 steps, a checkpoint every 2.  Pass --config.dataset.data_dir.
"""

from configs import common


def get_config(arg=None):
    del arg
    c = common.get_base_config()
    common.set_dataset(c, "digits")
    c.dataset.update(data_dir="", variant="size40_val2", val_split="val", image_size=40,
                     crop_size=32, global_batch_size=4, images_per_class=2)
    c.parallel.loss_groups = 1  # one loss over 2 classes x 2 images
    c.model.update(num_branches=2, num_learners=2, embedding_dim=8, backbone="tiny")
    c.optim.update(base_lr=1e-3, schedule="constant")
    c.update(total_steps=6, log_every_steps=1, eval_every_steps=100,
             checkpoint_every_steps=2, keep_checkpoints=10)
    c.eval.update(batch_size_per_device=64, clustering=False, final_test=False, pictures=False)
    c.parallel.num_devices = 1
    return c
