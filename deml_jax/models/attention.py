"""Channel-attention modules (CAM) of DeML (docs/reference.md §3.3).

Two forms, chosen by ``config.model.channel_attention``:

* ``'spatial'`` (default, the released code): two 1x1 convolutions
  ``C -> hidden -> C`` with ReLU and sigmoid give a mask that varies per
  position *and* per channel; the 4b features are multiplied by it.  The paper
  calls it channel attention, the prototxt has no pooling (§3.3, §11.3 item 2).
* ``'se'``: squeeze-and-excitation style, global average pool -> FC -> ReLU ->
  FC -> sigmoid, one weight per channel (the reading of the paper's wording).

Both use Caffe's Xavier fill (uniform +-sqrt(3 / fan_in), §3.3) and zero biases.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# Caffe "xavier" filler: Uniform(+-sqrt(3 / fan_in)) (§3.3 "Init").
caffe_xavier = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

CHANNEL_ATTENTION_KINDS = ("spatial", "se")


class ChannelAttention(nn.Module):
    """One learner's attention mask, applied to ``h`` ``[B, H, W, C]``.

    Returns ``(mask * h, mask)``; the mask is ``[B, H, W, C]`` (spatial) or
    ``[B, 1, 1, C]`` (se).  Gradients flow into both the mask and ``h``
    (Eltwise PROD backward, §3.3).
    """

    kind: str = "spatial"
    hidden: int = 64  # §3.3: 512 -> 64 -> 512
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        if self.kind not in CHANNEL_ATTENTION_KINDS:
            raise ValueError(
                f"channel_attention must be one of {CHANNEL_ATTENTION_KINDS}, got {self.kind!r}")
        channels = h.shape[-1]
        if self.kind == "spatial":
            z = nn.Conv(self.hidden, (1, 1), dtype=self.dtype, kernel_init=caffe_xavier,
                        name="reduce")(h)
            z = nn.Conv(channels, (1, 1), dtype=self.dtype, kernel_init=caffe_xavier,
                        name="expand")(nn.relu(z))
        else:
            z = jnp.mean(h, axis=(1, 2), keepdims=True)
            z = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=caffe_xavier,
                         name="reduce")(z)
            z = nn.Dense(channels, dtype=self.dtype, kernel_init=caffe_xavier,
                         name="expand")(nn.relu(z))
        mask = nn.sigmoid(z)
        return mask * h, mask
