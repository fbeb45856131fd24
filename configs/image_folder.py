"""Your own images: one sub-folder per class under ROOT, DeML(3,3), the released recipe.

Half of the class folders (drawn with seed 0) are the seen training classes,
the other half the unseen test classes (zero-shot retrieval, as CUB/Cars).
Built on first use, like the digits: the images are resized and zero padded to
256 x 256 (the released offline preprocessing, §2.1) into
``dataset.data_dir/deml_image_folder/pad256/``; nothing is downloaded.

Command:  python -m deml_jax.main --config configs/image_folder.py:root=DIR --workdir runs/mine
Smoke:    python -m deml_jax.main --config configs/image_folder.py:root=DIR,runlocal --workdir runs/mine_smoke
Args:     root=DIR (required: the folder of class folders), runlocal (a 3-step smoke
          run); comma separated, any other argument is an error.  The same as
          `python -m deml_jax.data.prepare --dataset image_folder --root DIR
          --resize_pad 256 --data_dir data/tfds` followed by training on it; to
          choose the split yourself, run that with --train_classes a,b,c first.
          After changing the folders, delete the built copy (or use another
          --config.dataset.data_dir): a built dataset is never rebuilt.
Hardware: as cub200_deml.py (2 GPUs with > 11 GB each); needs >= 13 training classes
          with >= 2 images each for the released 13 x 2 batch.
Needs:    BVLC GoogLeNet weights converted with `python -m deml_jax.tools.convert_weights`
          set as --config.model.pretrained=PATH (from scratch learns far less).
Expected: depends on your data.
"""

from configs import common

ARGS = ("root", "runlocal")  # the docstring's Args: line; root takes =DIR


def get_config(arg=None):
    parts = [a for a in (arg or "").split(",") if a.strip()]
    values = dict(a.split("=", 1) for a in parts if "=" in a)
    flags = common.parse_args(",".join(a for a in parts if "=" not in a), ("runlocal",))
    unknown = sorted(set(values) - {"root"})
    if unknown:
        raise ValueError(f"unknown config argument(s) {unknown} in {arg!r}; this config "
                         f"accepts {list(ARGS)} (root=DIR, comma separated)")
    c = common.get_base_config()
    common.set_dataset(c, "image_folder")
    c.dataset.variant = "pad256"
    # The class folders; data_glue builds the dataset from them on first use.
    c.dataset.root = values.get("root", "")
    if "runlocal" in flags:
        common.apply_runlocal(c)
    return c
