"""Sweep runner: configs x overrides x seeds, resumable, one table at the end.

    python -m experiments.sweep --sweep experiments/sweeps/<name>.py --workdir runs/sweeps/<name>
        [--jobs N --devices 0,1,2,3] [--only ROW,...] [--report] [--cost [--bench JSON]]

A sweep file defines ``get_sweep() -> dict`` with
  rows: [{"name", "config" ("configs/x.py[:args]"), "overrides" {dotted key: value},
          optional "wall_time_of": (reference_row, probe_row)}, ...]
  seeds: (0, 1, 2); reference: a row name, or a list of them (paired
  differences; each against the rows of its prefix up to the first '.'); optional
  overrides: applied to every row (a row's own overrides win).
``wall_time_of=(R, P)`` runs the row for ``round(train_s(R) / step_s(P))``
steps of the same seed ("at the same wall time"): train_s = R's steps x its
median step time, step_s = P's median step time; resolved once and kept in
the run's ``sweep_run.json``.

Each run is ``python -m deml_jax.main --config C --workdir W/<row>/seed<k>
--config.seed=k --config.<key>=<value>...`` in a subprocess (its output in the
run's ``sweep_log.txt``).  A run is finished when its ``results.json`` exists;
rerunning the sweep skips finished runs and resumes interrupted ones from their
checkpoints (the trainer's own resume).  A run whose workdir is locked by a
live process (deml_jax/workdir.py) is reported and left alone.  Then
``results.csv`` (one row per run: config, overrides, seed, every metric of the
last test evaluation and of the untrained control, steps, wall time, train
time, images/s), ``results.md`` (experiments/sweep_report.py) and the pictures
``recall_at_k.png`` and ``curves.png`` are written in the sweep workdir.
``--jobs N`` runs N runs at once; with ``--devices 0,1,...`` each job slot gets
``CUDA_VISIBLE_DEVICES`` set to one of them (one accelerator per run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import queue
import statistics
import subprocess
import sys
import time

from experiments import sweep_report

RUN_FILE = "sweep_run.json"
RESULTS = "results.json"


def load_sweep(path: str) -> dict:
    """The sweep file's ``get_sweep()``, checked; errors name the file and the key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sweep file {path!r} not found")
    spec = importlib.util.spec_from_file_location("_sweep_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_sweep"):
        raise ValueError(f"{path}: defines no get_sweep()")
    sweep = dict(mod.get_sweep())
    for key in ("rows", "seeds"):
        if not sweep.get(key):
            raise ValueError(f"{path}: get_sweep() needs a non-empty {key!r}")
    names = [r.get("name") for r in sweep["rows"]]
    for r in sweep["rows"]:
        if not r.get("name") or not r.get("config") or "/" in r["name"]:
            raise ValueError(f"{path}: every row needs a 'name' (no '/') and a 'config'; got {r}")
        for dep in r.get("wall_time_of") or ():
            if dep not in names:
                raise ValueError(f"{path}: row {r['name']!r} wall_time_of names unknown row {dep!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate row names in {names}")
    refs = sweep.get("reference") or ()
    for ref in ([refs] if isinstance(refs, str) else refs):
        if ref not in names:
            raise ValueError(f"{path}: reference {ref!r} is not a row name ({names})")
    sweep.setdefault("name", os.path.basename(path)[:-3])
    return sweep


def flag_value(v) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(flag_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return str(v)


def run_dir(workdir: str, row: str, seed: int) -> str:
    return os.path.join(workdir, row, f"seed{seed}")


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def read_metrics(rdir: str) -> list[dict]:
    """metrics.jsonl rows (a torn last line, from a kill, is skipped)."""
    rows = []
    try:
        with open(os.path.join(rdir, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return rows


def finished(rdir: str) -> bool:
    return os.path.isfile(os.path.join(rdir, RESULTS))


def timing(rdir: str) -> dict:
    """steps, median step time, train time and images/s of a run (metrics.jsonl +
    the saved config's global batch). The first step (compilation) is left out."""
    rows = [r for r in read_metrics(rdir) if r.get("train/images_per_s")]
    cfg = (read_json(os.path.join(rdir, "config.json")) or {}).get("config", {})
    batch = (cfg.get("dataset") or {}).get("global_batch_size")
    steps = max((int(r["step"]) for r in rows), default=0)
    ips = [r["train/images_per_s"] for r in rows if int(r["step"]) > 1] or \
        [r["train/images_per_s"] for r in rows]
    if not ips or not batch:
        return {"steps": steps, "images_per_s": None, "step_s": None, "train_s": None}
    med = statistics.median(ips)
    return {"steps": steps, "images_per_s": med, "step_s": batch / med,
            "train_s": steps * batch / med}


def resolve_overrides(sweep: dict, row: dict, seed: int, workdir: str) -> dict | None:
    """The run's overrides (sweep-wide, then the row's, then wall-time matching);
    None when a wall-time reference run is not finished yet."""
    rdir = run_dir(workdir, row["name"], seed)
    saved = read_json(os.path.join(rdir, RUN_FILE))
    if saved and "overrides" in saved:
        return saved["overrides"]
    over = dict(sweep.get("overrides") or {})
    over.update(row.get("overrides") or {})
    if row.get("wall_time_of"):
        ref, probe = row["wall_time_of"]
        a, b = (timing(run_dir(workdir, n, seed)) for n in (ref, probe))
        if not (finished(run_dir(workdir, ref, seed)) and finished(run_dir(workdir, probe, seed))
                and a["train_s"] and b["step_s"]):
            return None
        over["total_steps"] = max(1, round(a["train_s"] / b["step_s"]))
    return over


def command(row: dict, seed: int, overrides: dict, rdir: str) -> list[str]:
    cmd = [sys.executable, "-m", "deml_jax.main", "--config", row["config"],
           "--workdir", rdir, f"--config.seed={seed}"]
    return cmd + [f"--config.{k}={flag_value(v)}" for k, v in overrides.items()]


def run_one(row: dict, seed: int, overrides: dict, rdir: str, device: str | None) -> int:
    """One run in a subprocess (same process group: killing the runner's group kills it)."""
    os.makedirs(rdir, exist_ok=True)
    state = read_json(os.path.join(rdir, RUN_FILE)) or {
        "row": row["name"], "config": row["config"], "seed": seed, "overrides": overrides,
        "attempts": []}
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    attempt = {"start": time.time(), "device": device}
    state["attempts"].append(attempt)
    write_json(os.path.join(rdir, RUN_FILE), state)
    tic = time.perf_counter()
    with open(os.path.join(rdir, "sweep_log.txt"), "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(command(row, seed, overrides, rdir))}\n")
        log.flush()
        rc = subprocess.call(command(row, seed, overrides, rdir), stdout=log,
                             stderr=subprocess.STDOUT, env=env)
    attempt.update(wall_s=time.perf_counter() - tic, rc=rc)
    write_json(os.path.join(rdir, RUN_FILE), state)
    return rc


def execute(sweep: dict, workdir: str, *, jobs: int = 1, devices=(), only=()) -> list[str]:
    """Runs every unfinished run (in row order; wall-time rows once their references
    are done). Returns the failures as 'row/seedK: why'."""
    todo = [(r, s) for r in sweep["rows"] for s in sweep["seeds"]
            if (not only or r["name"] in only)
            and not finished(run_dir(workdir, r["name"], s))]
    failures = []
    slots: queue.Queue = queue.Queue()
    for d in (list(devices) or [None] * max(1, jobs)):
        slots.put(d)

    def work(row, seed, overrides):
        device = slots.get()
        try:
            rdir = run_dir(workdir, row["name"], seed)
            print(f"[sweep] {row['name']} seed {seed}: running"
                  + (f" on device {device}" if device is not None else ""), flush=True)
            rc = run_one(row, seed, overrides, rdir, device)
            if rc or not finished(rdir):
                tail = open(os.path.join(rdir, "sweep_log.txt"), encoding="utf-8").read()[-600:]
                return f"{row['name']}/seed{seed}: exit {rc} (see {rdir}/sweep_log.txt):\n{tail}"
            print(f"[sweep] {row['name']} seed {seed}: done", flush=True)
            return None
        finally:
            slots.put(device)

    n_workers = max(1, len(devices) or jobs)
    with concurrent.futures.ThreadPoolExecutor(n_workers) as pool:
        while todo:
            wave, later = [], []
            for row, seed in todo:
                over = resolve_overrides(sweep, row, seed, workdir)
                (later if over is None else wave).append((row, seed, over))
            if not wave:
                for row, seed, _ in later:
                    failures.append(f"{row['name']}/seed{seed}: its wall_time_of runs "
                                    f"{row['wall_time_of']} did not finish")
                break
            for msg in pool.map(lambda a: work(*a), wave):
                if msg:
                    failures.append(msg)
            todo = [(r, s) for r, s, _ in later]
    return failures


def collect(sweep: dict, workdir: str) -> tuple[list[dict], dict]:
    """results.csv rows of the finished runs and the curves per row."""
    rows, curves = [], {}
    for r in sweep["rows"]:
        for seed in sweep["seeds"]:
            rdir = run_dir(workdir, r["name"], seed)
            res = read_json(os.path.join(rdir, RESULTS))
            if not res:
                continue
            state = read_json(os.path.join(rdir, RUN_FILE)) or {}
            t = timing(rdir)
            out = {"row": r["name"], "config": r["config"],
                   "overrides": json.dumps(state.get("overrides", {}), sort_keys=True),
                   "seed": seed, "steps": res.get("step", t["steps"]),
                   "wall_s": sum(a.get("wall_s", 0.0) for a in state.get("attempts", [])),
                   "train_s": t["train_s"], "images_per_s": t["images_per_s"]}
            for prefix, block in (("test/", res.get("test")),
                                  ("untrained/", (res.get("untrained_control") or {}).get("test")),
                                  ("best_on_val/", (res.get("best_on_val") or {}).get("test"))):
                for k, v in (block or {}).items():
                    out[prefix + k] = v
            rows.append(out)
            c = sweep_report.run_curves(read_metrics(rdir))
            dst = curves.setdefault(r["name"], {"loss": {}, "r1": {}})
            for key in ("loss", "r1"):
                for step, v in c[key].items():
                    dst[key].setdefault(step, []).append(v)
    return rows, curves


def planned_runs(sweep: dict) -> list[dict]:
    """Per run: row, seed, steps, method, dtype, devices (from the resolved config).

    A ``wall_time_of`` row is costed at its config's own total_steps (its real
    length is decided at run time)."""
    out = []
    for r in sweep["rows"]:
        over = dict(sweep.get("overrides") or {})
        over.update(r.get("overrides") or {})
        c = _load_config(r["config"])
        c.update_from_flattened_dict(over)
        for seed in sweep["seeds"]:
            out.append({"row": r["name"], "seed": seed, "steps": int(c.total_steps),
                        "method": r.get("bench_method", c.method), "dtype": c.model.dtype,
                        "devices": max(1, int(c.parallel.num_devices or 1))})
    return out


def _load_config(spec: str):
    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("_cfg", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg or None)


def report(sweep: dict, workdir: str, *, cost: str = "") -> list[str]:
    rows, curves = collect(sweep, workdir)
    os.makedirs(workdir, exist_ok=True)
    sweep_report.write_csv(os.path.join(workdir, "results.csv"), rows)
    md = sweep_report.markdown(rows, name=sweep["name"], reference=sweep.get("reference"),
                               expected_runs=len(sweep["rows"]) * len(sweep["seeds"]), cost=cost)
    with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    paths = [os.path.join(workdir, "results.csv"), os.path.join(workdir, "results.md")]
    if rows:
        paths += sweep_report.pictures(rows, curves, workdir)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", required=True, help="experiments/sweeps/<name>.py")
    p.add_argument("--workdir", required=True, help="runs/sweeps/<name>")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--devices", default="", help="e.g. 0,1,2,3: one accelerator per job")
    p.add_argument("--only", default="", help="comma-separated row names to run")
    p.add_argument("--report", action="store_true", help="only (re)write the report")
    p.add_argument("--cost", action="store_true", help="add the expected accelerator cost")
    p.add_argument("--bench", default=None, help=f"accelerator JSON ({sweep_report.DEFAULT_BENCH})")
    args = p.parse_args(argv)
    sweep = load_sweep(args.sweep)
    cost = ""
    if args.cost or sweep.get("cost"):
        bench_path = args.bench or sweep_report.DEFAULT_BENCH
        cost = sweep_report.cost_table(planned_runs(sweep), sweep_report.load_bench(bench_path),
                                       bench_path)
        print(cost)
    failures = []
    if not args.report and not args.cost:
        failures = execute(sweep, args.workdir, jobs=args.jobs,
                           devices=[d for d in args.devices.split(",") if d],
                           only=[o for o in args.only.split(",") if o])
    for path in report(sweep, args.workdir, cost=cost):
        print(f"[sweep] wrote {path}")
    for msg in failures:
        print(f"[sweep] FAILED {msg}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
