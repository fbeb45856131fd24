"""Evaluated snapshots: which steps are tested, and what results.json reports.

The released code extracts test features at the snapshots 10,500 ... 15,000
every 500 (§6 ``extractfeatures.sh``, §7 ``evaluate_recall.m~``) and its README
quotes the CUB result "at ~10k iterations" (§11.2); the scripts select no
snapshot themselves (§7), so reporting the best of them is selecting on the
test split.  Here ``config.eval.snapshot_steps`` lists the test evaluations
(the last step is always evaluated when ``config.eval.final_test``), every
evaluated snapshot's metrics go to ``metrics.jsonl`` (``test/...`` and, with a
validation split, ``val/...`` at the same step), and ``results.json`` holds:

* ``snapshots``: ``[{"step", "test", "val"?}, ...]``, every evaluated snapshot;
* ``last`` (and, as before, top-level ``step`` / ``test``): the last snapshot;
* ``best_on_val``: the test metrics of the snapshot with the best
  ``val/<eval.best_metric>`` (earliest on ties), when ``dataset.val_split`` is set;
* :data:`BEST_ON_TEST`: the snapshot with the best test metric, labelled as
  selected on the test split (optimistic; what the released protocol did).
* :data:`UNTRAINED` (``untrained_control``, with ``config.eval.untrained_control``):
  ``{"step": 0, "test": ...}``, the same network at its initialisation.

The summary is rebuilt from ``metrics.jsonl``, so it covers snapshots
evaluated before a pre-emption and resume.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

BEST_ON_TEST = ("best_on_test (selected on the test split: the released protocol's "
                "effective choice, optimistic)")
RESULTS_FILE = "results.json"
# The test metrics of the network at its initialisation (config.eval.untrained_control).
UNTRAINED = "untrained_control"


def schedule(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(tested, skipped)``: the snapshot steps within ``total_steps`` and those past it."""
    steps = sorted(set(int(s) for s in config.eval.snapshot_steps))
    return (tuple(s for s in steps if s <= config.total_steps),
            tuple(s for s in steps if s > config.total_steps))


def loop_steps(config) -> frozenset[int]:
    """Steps whose test split the training loop evaluates.

    The last step is left to the final evaluation after the loop (which also
    draws the pictures) when ``config.eval.final_test``.
    """
    tested, _ = schedule(config)
    last = config.total_steps if config.eval.final_test else None
    return frozenset(s for s in tested if s != last)


def _by_step(rows: Iterable[Mapping], prefix: str) -> dict[int, dict]:
    """``{step: {metric: value}}`` of the ``prefix/`` keys; later rows win."""
    out: dict[int, dict] = {}
    for row in rows:
        values = {k[len(prefix) + 1:]: v for k, v in row.items() if k.startswith(prefix + "/")}
        if values:
            out.setdefault(int(row["step"]), {}).update(values)
    return out


def _best(snaps: list[dict], split: str, metric: str):
    """The snapshot with the highest ``split`` ``metric`` (earliest on ties), or None."""
    best = None
    for snap in snaps:
        value = snap.get(split, {}).get(metric)
        if value is not None and (best is None or value > best[split][metric]):
            best = snap
    return best


def summarize(rows: Iterable[Mapping], best_metric: str) -> dict:
    """results.json's content from ``metrics.jsonl`` rows (see the module docstring).

    A snapshot is a step with ``test/`` metrics; its ``val/`` metrics of the
    same step, if any, are attached.  Empty dict when no step was tested.
    """
    rows = list(rows)
    tests, vals = _by_step(rows, "test"), _by_step(rows, "val")
    snaps = [dict(step=s, test=tests[s], **({"val": vals[s]} if s in vals else {}))
             for s in sorted(tests)]
    if not snaps:
        return {}
    last = snaps[-1]
    out = {"step": last["step"], "test": last["test"], "last": last}
    if any("val" in s for s in snaps):
        best = _best(snaps, "val", best_metric)
        if best is not None:
            out["best_on_val"] = dict(best, selected_by=f"val/{best_metric}")
    best = _best(snaps, "test", best_metric)
    if best is not None:
        out[BEST_ON_TEST] = dict(best, selected_by=f"test/{best_metric}")
    out["snapshots"] = snaps
    return out


def write_results(workdir: str, summary: Mapping) -> str:
    from deml_jax import json_util  # NaN/inf -> null: always valid JSON
    return json_util.dump(summary, os.path.join(workdir, RESULTS_FILE), indent=2)


def format_summary(summary: Mapping) -> str:
    """The final table: test metrics of the last snapshot and of the best on val."""
    columns = [(f"last (step {summary['last']['step']})", summary["last"]["test"])]
    if "best_on_val" in summary:
        best = summary["best_on_val"]
        columns.append((f"best on val (step {best['step']})", best["test"]))
    if UNTRAINED in summary:  # the control: same network, no training
        columns.append(("untrained (init)", summary[UNTRAINED]["test"]))
    names = list(columns[0][1])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    width = max([len(n) for n in names] + [6])
    widths = [max(len(title), 10) for title, _ in columns]
    lines = [f"test split, {len(summary['snapshots'])} evaluated snapshot(s)",
             " | ".join([f"{'metric':<{width}}"] + [f"{t:<{w}}" for (t, _), w in zip(columns, widths)]),
             "-+-".join(["-" * width] + ["-" * w for w in widths])]
    for name in names:
        lines.append(" | ".join([f"{name:<{width}}"] + [
            f"{fmt(col.get(name, '')):<{w}}" for (_, col), w in zip(columns, widths)]))
    return "\n".join(lines)
