"""Paper-style table on cars196 (experiments/sweeps/paper.py): DeML, adversaries, U512,
ablations, 3 seeds; expected GPU-hours from the measured step time.

    python -m experiments.sweep --sweep experiments/sweeps/paper_cars196.py \\
        --workdir runs/sweeps/paper_cars196 [--cost] [--jobs N --devices 0,1,...]
"""

from experiments.sweeps.paper import paper_sweep


def get_sweep():
    return paper_sweep("cars196")
