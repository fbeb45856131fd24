"""Demo: Fashion-MNIST zero-shot retrieval on 2 CPU cores (the digits demos' recipes).

Trains on the seen classes (default T-shirt/top, Trouser, Pullover, Dress, Coat:
the official training images), evaluates Recall@K {1, 2, 4, 8}, NMI and F1 on
the unseen classes' official test images (5 x 1,000), prints the table with the
untrained control (the same network at its initialisation) beside it.

Prepare once (the four official idx files; never downloaded; Debian's
`dataset-fashion-mnist` package installs them):
  python -m deml_jax.data.prepare --dataset fashion_mnist --manual_dir DIR --data_dir data/tfds
Command:  python -m deml_jax.main --config configs/fashion_mnist_demo.py --workdir runs/fashion_mnist
Args:     one method of deml (default), u512, ecaml, cpf, abe8; and runlocal
          (comma separated; any other argument is an error). The method's
          recipe is its digits demo config's (configs/demo_digits*.py) with the
          dataset swapped; 'u512' is the single-learner baseline of §8 (I=1,
          J=1, 512-d, no CAM, binomial loss only, cost_neg 25) in that recipe;
          ':runlocal' is a 3-step smoke run.
Hardware: 2 CPU cores; one device.
Expected: no published figure (our benchmark); see experiments/sweeps/demo_methods.py.
"""

import importlib

from configs import common

METHOD_ARGS = ("deml", "u512", "ecaml", "cpf", "abe8")
ARGS = METHOD_ARGS + ("runlocal",)  # the docstring's Args: line
_BASE = {"deml": "demo_digits", "u512": "demo_digits", "ecaml": "demo_digits_ecaml",
         "cpf": "demo_digits_cpf", "abe8": "demo_digits_abe8"}


def make_u512(c) -> None:
    """§8's U512 on a demo recipe: one 512-d learner, binomial deviance only."""
    c.method = "u512"
    c.model.update(num_branches=1, num_learners=1, embedding_dim=512, channel_attention="none")
    c.loss.update(diversity="none", cost_neg=25.0, act_weight=0.0, row_norm_lambda=0.0)


def get_config(arg=None):
    args = common.parse_args(arg, ARGS)
    chosen = sorted(args & set(METHOD_ARGS)) or ["deml"]
    if len(chosen) > 1:
        raise ValueError(f"configs/fashion_mnist_demo.py takes one method of {METHOD_ARGS}; "
                         f"got {chosen} in {arg!r}")
    method = chosen[0]
    base = importlib.import_module(f"configs.{_BASE[method]}")
    c = base.get_config("runlocal" if "runlocal" in args else None)
    if method == "u512":
        make_u512(c)
    common.set_dataset(c, "fashion_mnist")
    c.eval.untrained_control = True
    return c
