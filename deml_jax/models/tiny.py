"""A small convolutional trunk with GoogLeNet's stage interface.

It exposes the stages DeML reads (``inception_4b`` for the channel attention,
``inception_5b`` for the random walk, ``pool5``) with the same
``__call__(x, *, train, start, stop) -> (out, intermediates)`` contract as
:class:`deml_jax.models.googlenet.GoogLeNet`, at strides 4 and 8 instead of 16
and 32: on a 56 px input its ``inception_5b`` map is 7 x 7, like GoogLeNet's
on 227 px.  It makes the CPU demo on digits and the trainer tests run in
minutes; it is not a backbone for benchmark results.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from deml_jax.models.attention import caffe_xavier

# stage -> (output channels as a multiple of width, stride)
TINY_STAGES = {"conv1": (1, 1), "conv2": (2, 2), "inception_4b": (4, 2),
               "inception_5b": (8, 2), "pool5": (0, 0)}


class TinyNet(nn.Module):
    """Four 3x3 conv + ReLU stages (strides 1, 2, 2, 2), then a global mean."""

    width: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False, start: str | None = None,
                 stop: str = "pool5"):
        del train  # no batch statistics
        names = list(TINY_STAGES)
        if stop not in names or (start is not None and start not in names):
            raise ValueError(f"start/stop must be in {names}, got {start!r}/{stop!r}")
        first = 0 if start is None else names.index(start) + 1
        inter, h = {}, x.astype(self.dtype)
        for name in names[first:names.index(stop) + 1]:
            mult, stride = TINY_STAGES[name]
            if name == "pool5":
                h = jnp.mean(h, axis=(1, 2))
            else:
                h = nn.relu(nn.Conv(mult * self.width, (3, 3), strides=stride, padding=1,
                                    dtype=self.dtype, kernel_init=caffe_xavier, name=name)(h))
            inter[name] = h
        return h, inter
