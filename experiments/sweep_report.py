"""What a sweep reports: results.csv rows, results.md (mean ± std, controls,
paired differences), pictures, and the expected accelerator cost.

Statistics (hand-checkable; tests/experiments/test_sweep_report.py):
* per row and metric: mean and the SAMPLE standard deviation (ddof = 1) over
  the row's finished seeds; with one seed only the mean is shown;
* paired difference of a row against the reference row: per seed present in
  both, ``row - reference``; reported as the mean ± sample std of these
  differences, with the number of pairs.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Iterable, Mapping, Sequence

FIXED_COLUMNS = ("row", "config", "overrides", "seed", "steps", "wall_s", "train_s",
                 "images_per_s")
# Metrics of results.md (those present); every metric goes to results.csv.
SHOWN = ("recall@1", "recall@2", "recall@4", "recall@8", "recall@10", "recall@20",
         "recall@100", "recall@1000", "nmi", "f1", "map@r")
TEST, UNTRAINED = "test/", "untrained/"


def write_csv(path: str, rows: Sequence[Mapping]) -> None:
    """One row per run; columns: FIXED_COLUMNS then every metric key, sorted."""
    metric_keys = sorted({k for r in rows for k in r if k not in FIXED_COLUMNS})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(FIXED_COLUMNS) + metric_keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in w.fieldnames})


def read_csv(path: str) -> list[dict]:
    """results.csv back as dicts: numbers as float (seed, steps as int), '' as None."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                if k in ("row", "config", "overrides"):
                    row[k] = v
                elif v == "":
                    row[k] = None
                else:
                    row[k] = int(float(v)) if k in ("seed", "steps") else float(v)
            out.append(row)
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float | None, int]:
    """(mean, sample std with ddof 1 or None for one value, n)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return math.nan, None, 0
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, None, 1
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)), len(vals)


def paired(rows: Sequence[Mapping], row: str, reference: str, key: str):
    """(mean, std, n) of ``row - reference`` of ``key`` over the seeds both have."""
    ref = {r["seed"]: r.get(key) for r in rows if r["row"] == reference}
    diffs = [r[key] - ref[r["seed"]] for r in rows
             if r["row"] == row and r.get(key) is not None and ref.get(r["seed"]) is not None]
    return mean_std(diffs)


def training_gain(rows: Sequence[Mapping], row: str, metric: str):
    """(mean, std, n) over the runs of ``row`` of trained − untrained ``metric``
    (each run against its own control: same seed, same initialisation)."""
    return mean_std(r[TEST + metric] - r[UNTRAINED + metric] for r in rows
                    if r["row"] == row and r.get(TEST + metric) is not None
                    and r.get(UNTRAINED + metric) is not None)


def _fmt(m, s, n, digits=4) -> str:
    if not n:
        return "–"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def _delta_table(stats_by_row: Mapping[str, list], shown: Sequence[str], count: str) -> list[str]:
    """Markdown lines of a difference table: per row, the largest n and Δ per metric."""
    lines = ["| " + " | ".join(["row", count] + [f"Δ {m}" for m in shown]) + " |",
             "|" + "---|" * (len(shown) + 2)]
    for row, stats in stats_by_row.items():
        n = max((st[2] for st in stats), default=0)
        lines.append("| " + " | ".join([f"`{row}`", str(n)] + [
            _fmt(*st) if st[2] else "–" for st in stats]) + " |")
    return lines


def row_names(rows: Sequence[Mapping]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["row"] not in seen:
            seen.append(r["row"])
    return seen


def markdown(rows: Sequence[Mapping], *, name: str, reference,
             expected_runs: int | None = None, cost: str = "") -> str:
    """results.md: per row mean ± std over seeds, its untrained control below it,
    then the paired differences against ``reference`` (a row name, or a list of
    them: one table each, over the rows sharing its prefix up to the first '.')."""
    shown = [m for m in SHOWN if any(r.get(TEST + m) is not None for r in rows)]
    done = len(rows)
    lines = [f"# Sweep `{name}`", "",
             f"{done} finished run(s)" + (f" of {expected_runs}" if expected_runs else "")
             + ". Test split at the last step; mean ± sample std (ddof 1) over seeds; "
             "the untrained control (the same network at its initialisation, no training) "
             "is the row below each trained row.", ""]
    head = ["row", "seeds"] + shown + ["steps", "train s", "wall s", "images/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in row_names(rows):
        rs = [r for r in rows if r["row"] == row]
        cells = [f"`{row}`", ",".join(str(r["seed"]) for r in rs)]
        cells += [_fmt(*mean_std(r.get(TEST + m) for r in rs)) for m in shown]
        cells += [_fmt(*mean_std(r.get(k) for r in rs), digits=d)
                  for k, d in (("steps", 0), ("train_s", 1), ("wall_s", 1), ("images_per_s", 1))]
        lines.append("| " + " | ".join(cells) + " |")
        if any(r.get(UNTRAINED + m) is not None for r in rs for m in shown):
            ctl = [f"`{row}` untrained", cells[1]]
            ctl += [_fmt(*mean_std(r.get(UNTRAINED + m) for r in rs)) for m in shown]
            lines.append("| " + " | ".join(ctl + ["0", "", "", ""]) + " |")
    gains = {n: [training_gain(rows, n, m) for m in shown] for n in row_names(rows)}
    gains = {n: st for n, st in gains.items() if any(x[2] for x in st)}
    if gains:
        lines += ["", "## Training against its untrained control", "",
                  "Per run: trained − untrained (the same seed's network at its "
                  "initialisation); mean ± sample std over the runs (n). A difference "
                  "within about two std of 0 is not evidence that training helped.", ""]
        lines += _delta_table(gains, shown, "runs")
    refs = [reference] if isinstance(reference, str) else list(reference or ())
    for ref in refs:
        # With several references (one per dataset, 'digits.deml', 'fashion.deml'),
        # each is compared with the rows of its own prefix (up to the first '.').
        group = [n for n in row_names(rows) if n != ref and (
            len(refs) == 1 or n.split(".")[0] == ref.split(".")[0])]
        lines += ["", f"## Paired differences against `{ref}`", "",
                  "Per seed present in both rows: row − reference; mean ± sample std of the "
                  "differences (n pairs).", ""]
        if ref not in row_names(rows):
            lines.append(f"(reference row `{ref}` has no finished run yet)")
            continue
        lines += _delta_table({row: [paired(rows, row, ref, TEST + m) for m in shown]
                               for row in group}, shown, "pairs")
    if cost:
        lines += ["", cost]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Pictures.

MARKERS = ("o", "s", "^", "D", "v")


def row_style(i: int) -> tuple[str, str]:
    """(colour, marker) of the i-th row: matplotlib's 10 cycle colours, then the next
    marker, so that up to 50 rows are told apart in one picture."""
    return f"C{i % 10}", MARKERS[(i // 10) % len(MARKERS)]


def pictures(rows: Sequence[Mapping], curves: Mapping[str, Mapping], out_dir: str) -> list[str]:
    """recall_at_k.png (mean ± std per row, untrained dotted) and curves.png
    (training loss, log scale when positive, and val — else test — Recall@1 against
    the step, mean over seeds); one (colour, marker) per row, legends beside the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ks = sorted({int(k.split("@")[1]) for r in rows for k in r
                 if k.startswith(TEST + "recall@") and r.get(k) is not None})
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, row in enumerate(row_names(rows)):
        colour, marker = row_style(i)
        rs = [r for r in rows if r["row"] == row]
        for prefix, style, label in ((TEST, "-", row), (UNTRAINED, ":", f"{row} (untrained)")):
            stats = [mean_std(r.get(f"{prefix}recall@{k}") for r in rs) for k in ks]
            if not any(s[2] for s in stats):
                continue
            ax.errorbar([k * (1 + 0.03 * i) for k in ks], [s[0] for s in stats],
                        yerr=[s[1] or 0.0 for s in stats], fmt=marker + style, capsize=3,
                        label=label, color=colour)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (test)")
    ax.set_title("Recall@K: mean ± std over seeds")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "recall_at_k.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    losses = []
    for i, row in enumerate(row_names(rows)):
        colour, marker = row_style(i)
        c = curves.get(row, {})
        for ax, key in zip(axes, ("loss", "r1")):
            if c.get(key):
                steps = sorted(c[key])
                means = [sum(c[key][s]) / len(c[key][s]) for s in steps]
                ax.plot(steps, means, "-" + marker, ms=3, markevery=max(1, len(steps) // 10),
                        label=row, color=colour)
                if key == "loss":
                    losses += means
    positive = bool(losses) and min(losses) > 0
    if positive:
        axes[0].set_yscale("log")
    axes[0].set_title("training loss (mean over seeds" + (", log scale)" if positive else ")"))
    axes[1].set_title("val Recall@1 (test where no val split)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "curves.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def run_curves(metrics_rows: Iterable[Mapping]) -> dict:
    """{'loss': {step: value}, 'r1': {step: value}} of one run's metrics.jsonl rows."""
    loss, val, test = {}, {}, {}
    for r in metrics_rows:
        s = int(r["step"])
        if r.get("train/loss") is not None:
            loss[s] = r["train/loss"]
        if r.get("val/recall@1") is not None:
            val[s] = r["val/recall@1"]
        if r.get("test/recall@1") is not None:
            test[s] = r["test/recall@1"]
    return {"loss": loss, "r1": val or test}


# ---------------------------------------------------------------------------
# Expected accelerator cost (paper sweeps).

DEFAULT_BENCH = os.path.join("runs", "bench", "accelerator", "accelerator.json")


def step_time(bench: Mapping | None, method: str, dtype: str) -> float | None:
    """Measured seconds a step of ``method`` in ``dtype`` on one accelerator, or None.

    From experiments/bench/accelerator.py's JSON (``methods.<m>.<dtype>.step_s``);
    a ``reduced`` (CPU smoke) measurement does not count.
    """
    if not bench or bench.get("reduced"):
        return None
    row = ((bench.get("methods") or {}).get(method) or {}).get(dtype) or {}
    value = row.get("step_s")
    return float(value) if isinstance(value, (int, float)) else None


def load_bench(path: str | None) -> dict | None:
    path = path or DEFAULT_BENCH
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cost_table(runs: Sequence[Mapping], bench: Mapping | None, bench_path: str) -> str:
    """Expected GPU-hours: sum over runs of steps x measured step time (training
    steps only; evaluations and compilation are extra). ``runs``: dicts with
    row, seed, steps, method, dtype, devices."""
    lines = ["## Expected accelerator cost", ""]
    if bench is None:
        lines.append(f"UNMEASURED: no benchmark JSON at `{bench_path}`. Run "
                     "`python experiments/bench/accelerator.py --out runs/bench/accelerator` "
                     "on the accelerator, then rerun with `--cost` for GPU-hours.")
    elif bench.get("reduced"):
        lines.append(f"UNMEASURED: `{bench_path}` is a reduced (CPU smoke) measurement.")
    lines += ["", "| row | runs | steps each | step s | GPU-hours |", "|---|---|---|---|---|"]
    total, unknown = 0.0, False
    for row in row_names(runs):
        rs = [r for r in runs if r["row"] == row]
        st = step_time(bench, rs[0]["method"], rs[0]["dtype"])
        hours = None if st is None else sum(r["steps"] * st * r["devices"] for r in rs) / 3600
        unknown |= hours is None
        total += hours or 0.0
        lines.append(f"| `{row}` | {len(rs)} | {rs[0]['steps']} | "
                     f"{'unmeasured' if st is None else f'{st:.4f}'} | "
                     f"{'unmeasured' if hours is None else f'{hours:.2f}'} |")
    lines.append("")
    if unknown and not total:
        lines.append("Total: unmeasured (no step time measured for these rows).")
    else:
        lines.append(f"Total: {total:.2f} GPU-hours" + (" plus the unmeasured rows" if unknown
                                                        else "")
                     + " (training steps only; evaluation and compilation extra).")
    return "\n".join(lines)
