"""The sweep runner on a 2-run sweep of configs/demo_digits.py:runlocal.

Runs real (tiny) trainings in subprocesses: the finished sweep writes
results.csv, results.md and the pictures; a rerun trains nothing; a sweep
killed (SIGKILL to the runner's process group) in the middle of a run and
rerun gives the same metric values as the uninterrupted sweep.
"""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The cheapest run the trainer offers: one 8-d learner on 32 px crops, 3 steps.
CHEAP = {"method": "u512", "model.num_branches": 1, "model.num_learners": 1,
         "model.channel_attention": "none", "model.embedding_dim": 8,
         "loss.diversity": "none", "loss.act_weight": 0.0, "loss.row_norm_lambda": 0.0,
         "dataset.crop_size": 32, "eval.clustering": False, "eval.untrained_control": True}
SWEEP = '''
def get_sweep():
    return dict(
        seeds=(0,), reference="a", overrides=dict({cheap!r}, **{{"dataset.data_dir": {data!r}}}),
        rows=[dict(name="a", config="configs/demo_digits.py:runlocal"),
              dict(name="b", config="configs/demo_digits.py:runlocal",
                   overrides={{"model.embedding_dim": 4}})])
'''


def runner(sweep, workdir, **kw):
    return subprocess.Popen([sys.executable, "-m", "experiments.sweep", "--sweep", sweep,
                             "--workdir", workdir], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def metric_values(path):
    """{(row, seed): {metric: value}} of results.csv, timings left out."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {(r["row"], r["seed"]): {k: float(v) for k, v in r.items()
                                    if "/" in k and v and not k.endswith("time_s")}
            for r in rows}


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    path = d / "tiny.py"
    path.write_text(SWEEP.format(cheap=CHEAP, data=str(d / "tfds")))
    return str(path), d


def test_sweep_runs_reruns_and_resumes_after_kill(sweep_file):
    sweep, d = sweep_file
    a = str(d / "A")
    p = runner(sweep, a)
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, out
    for name in ("results.csv", "results.md", "recall_at_k.png", "curves.png"):
        assert os.path.getsize(os.path.join(a, name)) > 0, name
    ref = metric_values(os.path.join(a, "results.csv"))
    assert sorted(ref) == [("a", "0"), ("b", "0")]
    for vals in ref.values():  # the trained and the untrained rows are both there
        assert 0.0 <= vals["test/recall@1"] <= 1.0 and 0.0 <= vals["untrained/recall@1"] <= 1.0
    md = open(os.path.join(a, "results.md")).read()
    assert "`a` untrained" in md and "Paired differences against `a`" in md

    # A rerun trains nothing: no run is started, no metrics row is written.
    runs = [os.path.join(a, r, "seed0") for r in ("a", "b")]
    before = [(os.path.getmtime(os.path.join(r, "metrics.jsonl")),
               open(os.path.join(r, "sweep_run.json")).read()) for r in runs]
    p = runner(sweep, a)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and "running" not in out, out
    assert before == [(os.path.getmtime(os.path.join(r, "metrics.jsonl")),
                       open(os.path.join(r, "sweep_run.json")).read()) for r in runs]
    assert metric_values(os.path.join(a, "results.csv")) == ref

    # Killed in the middle of run b (run a finished: copied from A), then rerun.
    b = str(d / "B")
    shutil.copytree(os.path.join(a, "a"), os.path.join(b, "a"))
    p = runner(sweep, b, start_new_session=True)  # its own group: killpg hits run b too
    metrics = os.path.join(b, "b", "seed0", "metrics.jsonl")
    deadline = time.time() + 900
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(metrics) and '"step": 2' in open(metrics).read():
            break
        time.sleep(0.05)
    killed = p.poll() is None
    if killed:
        os.killpg(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    assert killed, "the sweep finished before it could be killed"
    # kill -9 is asynchronous: run b's process may still be exiting (its lock still
    # names a live pid) when a rerun starts; a user restarts later than this.
    while time.time() < deadline:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    assert not os.path.exists(os.path.join(b, "b", "seed0", "results.json"))
    p = runner(sweep, b)
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, out
    assert "b seed 0: running" in out and "a seed 0: running" not in out
    got = metric_values(os.path.join(b, "results.csv"))
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert set(got[key]) == set(ref[key])
        for m, v in ref[key].items():
            assert got[key][m] == pytest.approx(v, rel=1e-5, abs=1e-5), (key, m)
