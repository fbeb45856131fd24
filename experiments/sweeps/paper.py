"""The paper-style table of one benchmark on accelerators (helper of paper_*.py).

Rows: DeML(3,3) (the released recipe), the two adversary forms, U512 (§8), and
DeML's ablations (I = 1, J = 1, no diversity, SE channel attention, whole image
to every branch), 3 seeds, each with its untrained control.  The expected
cost in GPU-hours is steps x the step time measured by
experiments/bench/accelerator.py (its JSON at runs/bench/accelerator/accelerator.json,
or --bench PATH); without that measurement the cost is reported as unmeasured:

    python -m experiments.sweep --sweep experiments/sweeps/paper_cub200.py \\
        --workdir runs/sweeps/paper_cub200 --cost          # the cost only
    python -m experiments.sweep --sweep experiments/sweeps/paper_cub200.py \\
        --workdir runs/sweeps/paper_cub200 --jobs 4 --devices 0,1,2,3
"""

ABLATIONS = {
    "deml_I1_J3": {"model.num_branches": 1},
    "deml_I3_J1": {"model.num_learners": 1},
    "deml_no_diversity": {"loss.diversity": "none"},
    "deml_se": {"model.channel_attention": "se"},
    "deml_whole_image": {"model.object_attention": False},
}


def paper_sweep(benchmark: str) -> dict:
    # bench_method: the accelerator benchmark's row that prices the run (the
    # ablations of DeML are priced as DeML(3,3): an upper bound).
    rows = [
        dict(name="deml", config=f"configs/{benchmark}_deml.py", bench_method="deml"),
        dict(name="deml_adversary", config=f"configs/{benchmark}_deml_adversary.py",
             bench_method="deml_adversary_mhn"),
        dict(name="deml_adversary_mhn", config=f"configs/{benchmark}_deml_adversary_mhn.py",
             bench_method="deml_adversary_mhn"),
        dict(name="u512", config=f"configs/{benchmark}_u512.py", bench_method="u512"),
    ] + [dict(name=n, config=f"configs/{benchmark}_deml.py", overrides=o, bench_method="deml")
         for n, o in ABLATIONS.items()]
    return dict(name=f"paper_{benchmark}", seeds=(0, 1, 2), rows=rows, reference="deml",
                overrides={"eval.untrained_control": True}, cost=True)
