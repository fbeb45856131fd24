"""The trainer end to end on the bundled digits: evaluation, checkpoints, resume.

Resume must be exact: a run stopped after step k (returning normally, by
SIGTERM, or killed with -9 between checkpoints) and started again ends with
bitwise the same parameters as an uninterrupted run, on CPU.
"""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from deml_jax import checkpoint as ckpt_lib
from deml_jax import config_lib, logging_lib, train
from deml_jax.data import builders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    builders.prepare("digits", None, path, image_size=40, val_classes=2)
    return path


def tiny_config(data_dir, **overrides):
    """tests/train_config.py with ``data_dir`` and dotted-key overrides."""
    c = config_lib.load_config(os.path.join(ROOT, "tests", "train_config.py"))
    c.dataset.data_dir = data_dir
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def final_params(workdir, config):
    state = train.load_trained_state(config, workdir)
    assert int(state["step"]) == TOTAL
    return state["params"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run of TOTAL steps with validation evals, a test snapshot at
    step 3 (50 is past the end: skipped) and the final test eval."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    config = tiny_config(data_dir, eval_every_steps=3, **{"eval.snapshot_steps": (3, 50)})
    config.eval.final_test = True
    results = train.train_and_evaluate(config, workdir)
    return workdir, config, results


def test_train_evaluates_logs_and_checkpoints(reference):
    workdir, config, results = reference
    assert 0.0 < results["recall@1"] <= 1.0 and results["num_queries"] == 896  # digits 5-9: 182+181+179+174+180
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert saved["test"]["recall@1"] == results["recall@1"]
    rows = logging_lib.read_metrics(workdir)
    # Every evaluated snapshot: metrics.jsonl and results.json (last, best on val,
    # and the labelled best on test).
    tested = {r["step"]: r for r in rows if "test/recall@1" in r}
    val = {r["step"]: r["val/recall@1"] for r in rows if "val/recall@1" in r}
    assert sorted(tested) == [3, 6] and [s["step"] for s in saved["snapshots"]] == [3, 6]
    assert saved["last"]["step"] == 6 and saved["last"]["test"] == saved["test"]
    assert saved["snapshots"][0]["test"]["recall@1"] == tested[3]["test/recall@1"]
    best = 3 if val[3] >= val[6] else 6
    assert saved["best_on_val"]["step"] == best
    assert saved["best_on_val"]["test"]["recall@1"] == tested[best]["test/recall@1"]
    on_test = [k for k in saved if k.startswith("best_on_test (selected on the test split")]
    assert len(on_test) == 1 and saved[on_test[0]]["test"]["recall@1"] == max(
        r["test/recall@1"] for r in tested.values())
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, TOTAL + 1))
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert [r["step"] for r in rows if "val/recall@1" in r] == [3, 6]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3", "4", "6"]
    with ckpt_lib.Checkpointer(workdir, best_metric="val/recall@1") as checkpointer:
        assert checkpointer.best_step() in (3, 6)
    assert os.listdir(os.path.join(workdir, "tb"))


def test_resume_after_a_normal_stop_is_bitwise(reference, data_dir, tmp_path):
    ref_dir, ref_config, _ = reference
    workdir = str(tmp_path)
    train.train_and_evaluate(tiny_config(data_dir, eval_every_steps=3, total_steps=4), workdir)
    train.train_and_evaluate(tiny_config(data_dir, eval_every_steps=3), workdir)
    chex.assert_trees_all_equal(final_params(workdir, ref_config), final_params(ref_dir, ref_config))


def _launch(workdir, data_dir):
    """The CLI in a subprocess, one step per log line."""
    args = [sys.executable, "-m", "deml_jax.main", f"--config={ROOT}/tests/train_config.py",
            f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}"]
    # Same XLA flags as this process: the CPU backend's device count changes how
    # convolutions are partitioned over threads, hence the last bits of the sums.
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _wait_for(proc, workdir, step, checkpoint=None, timeout=300):
    """Until ``step`` is logged and (optionally) checkpoint ``checkpoint`` is committed."""
    deadline = time.time() + timeout
    committed = os.path.join(workdir, "checkpoints", str(checkpoint))
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode()[-3000:])
        rows = logging_lib.read_metrics(workdir) if os.path.exists(
            os.path.join(workdir, "metrics.jsonl")) else []
        if any(r["step"] >= step for r in rows) and (checkpoint is None or os.path.isdir(committed)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} / checkpoint {checkpoint} within {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_resume_after_interruption_is_bitwise(reference, data_dir, tmp_path, sig):
    ref_dir, ref_config, _ = reference
    workdir = str(tmp_path)
    proc = _launch(workdir, data_dir)
    # kill -9 lands after step 3, once checkpoint 2 is committed (saves are
    # asynchronous: an uncommitted one is rightly lost) and before the end.
    _wait_for(proc, workdir, 3, checkpoint=2 if sig == signal.SIGKILL else None)
    proc.send_signal(sig)
    out = proc.communicate(timeout=300)[0].decode()
    with ckpt_lib.Checkpointer(workdir) as checkpointer:
        kept = checkpointer.latest_step()
    if sig == signal.SIGTERM:
        assert proc.returncode == 0, out[-3000:]
        assert "pre-empted" in out and kept in range(3, TOTAL)
    else:
        assert proc.returncode == -signal.SIGKILL and kept in (2, 4)
    proc = _launch(workdir, data_dir)
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "resuming at step" in out
    chex.assert_trees_all_equal(final_params(workdir, ref_config), final_params(ref_dir, ref_config))


def test_missing_dataset_names_the_prepare_command(tmp_path):
    config = tiny_config(str(tmp_path / "nothing"))
    config.dataset.name = "cub200"
    config.dataset.variant = ""
    with pytest.raises(FileNotFoundError, match="python -m deml_jax.data.prepare --dataset cub200"):
        train.train_and_evaluate(config, str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work" / "checkpoints" / "1")


def test_a_batch_that_does_not_fit_the_devices_is_refused(data_dir, tmp_path):
    """12 images of 2 need 6 classes per step; digits' train split has 4.  And 2 loss
    groups cannot be split over 3 devices (nor 3 over 2)."""
    config = tiny_config(data_dir, **{"dataset.global_batch_size": 12})
    with pytest.raises(ValueError, match=r"global_batch_size=12 with images_per_class=2 "
                                         r"needs 6 classes per step"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints" / "1")
    for groups, devices in ((2, 3), (3, 2)):
        config = tiny_config(data_dir, **{"parallel.num_devices": devices,
                                          "parallel.loss_groups": groups,
                                          "dataset.global_batch_size": 12})
        with pytest.raises(ValueError, match=rf"loss_groups={groups} and {devices} devices.*"
                                             r"global_batch_size=12"):
            train.train_and_evaluate(config, str(tmp_path / f"{groups}_{devices}"))


def test_bad_config_values_name_the_key(data_dir):
    for key, value, match in [("parallel.launcher", "pjit", "config.parallel.launcher"),
                              ("model.num_learners", 0, "config.model.num_learners"),
                              ("dataset.val_split", "test", "val_split")]:
        config = tiny_config(data_dir, **{key: value})
        with pytest.raises(ValueError, match=match):
            config_lib.validate(config)


def test_cli_rejects_an_unknown_key_and_too_many_devices(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    base = [sys.executable, "-m", "deml_jax.main", f"--config={ROOT}/tests/train_config.py",
            f"--workdir={tmp_path}"]
    out = subprocess.run(base + ["--config.model.num_heads=4"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "num_heads" in out.stderr
    out = subprocess.run(base + ["--config.parallel.num_devices=64"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "num_devices=64" in out.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_every_config_file_loads_and_validates():
    names = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                   if f.endswith(".py") and f not in ("__init__.py", "common.py"))
    assert len(names) >= 13  # 4 benchmarks x 3 methods + the demo (+ later methods)
    for name in names:
        for arg in ("", ":runlocal"):
            config_lib.validate(config_lib.load_config(os.path.join(ROOT, "configs", name) + arg))


def test_evaluate_and_export_cli_functions(reference, tmp_path):
    from deml_jax.evaluate import evaluate_checkpoint
    from deml_jax.evaluation.features import evaluate_features, load_features
    from deml_jax.export_features import export

    workdir, config, results = reference
    again = evaluate_checkpoint(config, workdir, "latest", num_pictures=2)
    for key in ("recall@1", "recall@8", "map@r", "num_queries"):
        assert again[key] == results[key]
    assert os.path.exists(os.path.join(workdir, f"eval_latest_{TOTAL}.json"))
    pictures = sorted(os.listdir(os.path.join(workdir, "pictures")))
    assert pictures == ["attention_00.png", "attention_01.png", "retrieval_grid.png"]
    evaluate_checkpoint(config, workdir, "best", num_pictures=0)
    path = export(config, workdir, "test", str(tmp_path / "test.npz"))
    features = load_features(path)
    assert features["embeddings"].shape == (896, 2 * 2 * 8)
    assert list(features["ids"]) == list(range(896))
    assert all(name for name in features["filenames"])
    from_file = evaluate_features(features, ks=(1, 2, 4, 8))
    np.testing.assert_allclose(from_file["recall@1"], results["recall@1"])


def test_pretrained_trunk_initialises_every_branch(data_dir, tmp_path):
    """config.model.pretrained: each branch trunk starts from the same converted
    weights (the "3nets" initialisation, §3.2); the rest keeps its own init."""
    from deml_jax.models.googlenet import GoogLeNet
    from deml_jax.models.weights import save_converted

    trunk = GoogLeNet().init(jax.random.PRNGKey(7), np.zeros((1, 64, 64, 3), np.float32))
    path = str(tmp_path / "googlenet_bvlc.npz")
    save_converted(path, trunk, "bvlc")
    config = tiny_config(data_dir, **{"model.backbone": "bvlc", "model.pretrained": path,
                                      "dataset.crop_size": 64, "dataset.image_size": 64})
    model, tx = train.create_model(config), train.optim.make_optimizer(config.optim, total_steps=config.total_steps)
    state = train.initial_state(config, model, tx, jax.random.PRNGKey(0))
    for b in range(2):
        chex.assert_trees_all_equal(state["params"][f"branch_{b}"]["trunk"], trunk["params"])
    assert "cam_0" in state["params"]["branch_0"]
    config.model.backbone = "torchvision_bn"
    with pytest.raises(ValueError, match="holds 'bvlc' weights"):
        train.initial_state(config, train.create_model(config), tx, jax.random.PRNGKey(0))
