"""DeML's ablations on Fashion-MNIST (configs/fashion_mnist_demo.py), 3 seeds.

    python -m experiments.sweep --sweep experiments/sweeps/deml_ablation.py \\
        --workdir runs/sweeps/deml_ablation

One change per row from DeML(3,3) (hinge diversity, spatial channel attention,
the object-attention walk's box for branches 2..I): I in {1, 3} x J in {1, 3};
diversity hinge / adversary (§14.1) / none; channel attention spatial (§3.3) /
se; the walk's box vs the whole image to every branch (model.object_attention
False).  Every run also evaluates its untrained control; paired differences
against DeML(3,3) of the same seed.
"""

ABLATIONS = {
    "deml_I3_J3": {},  # the reference: DeML(3,3), hinge, spatial, object attention
    "I1_J3": {"model.num_branches": 1},
    "I3_J1": {"model.num_learners": 1},
    "I1_J1": {"model.num_branches": 1, "model.num_learners": 1},
    "diversity_adversary": {"loss.diversity": "adversary"},
    "diversity_none": {"loss.diversity": "none"},
    "channel_attention_se": {"model.channel_attention": "se"},
    "whole_image": {"model.object_attention": False},
}


def get_sweep():
    return dict(
        name="deml_ablation", seeds=(0, 1, 2), reference="deml_I3_J3",
        overrides={"eval.untrained_control": True},
        rows=[dict(name=n, config="configs/fashion_mnist_demo.py", overrides=o)
              for n, o in ABLATIONS.items()])
