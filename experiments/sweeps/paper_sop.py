"""Paper-style table on sop (experiments/sweeps/paper.py): DeML, adversaries, U512,
ablations, 3 seeds; expected GPU-hours from the measured step time.

    python -m experiments.sweep --sweep experiments/sweeps/paper_sop.py \\
        --workdir runs/sweeps/paper_sop [--cost] [--jobs N --devices 0,1,...]
"""

from experiments.sweeps.paper import paper_sweep


def get_sweep():
    return paper_sweep("sop")
