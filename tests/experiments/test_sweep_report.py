"""results.md statistics against hand computations on a fixed CSV."""

import os

import pytest

from experiments import sweep_report

CSV = """row,config,overrides,seed,steps,wall_s,train_s,images_per_s,test/recall@1,untrained/recall@1
a,c.py,{},0,10,5,4,100,0.5,0.1
a,c.py,{},1,10,5,4,100,0.6,0.1
a,c.py,{},2,10,5,4,100,0.7,0.1
b,c.py,{},0,10,5,4,100,0.55,
b,c.py,{},1,10,5,4,100,0.70,
b,c.py,{},2,10,5,4,100,0.70,
c,c.py,{},0,10,5,4,100,0.4,
c,c.py,{},1,10,5,4,100,0.6,
"""


@pytest.fixture
def rows(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(CSV)
    return sweep_report.read_csv(str(path))


def test_mean_std_by_hand(rows):
    # a: mean 0.6, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    m, s, n = sweep_report.mean_std(r["test/recall@1"] for r in rows if r["row"] == "a")
    assert (m, s, n) == (pytest.approx(0.6, abs=1e-9), pytest.approx(0.1, abs=1e-9), 3)
    # b: deviations -0.1, 0.05, 0.05 -> sqrt(0.015 / 2)
    m, s, n = sweep_report.mean_std(r["test/recall@1"] for r in rows if r["row"] == "b")
    assert m == pytest.approx(0.65, abs=1e-9) and s == pytest.approx(0.0866025404, abs=1e-9)
    assert sweep_report.mean_std([0.3]) == (0.3, None, 1)


def test_paired_differences_by_hand(rows):
    # b - a per seed: 0.05, 0.10, 0.00 -> mean 0.05, std sqrt(0.005 / 2) = 0.05
    m, s, n = sweep_report.paired(rows, "b", "a", "test/recall@1")
    assert (m, s, n) == (pytest.approx(0.05, abs=1e-9), pytest.approx(0.05, abs=1e-9), 3)
    # c has seeds 0, 1 only: -0.1, 0.0 -> mean -0.05, std sqrt(0.005) = 0.0707107
    m, s, n = sweep_report.paired(rows, "c", "a", "test/recall@1")
    assert (m, s, n) == (pytest.approx(-0.05, abs=1e-9), pytest.approx(0.0707106781, abs=1e-9), 2)


def test_training_gain_by_hand(rows):
    # a: trained 0.5, 0.6, 0.7 against its controls 0.1 each -> 0.4, 0.5, 0.6
    m, s, n = sweep_report.training_gain(rows, "a", "recall@1")
    assert (m, s, n) == (pytest.approx(0.5, abs=1e-9), pytest.approx(0.1, abs=1e-9), 3)
    assert sweep_report.training_gain(rows, "b", "recall@1")[2] == 0  # b has no control


def test_markdown_table(rows):
    md = sweep_report.markdown(rows, name="fixed", reference="a", expected_runs=9)
    assert "8 finished run(s) of 9" in md
    assert "| `a` | 0,1,2 | 0.6000 ± 0.1000 |" in md
    assert "| `a` untrained | 0,1,2 | 0.1000 ± 0.0000 |" in md
    assert "| `b` | 0,1,2 | 0.6500 ± 0.0866 |" in md
    assert "`b` untrained" not in md  # no control measured for b
    assert "| `b` | 3 | 0.0500 ± 0.0500 |" in md
    assert "| `c` | 2 | -0.0500 ± 0.0707 |" in md
    gain = md.split("## Training against its untrained control")[1].split("## Paired")[0]
    assert "| `a` | 3 | 0.5000 ± 0.1000 |" in gain and "`b`" not in gain


def test_csv_round_trip_and_pictures(rows, tmp_path):
    sweep_report.write_csv(str(tmp_path / "again.csv"), rows)
    assert sweep_report.read_csv(str(tmp_path / "again.csv")) == rows
    curves = {"a": {"loss": {1: [2.0, 1.0], 2: [1.0]}, "r1": {2: [0.5]}}}
    for path in sweep_report.pictures(rows, curves, str(tmp_path)):
        assert os.path.getsize(path) > 0


def test_rows_keep_distinct_styles_beyond_ten():
    """36 rows (a full demo sweep is 12): no two share colour and marker; the 11th row
    reuses the 1st colour with another marker."""
    styles = [sweep_report.row_style(i) for i in range(36)]
    assert len(set(styles)) == 36
    assert styles[10][0] == styles[0][0] and styles[10][1] != styles[0][1]


def test_cost_unmeasured_and_measured():
    runs = [dict(row="deml", seed=s, steps=1000, method="deml", dtype="float32", devices=1)
            for s in (0, 1, 2)]
    text = sweep_report.cost_table(runs, None, "missing.json")
    assert "UNMEASURED" in text and "| `deml` | 3 | 1000 | unmeasured | unmeasured |" in text
    bench = {"reduced": False, "methods": {"deml": {"float32": {"step_s": 0.36}}}}
    text = sweep_report.cost_table(runs, bench, "b.json")
    # 3 runs x 1000 steps x 0.36 s / 3600 = 0.30 GPU-hours
    assert "| `deml` | 3 | 1000 | 0.3600 | 0.30 |" in text and "Total: 0.30 GPU-hours" in text
    assert "UNMEASURED" in sweep_report.cost_table(runs, dict(bench, reduced=True), "b.json")
