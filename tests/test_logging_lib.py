"""Tests of deml_jax.logging_lib: JSONL, TensorBoard events, NaN guard, progress bar."""
import io
import json
import math
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from deml_jax import logging_lib


def read_event_file(path):
    """Parses TFRecord framing by hand: u64 length, u32 crc, data, u32 crc."""
    events, data = [], path.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        payload = data[pos + 12:pos + 12 + length]
        events.append(event_pb2.Event.FromString(payload))
        pos += 12 + length + 4
    return events


def test_jsonl_roundtrip_and_append(tmp_path):
    with logging_lib.MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(1, {"loss": 0.5, "lr": np.float32(1e-5),
                            "grad_norm": jnp.asarray([2.0])})
        w.write_scalars(np.int64(2), {"loss": float("nan")})
    with logging_lib.MetricWriter(tmp_path, tensorboard=False) as w:  # resume
        w.write_scalars(3, {"val/recall@1": 0.647})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": 0.5,
                                    "lr": pytest.approx(1e-5), "grad_norm": 2.0}
    rows = logging_lib.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert math.isnan(rows[1]["loss"]) and rows[2] == {"step": 3,
                                                       "val/recall@1": 0.647}


def test_flushed_each_write_and_truncated_last_line_skipped(tmp_path):
    w = logging_lib.MetricWriter(tmp_path, tensorboard=False)
    w.write_scalars(5, {"loss": 1.25})
    # Readable before close: what a kill -9 at this point would leave.
    assert logging_lib.read_metrics(tmp_path) == [{"step": 5, "loss": 1.25}]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a write cut by a kill
    assert logging_lib.read_metrics(tmp_path) == [{"step": 5, "loss": 1.25}]
    w.close()


def test_bad_scalars_raise(tmp_path):
    with logging_lib.MetricWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="'emb'"):
            w.write_scalars(1, {"emb": np.zeros(3)})
        with pytest.raises(ValueError, match="'name'"):
            w.write_scalars(1, {"name": "abc"})
        with pytest.raises(ValueError, match="step"):
            w.write_scalars(1, {"step": 1})
        with pytest.raises(TypeError, match="step"):
            w.write_scalars(1.5, {"loss": 1.0})


def test_tensorboard_event_file_is_readable(tmp_path):
    with logging_lib.MetricWriter(tmp_path) as w:
        w.write_scalars(10, {"train/loss": 0.25, "lr": 1e-5})
        w.write_scalars(20, {"train/loss": 0.125})
        w.write_text(0, "config", "base_lr: 1e-5")
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars, texts = [], []
    for event in read_event_file(files[0]):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.append((event.step, value.tag, value.simple_value))
            elif value.HasField("tensor"):
                texts.append((event.step, value.tag,
                              value.tensor.string_val[0].decode()))
    assert sorted(scalars) == [(10, "lr", pytest.approx(1e-5)),
                               (10, "train/loss", 0.25),
                               (20, "train/loss", 0.125)]
    assert texts[0][0] == 0 and "base_lr: 1e-5" in texts[0][2]
    text_line = json.loads((tmp_path / "text.jsonl").read_text())
    assert text_line == {"step": 0, "name": "config", "text": "base_lr: 1e-5"}


def test_non_primary_writes_nothing(tmp_path):
    workdir = tmp_path / "host1"
    with logging_lib.MetricWriter(workdir, is_primary=False) as w:
        w.write_scalars(1, {"loss": 1.0})
        w.write_text(1, "a", "b")
        w.flush()
    assert not workdir.exists()
    assert logging_lib.read_metrics(workdir) == []


def test_check_finite_names_the_bad_keys():
    logging_lib.check_finite({"loss": 1.0, "g": jnp.ones(3)}, step=3)
    with pytest.raises(logging_lib.NonFiniteError) as info:
        logging_lib.check_finite({"loss": 1.0, "grad_norm": float("inf"),
                                  "bin": jnp.asarray(np.nan), "ok": 2.0,
                                  "emb": np.array([1.0, np.nan])}, step=42)
    err = info.value
    assert err.step == 42 and err.names == ("grad_norm", "bin", "emb")
    assert "step 42" in str(err) and "grad_norm=inf" in str(err)
    assert "bin=nan" in str(err) and "loss" not in str(err)


def test_tree_norm_vs_numpy():
    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(3, 4)).astype(np.float32),
            "b": [rng.normal(size=5).astype(np.float16), np.arange(3)]}
    flat = np.concatenate([tree["a"].ravel(), tree["b"][0].astype(np.float64),
                           tree["b"][1].astype(np.float64)])
    want = np.sqrt(np.sum(flat.astype(np.float64) ** 2))
    got = jax.jit(logging_lib.tree_norm)(tree)
    assert got.dtype == jnp.float32 and got.shape == ()
    chex.assert_trees_all_close(got, np.float32(want), rtol=1e-5)
    assert float(logging_lib.tree_norm({})) == 0.0


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_bar_on_non_tty_stream():
    stream, clock = io.StringIO(), FakeClock()
    bar = logging_lib.ProgressBar(1000, start_step=500, images_per_step=52,
                                  stream=stream, every=100, clock=clock)
    assert not bar.is_tty
    for step in range(501, 1001):
        clock.now += 0.5  # 2 steps/s
        bar.update(step, loss=0.123456)
    bar.close()
    lines = stream.getvalue().splitlines()
    # Printed at 600, 700, 800, 900, 1000 only; rates start at step 501.
    assert [l.split()[1] for l in lines] == ["600/1000", "700/1000", "800/1000",
                                             "900/1000", "1000/1000"]
    assert "\r" not in stream.getvalue()
    assert lines[0] == ("step 600/1000 (60.0%) | 2.00 steps/s | 104.0 img/s | "
                        "ETA 0:03:20 | loss 0.1235")
    assert "ETA 0:00:00" in lines[-1]


def test_progress_bar_tty_redraws_in_place():
    class TTY(io.StringIO):
        def isatty(self):
            return True

    stream, clock = TTY(), FakeClock()
    bar = logging_lib.ProgressBar(10, stream=stream, clock=clock)
    for step in (1, 2, 3):
        clock.now += 60.0
        bar.update(step)
    bar.close()
    out = stream.getvalue()
    assert out.count("\r") == 3 and out.endswith("\n") and out.count("\n") == 1
    assert "step 1/10 (10.0%) | ? steps/s | ETA ?" in out
    assert "step 3/10 (30.0%) | 0.02 steps/s | ETA 0:07:00" in out


def test_progress_bar_disabled_and_metrics_mapping():
    stream, clock = io.StringIO(), FakeClock()
    logging_lib.ProgressBar(10, stream=stream, clock=clock, enabled=False).update(10)
    assert stream.getvalue() == ""
    bar = logging_lib.ProgressBar(10, stream=stream, clock=clock, every=5)
    bar.update(5, {"loss": 0.5}, lr=1e-5)
    assert stream.getvalue().rstrip("\n").endswith("| loss 0.5 | lr 1e-05")


def test_log_and_format_table():
    stream = io.StringIO()
    logging_lib.log("starting", stream=stream)
    hh, mm, rest = stream.getvalue().split(":", 2)
    assert len(hh) == len(mm) == 2 and rest[2:] == " starting\n"
    table = logging_lib.format_table({"recall@1": 0.6471, "n": 5924}, title="test")
    assert table.splitlines() == ["test", "name     | value", "---------+-------",
                                  "recall@1 | 0.6471", "n        | 5924"]


def test_without_tensorboardx_jsonl_only_and_one_warning(tmp_path, monkeypatch,
                                                          caplog):
    import sys
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    monkeypatch.setattr(logging_lib, "_warned_no_tensorboard", False)
    with caplog.at_level("WARNING"):
        for sub in ("a", "b"):
            with logging_lib.MetricWriter(tmp_path / sub) as w:
                w.write_scalars(1, {"loss": 2.0})
    assert sum("tensorboardX" in r.message for r in caplog.records) == 1
    assert logging_lib.read_metrics(tmp_path / "b") == [{"step": 1, "loss": 2.0}]
    assert not (tmp_path / "a" / "tb").exists()


def _raw_rows(path):
    """Every line of the file parsed by json (fails on any bad line)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_partial_last_line_is_cut_off_when_a_writer_opens(tmp_path):
    """A kill mid-write leaves a partial line; the next run must not append to it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with logging_lib.MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(3, {"loss": 1.0})
    want = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
    assert _raw_rows(path) == want
    assert logging_lib.read_metrics(tmp_path) == want
    # A complete row that only lacks its newline is kept, not cut.
    path.write_text('{"step": 1, "loss": 2.0}')
    with logging_lib.MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(2, {"loss": 1.5})
    assert _raw_rows(path) == want[:2]
    # A partial first (only) line: the file becomes empty, then the new row.
    path.write_text('{"st')
    with logging_lib.MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(1, {"loss": 2.0})
    assert _raw_rows(path) == want[:1]


def test_rows_after_the_resume_step_are_dropped(tmp_path):
    """Killed after step 5 with the last checkpoint at 4: steps 5.. are logged again."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 6)]
    rows.insert(4, {"step": 4, "val/recall@1": 0.5})  # the evaluation at step 4 stays
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "tr')
    with logging_lib.MetricWriter(tmp_path, tensorboard=False, resume_step=4) as w:
        for s in (5, 6):
            w.write_scalars(s, {"train/loss": s / 8})
    got = logging_lib.read_metrics(tmp_path)
    train_steps = [r["step"] for r in got if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert got[:5] == rows[:5]
    assert got[5:] == [{"step": 5, "train/loss": 0.625}, {"step": 6, "train/loss": 0.75}]
    assert _raw_rows(path) == got
    # Non-primary writers touch nothing.
    before = path.read_bytes()
    logging_lib.MetricWriter(tmp_path, is_primary=False, resume_step=0).close()
    assert path.read_bytes() == before


def test_none_metrics_are_json_null_and_skip_tensorboard(tmp_path):
    # A degenerate evaluation inside a training run reports None (evaluator 'warn').
    with logging_lib.MetricWriter(tmp_path) as w:
        w.write_scalars(4, {"val/recall@1": None, "val/num_queries": 0})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line) == {"step": 4, "val/recall@1": None, "val/num_queries": 0.0}
    assert "NaN" not in line
