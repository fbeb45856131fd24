"""Every config file: arguments checked and documented; the image_folder config;
the CLIs' --help names the config arguments."""
import ast
import glob
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from deml_jax import config_lib

CONFIGS = sorted(p for p in glob.glob("configs/*.py")
                 if os.path.basename(p) not in ("__init__.py", "common.py"))


def _args_paragraph(path):
    """The docstring's "Args:" entry (its line and the indented lines after it)."""
    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    lines = doc.splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith("Args:")]
    assert start, f"{path}: the docstring has no 'Args:' line"
    out = [lines[start[0]]]
    for line in lines[start[0] + 1:]:
        if not line.startswith(" "):
            break
        out.append(line)
    return " ".join(out)


def _known_from_error(err):
    m = re.search(r"accepts \[([^\]]*)\]", str(err))
    assert m, f"the error does not list the known arguments: {err}"
    return [a.strip().strip("'") for a in m.group(1).split(",") if a.strip()]


def test_config_list_is_complete():
    assert "configs/demo_digits.py" in CONFIGS and "configs/cub200_deml.py" in CONFIGS
    assert "configs/image_folder.py" in CONFIGS and len(CONFIGS) >= 13


@pytest.mark.parametrize("path", CONFIGS)
def test_unknown_argument_is_rejected_naming_the_known_ones(path):
    with pytest.raises(ValueError, match="runlocl") as info:
        config_lib.load_config(f"{path}:runlocl")
    known = _known_from_error(info.value)
    assert "runlocal" in known
    doc = _args_paragraph(path)
    for name in known:  # every accepted argument is documented and works
        assert re.search(rf"\b{name}\b", doc), f"{path}: {name!r} missing from {doc!r}"
        arg = f"{name}=/some/dir" if name == "root" else name
        config = config_lib.load_config(f"{path}:{arg}")
        if name == "runlocal":
            assert config.total_steps == 3
    with pytest.raises(ValueError, match="runlocl"):  # also next to a good one
        config_lib.load_config(f"{path}:runlocal,runlocl")


def test_demo_args_by_hand():
    with pytest.raises(ValueError) as info:
        config_lib.load_config("configs/demo_digits.py:googlnet")
    assert _known_from_error(info.value) == ["googlenet", "runlocal"]
    assert config_lib.load_config("configs/demo_digits.py").total_steps == 600
    assert config_lib.load_config("configs/demo_digits.py:googlenet").model.backbone == "bvlc"
    with pytest.raises(ValueError, match=r"\['rooot'\]"):
        config_lib.load_config("configs/image_folder.py:rooot=/x")


def test_run_length_has_one_key():
    for path in ("configs/demo_digits.py", "configs/cub200_deml.py", "configs/cub200_u512.py"):
        config = config_lib.load_config(path)
        assert "total_steps" not in config.optim, path


@pytest.mark.parametrize("module", ["deml_jax.main", "deml_jax.evaluate",
                                    "deml_jax.export_features"])
def test_help_lists_config_arguments(module):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", module, "--config", "configs/demo_digits.py",
                          "--help"], capture_output=True, text=True, env=env, timeout=120)
    text = out.stdout + out.stderr
    assert "Args:     googlenet, runlocal" in text, text[-2000:]
    if module == "deml_jax.main":  # without a config: where they are documented
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                             text=True, env=env, timeout=120)
        assert '"Args:" line' in out.stdout + out.stderr


def test_image_folder_config_builds_and_reads_class_folders(tmp_path, capsys, caplog):
    from deml_jax import data_glue
    from deml_jax.data import pipeline

    root = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for c in range(4):
        os.makedirs(root / f"class_{c}")
        for i in range(3):
            cv2.imwrite(str(root / f"class_{c}" / f"{i}.png"),
                        rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    config = config_lib.load_config(f"configs/image_folder.py:root={root},runlocal")
    config.dataset.data_dir = str(tmp_path / "tfds")
    train = data_glue.load_source(config, "train")
    test = data_glue.load_source(config, "test")
    assert len(train) == len(test) == 6  # half of the 4 classes each, 3 images per class
    image = pipeline.decode_bgr(train[0])
    assert image.shape == (256, 256, 3)  # resize_pad 256 (§2.1)
    labels = set(pipeline.labels_of(train)) | set(pipeline.labels_of(test))
    assert labels == {0, 1, 2, 3}
    out = capsys.readouterr()
    chatter = ("Downloading and preparing", "Using custom data configuration",
               "downloaded and prepared", "Generating splits")
    assert not any(c in out.out + out.err + caplog.text for c in chatter), (out, caplog.text)
    assert "building deml_image_folder/pad256" in out.err  # our one progress line


def test_not_prepared_hint_names_root(tmp_path):
    from deml_jax.data import pipeline

    with pytest.raises(FileNotFoundError, match="--dataset image_folder --root DIR"):
        pipeline.load_source("image_folder", "train", str(tmp_path))


def test_image_folder_without_root_hint_uses_root_flag(tmp_path):
    from deml_jax import data_glue

    config = config_lib.load_config("configs/image_folder.py")
    config.dataset.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="--dataset image_folder --root DIR"):
        data_glue.load_source(config, "train")
