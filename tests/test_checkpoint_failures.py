"""deml_jax.checkpoint under failure: unreadable checkpoints, shape mismatch, a full disk.

The three corruptions of the issue (a truncated data file, a missing manifest,
an empty step directory) each fall back to the newest readable checkpoint with
one warning naming the bad directory, which is renamed so it is not tried
again; with none readable, one error names the directory.
"""
import errno
import logging
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from deml_jax import checkpoint


def make_state(step: int) -> dict:
    """Random (incompressible) values that depend on ``step``."""
    rng = np.random.default_rng(step)
    return {"w": rng.normal(size=(2048,)).astype(np.float32),
            "b": {"x": rng.integers(0, 100, size=(3, 4)).astype(np.int32)},
            "step": np.asarray(step, np.int32)}


def target() -> dict:
    return {"w": np.zeros(2048, np.float32), "b": {"x": np.zeros((3, 4), np.int32)},
            "step": np.zeros((), np.int32)}


def save_steps(workdir, steps):
    with checkpoint.Checkpointer(workdir) as ckpt:
        for step in steps:
            assert ckpt.save(step, make_state(step), {"step": step}, force=True)


def corrupt(step_dir, how):
    """What a crash or a bad disk leaves in a committed step directory."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    if how == "truncated_data":  # the largest array data file, cut in half
        data = max((f for f in files if f"{os.sep}d{os.sep}" in f), key=os.path.getsize)
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    elif how == "missing_manifest":
        manifests = [f for f in files if os.path.basename(f).startswith("manifest")]
        assert manifests, files
        for f in manifests:
            os.remove(f)
    elif how == "empty_dir":
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)
    else:
        raise ValueError(how)


def assert_state(got, step):
    want = make_state(step)
    np.testing.assert_array_equal(got["w"], want["w"])
    np.testing.assert_array_equal(got["b"]["x"], want["b"]["x"])
    assert int(got["step"]) == step


HOWS = ["truncated_data", "missing_manifest", "empty_dir"]


@pytest.mark.parametrize("how", HOWS)
def test_unreadable_latest_falls_back_and_is_renamed(tmp_path, how, caplog):
    save_steps(tmp_path, (2, 4))
    ckdir = tmp_path / "checkpoints"
    corrupt(ckdir / "4", how)
    with caplog.at_level(logging.WARNING, logger="deml_jax.checkpoint"):
        with checkpoint.Checkpointer(tmp_path) as ckpt:
            got, meta = ckpt.restore_or_none(target())
            assert ckpt.latest_step() == 2  # the renamed step is forgotten
    assert_state(got, 2)
    assert meta == {"step": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert str(ckdir / "4") in warnings[0] and "4.unreadable" in warnings[0]
    assert sorted(os.listdir(ckdir)) == ["2", "4.unreadable"]
    # Not tried again: a fresh reader sees step 2 and warns about nothing; the
    # step can be written again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deml_jax.checkpoint"):
        with checkpoint.Checkpointer(tmp_path) as ckpt:
            assert ckpt.latest_step() == 2
            assert_state(ckpt.restore_or_none(target())[0], 2)
            assert ckpt.save(4, make_state(4), force=True)
    assert not caplog.records
    assert sorted(os.listdir(ckdir)) == ["2", "4", "4.unreadable"]


@pytest.mark.parametrize("how", HOWS)
def test_read_only_falls_back_without_touching_anything(tmp_path, how, caplog):
    save_steps(tmp_path, (2, 4))
    corrupt(tmp_path / "checkpoints" / "4", how)
    before = sorted(os.walk(tmp_path))
    with caplog.at_level(logging.WARNING, logger="deml_jax.checkpoint"):
        with checkpoint.Checkpointer(tmp_path, read_only=True) as ckpt:
            assert_state(ckpt.restore_or_none(target())[0], 2)
    assert sorted(os.walk(tmp_path)) == before
    assert any("left in place" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("how", HOWS)
def test_none_readable_is_one_error_naming_the_directory(tmp_path, how):
    save_steps(tmp_path, (3,))
    corrupt(tmp_path / "checkpoints" / "3", how)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(checkpoint.CheckpointUnreadableError) as info:
            ckpt.restore_or_none(target())
    message = str(info.value)
    assert str(tmp_path / "checkpoints") in message and "\n" not in message
    assert len(message) < 800


def test_shape_mismatch_is_refused_and_nothing_is_renamed(tmp_path):
    """orbax alone restores a differently-shaped array silently; we refuse it."""
    save_steps(tmp_path, (2,))
    wrong = target()
    wrong["w"] = np.zeros(1024, np.float32)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(checkpoint.CheckpointMismatchError) as info:
            ckpt.restore_or_none(wrong)
        extra = dict(target(), new=np.zeros(2, np.float32))
        with pytest.raises(checkpoint.CheckpointMismatchError, match="new: checkpoint absent"):
            ckpt.restore_or_none(extra)
    message = str(info.value)
    assert "w: checkpoint ((2048,), 'float32') vs model ((1024,), 'float32')" in message
    assert "strict" not in message and "partial_restore" not in message  # orbax's advice
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def _fail_json_writes(monkeypatch):
    """The disk fills while orbax writes a checkpoint's metadata."""
    async def full(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full)


def test_disk_full_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    # Synchronous writes: the failure surfaces in save() itself (the asynchronous
    # case, through a training run, is tests/test_workdir.py's).
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    assert ckpt.save(2, make_state(2), {"step": 2}, force=True)
    ckpt.wait()
    _fail_json_writes(monkeypatch)
    with pytest.raises(checkpoint.CheckpointWriteError) as info:
        ckpt.save(4, make_state(4), {"step": 4}, force=True)
    message = str(info.value)
    assert "step 4" in message and "step 2, is kept" in message, message
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    ckpt.close()  # releases orbax's threads; the error was reported once
    ckpt2 = checkpoint.Checkpointer(tmp_path)
    assert ckpt2.latest_step() == 2
    assert "4" not in os.listdir(tmp_path / "checkpoints")
    assert_state(ckpt2.restore_or_none(target())[0], 2)
    ckpt2.close()
    # Saving again after space is freed is checked in a new process, as a user's
    # rerun does (tests/test_workdir.py::test_disk_full_during_training): in this
    # process tensorstore may still be finishing the abandoned step-4 array write,
    # and orbax's clean-up of its tmp directory then races with it (seen in CI).


def test_read_only_on_a_missing_workdir_creates_nothing(tmp_path):
    missing = tmp_path / "nope"
    with checkpoint.Checkpointer(missing, best_metric="val/recall@1", read_only=True) as ckpt:
        assert ckpt.latest_step() is None and ckpt.best_step() is None
        assert ckpt.restore_or_none(target()) is None
        assert ckpt.restore_best(target()) is None
        with pytest.raises(RuntimeError, match="read-only"):
            ckpt.save(1, make_state(1), force=True)
    assert not missing.exists()
