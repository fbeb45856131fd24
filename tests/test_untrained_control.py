"""The untrained control's place in results.json and in the final table."""

from deml_jax import snapshots


def test_final_table_has_untrained_column():
    summary = snapshots.summarize([{"step": 3, "test/recall@1": 0.75}], "recall@1")
    summary[snapshots.UNTRAINED] = {"step": 0, "test": {"recall@1": 0.25}}
    table = snapshots.format_summary(summary)
    header = [line for line in table.splitlines() if line.startswith("metric")][0]
    assert "untrained (init)" in header
    row = [line for line in table.splitlines() if line.startswith("recall@1")][0]
    assert [c.strip() for c in row.split("|")] == ["recall@1", "0.7500", "0.2500"]


def test_no_column_without_control():
    summary = snapshots.summarize([{"step": 3, "test/recall@1": 0.75}], "recall@1")
    assert "untrained" not in snapshots.format_summary(summary)
