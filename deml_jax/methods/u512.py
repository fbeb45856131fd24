"""U512 (docs/reference.md §8, ``examples/CUB/U512``): one GoogLeNet, one 512-d learner.

The same network as DeML(1, 1, 512) without channel attention and the same
objective with binomial deviance only (configs/common.py ``_make_u512`` sets
the recipe); this module only checks that the config is that shape.
"""

from __future__ import annotations

from deml_jax import methods
from deml_jax.methods import deml


def build_model(config):
    m = config.model
    if (m.num_branches, m.num_learners) != (1, 1):
        raise ValueError("config.method='u512' needs model.num_branches=1 and "
                         f"model.num_learners=1, got {m.num_branches} and {m.num_learners}")
    return deml.build_model(config)


METHOD = methods.register(methods.Method(
    name="u512", build_model=build_model, objective=deml.objective,
    load_pretrained=deml.load_pretrained, batch_axes=deml.BATCH_AXES,
    model_kwargs=deml.model_kwargs,
    summary="U512 baseline: one GoogLeNet, one 512-d embedding, binomial deviance (§8)"))
