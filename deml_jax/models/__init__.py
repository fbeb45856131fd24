"""Models: GoogLeNet trunks, channel attention, DeML and weight import.

Names are imported lazily so that ``import deml_jax.models.googlenet`` does not
pull in the object-attention ops.
"""

import importlib

_EXPORTS = {
    "ABE": "deml_jax.models.abe",
    "DeML": "deml_jax.models.deml",
    "build_model": "deml_jax.models.deml",
    "l2_normalize": "deml_jax.models.deml",
    "GoogLeNet": "deml_jax.models.googlenet",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deml_jax.models' has no attribute {name!r}")
