"""Evaluated snapshots (deml_jax/snapshots.py) and the padded-variant check of
deml_jax/data_glue.py: plain Python, no model, no dataset."""

import os

import pytest

from configs import common
from deml_jax import config_lib, data_glue, snapshots


def rows():
    """metrics.jsonl rows as the trainer writes them (train, val and test rows)."""
    return [
        {"step": 1, "train/loss": 3.0},
        {"step": 2, "val/recall@1": 0.50},  # val only: not a snapshot
        {"step": 3, "val/recall@1": 0.70},
        {"step": 3, "test/recall@1": 0.40, "test/map@r": 0.10},
        {"step": 4, "val/recall@1": 0.60},
        {"step": 4, "test/recall@1": 0.90, "test/map@r": 0.30},
        {"step": 5, "val/recall@1": 0.70},  # ties step 3 on val: the earlier wins
        {"step": 5, "test/recall@1": 0.45, "test/map@r": 0.20},
        {"step": 6, "test/recall@1": 0.55, "test/map@r": 0.25},  # last, no val row
        {"step": 6, "test/recall@1": 0.50, "test/map@r": 0.25},  # rewritten: later row wins
    ]


def test_summary_reports_last_best_on_val_and_labelled_best_on_test():
    s = snapshots.summarize(rows(), "recall@1")
    assert [x["step"] for x in s["snapshots"]] == [3, 4, 5, 6]
    assert s["last"] == {"step": 6, "test": {"recall@1": 0.50, "map@r": 0.25}}
    assert (s["step"], s["test"]) == (6, s["last"]["test"])  # the former results.json keys
    best = s["best_on_val"]
    assert (best["step"], best["selected_by"]) == (3, "val/recall@1")
    assert best["test"] == {"recall@1": 0.40, "map@r": 0.10}  # test metrics, chosen on val
    on_test = s[snapshots.BEST_ON_TEST]
    assert snapshots.BEST_ON_TEST.startswith("best_on_test (selected on the test split")
    assert (on_test["step"], on_test["test"]["recall@1"]) == (4, 0.90)
    table = snapshots.format_summary(s)
    assert "last (step 6)" in table and "best on val (step 3)" in table
    assert "0.4000" in table and "0.9000" not in table  # best-on-test is not printed


def test_summary_without_val_or_snapshots():
    s = snapshots.summarize([r for r in rows() if "val/recall@1" not in r], "recall@1")
    assert "best_on_val" not in s and s["last"]["step"] == 6
    assert "best on val" not in snapshots.format_summary(s)
    assert snapshots.summarize([{"step": 1, "train/loss": 1.0}], "recall@1") == {}


def test_schedule_defaults_to_the_released_snapshots():
    c = common.make_config("cub200", "deml")
    assert tuple(c.eval.snapshot_steps) == tuple(range(10_500, 15_001, 500))  # §6, §7
    tested, skipped = snapshots.schedule(c)
    assert tested[0] == 10_500 and tested[-1] == 15_000 and len(tested) == 10 and not skipped
    assert 15_000 in snapshots.loop_steps(c) and c.total_steps not in snapshots.loop_steps(c)
    c.total_steps = 12_000
    tested, skipped = snapshots.schedule(c)
    assert tested == (10_500, 11_000, 11_500, 12_000) and skipped[0] == 12_500
    assert 12_000 not in snapshots.loop_steps(c)  # left to the final test evaluation
    c.eval.final_test = False
    assert 12_000 in snapshots.loop_steps(c)
    c.eval.snapshot_steps = (0, 5)
    with pytest.raises(ValueError, match="config.eval.snapshot_steps"):
        config_lib.validate(c)


@pytest.mark.parametrize("name", ["cub200", "cars196", "sop", "inshop"])
@pytest.mark.parametrize("method", ["deml", "deml_adversary", "u512"])
def test_benchmark_configs_read_the_padded_variant_and_the_released_batch(name, method):
    c = common.make_config(name, method)
    assert c.dataset.variant == "pad256"  # §2.1
    if method == "u512":  # §8: 130 images, one loss, one GPU
        assert (c.dataset.global_batch_size, c.parallel.loss_groups) == (130, 1)
    else:  # §2.2: 2 x (13 classes x 2 images)
        assert (c.dataset.global_batch_size, c.parallel.loss_groups,
                c.dataset.images_per_class, c.parallel.loss_scope) == (52, 2, 2, "groups")


def _fake_prepared(data_dir, dataset, variant):
    """What prepare leaves: data_dir/deml_<dataset>/<variant>/1.0.0/dataset_info.json."""
    path = os.path.join(data_dir, f"deml_{dataset}", variant, "1.0.0")
    os.makedirs(path)
    open(os.path.join(path, "dataset_info.json"), "w").close()


def test_a_missing_padded_variant_names_the_exact_prepare_command(tmp_path):
    c = common.make_config("cub200", "deml")
    c.dataset.data_dir = str(tmp_path)
    expected = (f"python -m deml_jax.data.prepare --dataset cub200 --manual_dir DIR "
                f"--data_dir {tmp_path} --resize_pad 256")
    with pytest.raises(FileNotFoundError) as err:  # nothing prepared
        data_glue.load_source(c, "train")
    assert expected in str(err.value) and "Prepared there" not in str(err.value)
    _fake_prepared(str(tmp_path), "cub200", "default")  # raw images only
    with pytest.raises(FileNotFoundError) as err:
        data_glue.load_source(c, "train")
    msg = str(err.value)
    assert msg.splitlines()[-2].strip() == expected  # the command alone on its line
    assert "'' (raw images)" in msg and "--config.dataset.variant=''" in msg
    c.dataset.variant = "val20_pad256"
    with pytest.raises(FileNotFoundError, match=r"--resize_pad 256 --val_classes 20\n"):
        data_glue.load_source(c, "train")


def test_prepare_commands_of_each_variant():
    cmd = lambda v: data_glue.prepare_command("cars196", v, "D")
    base = "python -m deml_jax.data.prepare --dataset cars196 --manual_dir DIR --data_dir D"
    assert cmd("") == base
    assert cmd("pad256") == base + " --resize_pad 256"
    assert cmd("val20_pad256") == base + " --resize_pad 256 --val_classes 20"
    assert cmd("val20") == base + " --val_classes 20"
    assert cmd("mine").startswith(base + " --config mine")
    assert data_glue.prepare_command("digits", "size40_val1", "D") == (
        "python -m deml_jax.data.prepare --dataset digits --data_dir D --val_classes 1 "
        "--image_size 40")
