"""Paper-style table on inshop (experiments/sweeps/paper.py): DeML, adversaries, U512,
ablations, 3 seeds; expected GPU-hours from the measured step time.

    python -m experiments.sweep --sweep experiments/sweeps/paper_inshop.py \\
        --workdir runs/sweeps/paper_inshop [--cost] [--jobs N --devices 0,1,...]
"""

from experiments.sweeps.paper import paper_sweep


def get_sweep():
    return paper_sweep("inshop")
