"""Which gradient kernels the GoogLeNet trunk uses, chosen per backend.

The trunk has two implementations of its convolutions and max pools:

* ``'custom'``: the CPU-tuned versions of :mod:`deml_jax.models.googlenet`
  (1x1 convs as matmuls, the kernel gradient of k>1 convs as k*k GEMMs, a
  slice-based max-pool VJP with Caffe's first-max routing).  XLA:CPU's own
  kernel-gradient and select-and-scatter were 2-5x slower on 2 cores
  (``experiments/bench/backbone_step.py``).
* ``'native'``: ``lax.conv_general_dilated`` and ``lax.reduce_window`` with
  XLA's own gradients, i.e. cuDNN's backward-filter on GPUs and the TPU
  convolution emitters, which is what those chips are built for.

``'auto'`` (default) takes ``'custom'`` on the CPU backend and ``'native'``
everywhere else.  Override with ``config.model.kernels`` (the trainer calls
:func:`set_kernels`) or the environment variable ``DEML_JAX_KERNELS``;
``config.model.kernels`` wins when it is not ``'auto'``.  Both give the same
values and gradients up to float rounding (``tests/models/test_kernels.py``);
max-pool ties are routed to the first maximum by ``'custom'`` (Caffe, torch)
and by XLA's select-and-scatter in ``'native'``.

The choice is read when a function is traced: set it before the first
``jit`` of a model (the trainer does), not between calls of a compiled one.
"""

from __future__ import annotations

import contextlib
import os

import jax

KERNEL_MODES = ("auto", "custom", "native")
ENV_VAR = "DEML_JAX_KERNELS"

_override: str | None = None


def _check(mode: str, where: str) -> str:
    if mode not in KERNEL_MODES:
        raise ValueError(f"{where}={mode!r} is not one of {KERNEL_MODES}")
    return mode


def set_kernels(mode: str) -> None:
    """Process-wide choice (``config.model.kernels``); ``'auto'`` defers to the env/backend."""
    global _override
    _override = None if _check(mode, "config.model.kernels") == "auto" else mode


@contextlib.contextmanager
def use_kernels(mode: str):
    """Temporarily force ``mode`` (tests, benchmarks); trace inside the block."""
    global _override
    saved = _override
    _override = None if _check(mode, "kernels") == "auto" else mode
    try:
        yield
    finally:
        _override = saved


def resolve(backend: str | None = None) -> str:
    """``'custom'`` or ``'native'`` for ``backend`` (default: JAX's default backend)."""
    mode = _override or _check(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)
    if mode != "auto":
        return mode
    return "custom" if (backend or jax.default_backend()) == "cpu" else "native"
