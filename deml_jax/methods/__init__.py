"""The method layer: ``config.method`` names one method; each is one module.

A :class:`Method` says which model it builds, which objective it trains and
which sub-trees take the converted ImageNet trunk.  The trainer
(deml_jax/train.py) only ever calls ``get_method(config.method)``; it never
tests a method's name.  Adding a method touches only its module (which calls
:func:`register`; the registry finds ``deml_jax/methods/<name>.py`` by itself),
its configs and its tests.

Data flow (unchanged from the DeML trainer): ``model.apply(variables, images,
train=True, **method.model_kwargs(state, config))`` returns a dict; the
outputs named in ``method.batch_axes`` are gathered for the loss scope along
their batch axis; ``method.objective(outputs, labels, params, config, *,
mask=None, key=None) -> (loss, aux)`` with ``loss`` a float32 scalar and
``aux`` a flat dict of scalars.  ``key`` is a per-step PRNG key for objectives
that sample (ECAML's R random partners); others ignore it.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional

def _discover() -> dict[str, str]:
    """Method name -> module: every public module of this package is one method,
    named after its file (``deml_jax/methods/<name>.py``), so adding a method
    touches no list here."""
    import pkgutil

    return {m.name: f"{__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(__path__),
                                                           key=lambda m: m.name)
            if not m.name.startswith("_") and not m.ispkg}


_MODULES = _discover()
_REGISTRY: dict[str, "Method"] = {}


@dataclasses.dataclass(frozen=True)
class Method:
    """What the trainer needs to know about one method.

    Attributes:
      name: the ``config.method`` value.
      build_model: ``config -> flax.linen.Module``; ``apply(variables, images,
        train=...)`` returns a dict with ``embedding`` ``[B, E]`` (inference)
        and, in train mode, whatever ``objective`` reads.
      objective: ``(outputs, labels, params, config, *, mask=None, key=None)
        -> (loss, aux)``.
      load_pretrained: ``(params, batch_stats, converted) -> (params,
        batch_stats)``; ``converted`` is ``weights.load_converted``'s trunk
        dict (``params``, optional ``batch_stats``).
      batch_axes: train output name -> its batch axis (pytrees allowed: every
        leaf is gathered along the same axis); only these reach the objective.
      model_kwargs: optional ``(state, config) -> dict`` of step-dependent
        model inputs (e.g. DeML's ``grl_scale``); they are logged as metrics.
      optim_config: optional ``config -> config.optim``-like ConfigDict with
        the method's extra lr rules (e.g. CPF's proxy learning rate).
      summary: one line for logs and docs.
    """

    name: str
    build_model: Callable[[Any], Any]
    objective: Callable[..., tuple]
    load_pretrained: Callable[[Any, Any, Mapping], tuple]
    batch_axes: Mapping[str, int]
    model_kwargs: Optional[Callable[[Any, Any], dict]] = None
    optim_config: Optional[Callable[[Any], Any]] = None
    summary: str = ""


def register(method: Method) -> Method:
    """Adds ``method`` to the registry (called once by its module at import)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def names() -> tuple[str, ...]:
    """Every method name ``config.method`` may take."""
    return tuple(_MODULES)


def get_method(name: str) -> Method:
    """The registered :class:`Method` called ``name`` (imports its module)."""
    if name not in _MODULES:
        raise ValueError(f"config.method={name!r} is not one of {names()}")
    if name not in _REGISTRY:
        importlib.import_module(_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"module {_MODULES[name]} did not register method {name!r}")
    return _REGISTRY[name]


def optimizer_config(config):
    """``config.optim`` with the method's extra rules (see ``Method.optim_config``)."""
    method = get_method(config.method)
    return method.optim_config(config) if method.optim_config else config.optim


# ----------------------------------------------------------------------------
# Helpers for the methods' config recipes (configs/<dataset>_<method>.py).

def set_run_length(c, steps: int) -> None:
    """``config.total_steps``: the one run-length key (the lr schedule reads it)."""
    c.total_steps = steps


def set_batch(c, classes: int, images_per_class: int, *, loss_groups: int = 1,
              num_devices: int | None = None) -> None:
    """A step of ``loss_groups x (classes x images_per_class)`` images.

    The global batch (``dataset.global_batch_size``) split into
    ``parallel.loss_groups`` groups of whole classes, on any device count.
    """
    c.dataset.images_per_class = images_per_class
    c.dataset.global_batch_size = loss_groups * classes * images_per_class
    c.parallel.loss_groups = loss_groups
    if num_devices is not None:
        c.parallel.num_devices = num_devices
