"""A small convolutional trunk with GoogLeNet's stage interface.

It exposes the stages DeML reads (``inception_4b`` for the channel attention,
``inception_5b`` for the random walk, ``pool5``) with the same
``__call__(x, *, train, start, stop) -> (out, intermediates)`` contract as
:class:`deml_jax.models.googlenet.GoogLeNet`, at strides 4 and 8 instead of 16
and 32: on a 56 px input its ``inception_5b`` map is 7 x 7, like GoogLeNet's
on 227 px.  It makes the CPU demo on digits and the trainer tests run in
minutes; it is not a backbone for benchmark results.

``abe_stage=True`` inserts one stride-1 stage ``inception_4a`` between
``conv2`` and ``inception_4b`` (off by default, so DeML's tiny trunk is
unchanged): ABE's attention trunk needs stages that keep the resolution of
the shared stem, like GoogLeNet's 4a..4e after ``pool3`` (related-methods.md §3.1).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from deml_jax.models.attention import caffe_xavier
from deml_jax.models.googlenet import ConvParams, conv2d

# stage -> (output channels as a multiple of width, stride)
TINY_STAGES = {"conv1": (1, 1), "conv2": (2, 2), "inception_4b": (4, 2),
               "inception_5b": (8, 2), "pool5": (0, 0)}
# ABE's extra stride-1 stage, after 'conv2' (abe_stage=True only).
TINY_ABE_STAGE = ("inception_4a", (4, 1))


def tiny_stages(abe_stage: bool = False) -> dict[str, tuple[int, int]]:
    """Stage -> (channel multiple of width, stride), in execution order."""
    if not abe_stage:
        return dict(TINY_STAGES)
    out = {}
    for name, spec in TINY_STAGES.items():
        out[name] = spec
        if name == "conv2":
            out[TINY_ABE_STAGE[0]] = TINY_ABE_STAGE[1]
    return out


class TinyNet(nn.Module):
    """Four 3x3 conv + ReLU stages (strides 1, 2, 2, 2), then a global mean.

    The convolutions are GoogLeNet's ``conv2d`` (per-backend gradient kernels,
    models/kernels.py): on CPU their kernel gradient is 9 GEMMs, 3.3 x faster
    for ABE-8's demo step than XLA's own (experiments/bench/conv_grad.py).
    Parameters and initial values are those of ``nn.Conv(padding=1)``.
    """

    width: int = 16
    dtype: Any = jnp.float32
    abe_stage: bool = False  # insert the stride-1 'inception_4a' (ABE only)

    @nn.compact
    def __call__(self, x, *, train: bool = False, start: str | None = None,
                 stop: str = "pool5"):
        del train  # no batch statistics
        stages = tiny_stages(self.abe_stage)
        names = list(stages)
        if stop not in names or (start is not None and start not in names):
            raise ValueError(f"start/stop must be in {names}, got {start!r}/{stop!r}")
        first = 0 if start is None else names.index(start) + 1
        inter, h = {}, x.astype(self.dtype)
        for name in names[first:names.index(stop) + 1]:
            mult, stride = stages[name]
            if name == "pool5":
                h = jnp.mean(h, axis=(1, 2))
            else:
                kernel, bias = ConvParams(mult * self.width, 3, kernel_init=caffe_xavier,
                                          name=name)(h.shape[-1])
                h = nn.relu(conv2d(h, kernel, bias, stride=stride, pad=1, dtype=self.dtype))
            inter[name] = h
        return h, inter
