"""The workdir under misuse and failure: the lock, the saved config, read-only
commands, a full disk, metrics after a kill (deml_jax.workdir and its wiring).

Reuses the tiny trainer of tests/test_train.py (tests/train_config.py).
"""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import orbax.checkpoint as ocp
import pytest

from deml_jax import checkpoint as ckpt_lib
from deml_jax import logging_lib, train, workdir
from test_train import ROOT, TOTAL, _launch, _wait_for, data_dir, tiny_config  # noqa: F401

ENV = dict(os.environ, PYTHONPATH=ROOT)

HOLDER = textwrap.dedent("""
    import sys, time
    from deml_jax.workdir import WorkdirLock
    WorkdirLock(sys.argv[1]).acquire()
    print("LOCKED", flush=True)
    time.sleep(600)
""")


def _cli(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_lock_names_a_live_holder_and_takes_over_a_dead_ones(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT,
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        assert isinstance(record["start_time"], float) and record["argv"]
        with pytest.raises(workdir.WorkdirLockedError) as info:
            workdir.WorkdirLock(tmp_path).acquire()
        assert f"pid {holder.pid} on host {socket.gethostname()!r}" in str(info.value)
    finally:
        holder.kill()  # kill -9: the lock file stays behind
        holder.wait(timeout=60)
    assert (tmp_path / ".lock").exists()
    with caplog.at_level("WARNING", logger="deml_jax.workdir"):
        with workdir.WorkdirLock(tmp_path) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert any("stale lock" in r.getMessage() and str(holder.pid) in r.getMessage()
               for r in caplog.records)
    assert sorted(os.listdir(tmp_path)) == []  # released, and nothing left aside


def test_a_zombie_holder_is_dead(tmp_path):
    """kill -9 of a holder whose parent has not reaped it yet (a zombie, as a killed
    run's child can be for a moment, or for good in a container without init)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT,
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        os.kill(holder.pid, signal.SIGKILL)  # not waited for: stays a zombie
        deadline = time.time() + 60
        while time.time() < deadline and _proc_state(holder.pid) != "Z":
            time.sleep(0.05)
        assert _proc_state(holder.pid) == "Z"
        with workdir.WorkdirLock(tmp_path) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait(timeout=60)


def _proc_state(pid):
    """The state letter of /proc/PID/stat (field 3), read here independently."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps(
        {"pid": 1, "host": "elsewhere", "start_time": 0.0, "argv": ["train"]}))
    with pytest.raises(workdir.WorkdirLockedError, match="pid 1 on host 'elsewhere'"):
        workdir.WorkdirLock(tmp_path).acquire()


@pytest.fixture(scope="module")
def locked_run(data_dir, tmp_path_factory):
    """Two `deml_jax.main` runs on one workdir: the second must refuse.

    The first is paused (SIGSTOP) once checkpoint 2 is committed, so it surely
    holds the lock while the second starts and while a read-only command runs;
    then it resumes and finishes.  Returns what each saw.
    """
    work = tmp_path_factory.mktemp("locked")
    first = _launch(str(work), data_dir)
    try:
        _wait_for(first, str(work), 2, checkpoint=2)
        first.send_signal(signal.SIGSTOP)
        second = _cli("deml_jax.main", f"--config={ROOT}/tests/train_config.py",
                      f"--workdir={work}", f"--config.dataset.data_dir={data_dir}")
        # A command that only reads needs no lock, and leaves it alone.
        state = train.load_trained_state(tiny_config(data_dir), str(work))
        lock_during = json.loads((work / ".lock").read_text())
    finally:
        first.send_signal(signal.SIGCONT)
    out = first.communicate(timeout=600)[0].decode()
    return dict(work=work, first=first, first_out=out, second=second,
                read_step=int(state["step"]), lock_during=lock_during)


def test_a_second_run_on_the_same_workdir_refuses_to_start(locked_run):
    first, second = locked_run["first"], locked_run["second"]
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"pid {first.pid} on host {socket.gethostname()!r}" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, locked_run["first_out"][-3000:]
    assert locked_run["lock_during"]["pid"] == first.pid
    assert locked_run["read_step"] >= 2
    work = locked_run["work"]
    assert not (work / ".lock").exists()
    train_steps = [r["step"] for r in logging_lib.read_metrics(work) if "train/loss" in r]
    assert train_steps == list(range(1, TOTAL + 1))  # one run's rows, each step once
    with ckpt_lib.Checkpointer(work, read_only=True) as ckpt:
        assert ckpt.latest_step() == TOTAL


def test_config_is_saved_with_argv_and_versions(locked_run, data_dir):
    saved = json.loads((locked_run["work"] / "config.json").read_text())
    assert saved["config"] == json.loads(json.dumps(tiny_config(data_dir).to_dict()))
    assert f"--workdir={locked_run['work']}" in saved["argv"]
    assert saved["versions"]["jax"] == jax.__version__
    assert saved["history"] == []


def test_a_resume_that_changes_the_data_or_objective_is_refused(locked_run, data_dir):
    work = str(locked_run["work"])
    before = sorted(os.listdir(work))
    saved = (locked_run["work"] / "config.json").read_text()
    for key, value, match in [
            ("loss.cost_neg", 30.0, r"loss.cost_neg: 35.0 -> 30.0 \(pass "
                                    r"--allow_config_change=loss.cost_neg"),
            ("dataset.variant", "size40", "dataset.variant: 'size40_val2' -> 'size40'"),
            ("model.embedding_dim", 16, "never allowed"),
    ]:
        with pytest.raises(workdir.ConfigChangeError, match=match) as info:
            train.train_and_evaluate(tiny_config(data_dir, **{key: value}), work,
                                     allow_config_change=("model.embedding_dim",))
        assert "strict" not in str(info.value)
    # Read-only commands: shapes and data refused, training-only keys ignored.
    with pytest.raises(workdir.ConfigChangeError, match="model.embedding_dim"):
        train.load_trained_state(tiny_config(data_dir, **{"model.embedding_dim": 16}), work)
    state = train.load_trained_state(
        tiny_config(data_dir, **{"loss.cost_neg": 30.0, "eval.batch_size_per_device": 8}), work)
    assert int(state["step"]) == TOTAL
    assert sorted(os.listdir(work)) == before  # no lock left, nothing written
    assert (locked_run["work"] / "config.json").read_text() == saved


def test_allowed_changes_are_accepted_and_recorded(locked_run, data_dir):
    work = str(locked_run["work"])
    config = tiny_config(data_dir, **{"loss.cost_neg": 30.0, "log_every_steps": 2})
    changes = workdir.check_or_save_config(work, config, allow="loss.*")
    assert changes == {"log_every_steps": (1, 2), "loss.cost_neg": (35.0, 30.0)}
    saved = json.loads((locked_run["work"] / "config.json").read_text())
    assert saved["config"]["loss"]["cost_neg"] == 30.0
    assert saved["history"][-1]["changed"] == {"log_every_steps": 1, "loss.cost_neg": 35.0}


def test_compare_configs_table():
    base = {"model": {"embedding_dim": 8}, "loss": {"cost_neg": 35.0},
            "dataset": {"name": "digits", "data_dir": "a"}, "eval": {"ks": [1, 2]},
            "optim": {"base_lr": 1e-3}}
    changed = json.loads(json.dumps(base))
    changed["dataset"]["data_dir"] = "b"
    changed["eval"]["ks"] = [1]
    assert workdir.compare_configs(base, changed) == {"dataset.data_dir": ("a", "b"),
                                                      "eval.ks": ([1, 2], [1])}
    changed["optim"]["base_lr"] = 1e-4
    with pytest.raises(workdir.ConfigChangeError, match="optim.base_lr"):
        workdir.compare_configs(base, changed)
    assert "optim.base_lr" in workdir.compare_configs(base, changed, context="eval")
    assert "optim.base_lr" in workdir.compare_configs(base, changed, allow="optim.*")
    changed["new_key"] = 1  # a key the saved config lacks is a change too
    with pytest.raises(workdir.ConfigChangeError, match="new_key: '<absent>' -> 1"):
        workdir.compare_configs(base, changed, allow=["optim.base_lr"])


def test_without_a_checkpoint_the_saved_config_binds_nothing(tmp_path):
    """A run that stopped before its first checkpoint (e.g. a bad device count)
    must not pin its config: the corrected rerun is accepted."""
    workdir.check_or_save_config(tmp_path, tiny_config("unused", **{"model.embedding_dim": 4}))
    fixed = tiny_config("unused")
    assert workdir.check_or_save_config(tmp_path, fixed) == {}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["model"]["embedding_dim"] == 8
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)  # now it binds
    with pytest.raises(workdir.ConfigChangeError, match="model.embedding_dim: 8 -> 4"):
        workdir.check_or_save_config(tmp_path, tiny_config("unused", **{"model.embedding_dim": 4}))


def test_evaluate_on_a_missing_workdir_is_one_error_and_creates_nothing(tmp_path):
    missing = tmp_path / "missing"
    out = _cli("deml_jax.evaluate", f"--config={ROOT}/tests/train_config.py",
               f"--workdir={missing}")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"evaluate: error: workdir '{missing}' does not exist (expected the --workdir of "
        f"a training run, holding checkpoints/)"], out.stderr[-3000:]
    assert not missing.exists()


def test_evaluate_best_without_one_creates_nothing(data_dir, tmp_path):
    from deml_jax.evaluate import evaluate_checkpoint
    from deml_jax.export_features import export

    with pytest.raises(FileNotFoundError, match="no best checkpoint in"):
        evaluate_checkpoint(tiny_config(data_dir), str(tmp_path), "best")
    with pytest.raises(FileNotFoundError, match="no latest checkpoint in"):
        export(tiny_config(data_dir), str(tmp_path), "test", str(tmp_path / "f.npz"))
    assert os.listdir(tmp_path) == []


def test_disk_full_during_training(data_dir, tmp_path, monkeypatch):
    """The write of checkpoint 4 fails with ENOSPC: a clear error, checkpoint 2
    stays the latest (no corrupted 4), the lock is released; a rerun resumes."""
    async def full(self, x, directory):  # runs in orbax's background writer
        if f"checkpoints{os.sep}4." in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, x, directory)
    original = ocp.JsonCheckpointHandler._save_fn
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full)
    work = str(tmp_path)
    config = tiny_config(data_dir, total_steps=4)  # the failed save is the last one
    with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
        train.train_and_evaluate(config, work)
    assert "could not write checkpoint step 4" in str(info.value)
    assert "the last complete checkpoint, step 2, is kept" in str(info.value)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(work, ".lock"))
    with ckpt_lib.Checkpointer(work, read_only=True) as ckpt:
        assert ckpt.latest_step() == 2
    assert "4" not in os.listdir(os.path.join(work, "checkpoints"))
    # Space freed: the same command, in a new process, resumes at step 2.
    out = _cli("deml_jax.main", f"--config={ROOT}/tests/train_config.py", f"--workdir={work}",
               f"--config.dataset.data_dir={data_dir}", "--config.total_steps=4")
    assert out.returncode == 0 and "resuming at step 2" in out.stderr, out.stderr[-3000:]
    steps = [r["step"] for r in logging_lib.read_metrics(work) if "train/loss" in r]
    assert steps == [1, 2, 3, 4]
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2", "4"]  # tmp gone
    with ckpt_lib.Checkpointer(work, read_only=True) as ckpt:
        assert ckpt.latest_step() == 4


def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path,
                                                                monkeypatch):
    """Step 3's images are NaN: the real step computes a NaN loss; the run stops
    with NonFiniteError naming step 3, saves nothing of it, releases the lock."""
    import numpy as np

    from deml_jax import parallel

    make = parallel.make_launcher

    def poisoned(*args, **kwargs):
        launcher, calls = make(*args, **kwargs), []
        step = launcher.step

        def poisoned_step(state, batch):
            calls.append(1)
            if len(calls) == 3:
                batch = dict(batch, image=batch["image"] * np.float32(np.nan))
            return step(state, batch)
        launcher.step = poisoned_step
        return launcher
    monkeypatch.setattr(parallel, "make_launcher", poisoned)
    with pytest.raises(logging_lib.NonFiniteError) as info:
        train.train_and_evaluate(tiny_config(data_dir, total_steps=4), str(tmp_path))
    assert info.value.step == 3 and "loss" in info.value.names
    with ckpt_lib.Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.latest_step() == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert [r["step"] for r in logging_lib.read_metrics(tmp_path)] == [1, 2]
    assert not (tmp_path / ".lock").exists()
