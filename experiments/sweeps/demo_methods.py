"""Every method of the framework on the two CPU demo datasets, 3 seeds each.

    python -m experiments.sweep --sweep experiments/sweeps/demo_methods.py \\
        --workdir runs/sweeps/demo_methods

Rows, on digits (configs/demo_digits*.py) and on Fashion-MNIST
(configs/fashion_mnist_demo.py; prepare it first, README "Fashion-MNIST"):
DeML(3,3); U512 at the same number of steps; U512 at the same wall time as
DeML (its steps = DeML's training time / U512's measured step time, same seed);
ECAML, CPF and ABE-8 at their demo recipes.  Every run also evaluates its
untrained control.  Paired differences: against DeML on the same dataset.
Cost: 36 runs of 600 steps; on 2 CPU cores hours, not minutes.
"""

# U512 (§8) on a demo recipe: one 512-d learner, binomial deviance only.
U512 = {"method": "u512", "model.num_branches": 1, "model.num_learners": 1,
        "model.embedding_dim": 512, "model.channel_attention": "none",
        "loss.diversity": "none", "loss.cost_neg": 25.0, "loss.act_weight": 0.0,
        "loss.row_norm_lambda": 0.0}


def rows_for(prefix, config, method_configs, u512_config, u512_overrides):
    return [
        dict(name=f"{prefix}.deml", config=config),
        dict(name=f"{prefix}.u512_same_steps", config=u512_config, overrides=u512_overrides),
        dict(name=f"{prefix}.u512_same_wall_time", config=u512_config, overrides=u512_overrides,
             wall_time_of=(f"{prefix}.deml", f"{prefix}.u512_same_steps")),
    ] + [dict(name=f"{prefix}.{m}", config=c) for m, c in method_configs]


def get_sweep():
    digits = rows_for("digits", "configs/demo_digits.py",
                      [(m, f"configs/demo_digits_{m}.py") for m in ("ecaml", "cpf", "abe8")],
                      "configs/demo_digits.py", U512)
    fashion = rows_for("fashion", "configs/fashion_mnist_demo.py",
                       [(m, f"configs/fashion_mnist_demo.py:{m}") for m in ("ecaml", "cpf", "abe8")],
                       "configs/fashion_mnist_demo.py:u512", {})
    return dict(name="demo_methods", seeds=(0, 1, 2), rows=digits + fashion,
                reference=["digits.deml", "fashion.deml"],
                overrides={"eval.untrained_control": True})
