"""One trunk, one embedding layer: the network of ECAML and of CPF on our trunk.

related-methods.md §2.1 (ECAML, ``examples/car/train_confusion.prototxt``):
GoogLeNet ``pool5/7x7_s1`` (1024-d) -> ``fc_embedding`` InnerProduct 1024 -> 512
with bias (Xavier); the unnormalised output is the training embedding, the
L2-normalised one is compared by cosine at test time.  With ``confusion=True``
the model also returns ECAML's confusion branch ``fc_embedding_a``: the same
W, b applied to ``stop_gradient(pool5)`` (``propagate_down: 0``, related-methods.md §2.1).

related-methods.md §4.3 (CPF): the loss needs only (embedding, label) plus learned class proxies;
``num_proxies > 0`` adds the ``[C, d]`` table ``proxies`` (Xavier-uniform, as
``torch.nn.init.xavier_uniform_`` in ``criteria/cpf.py``) as a parameter of
this model, so that it is saved, restored and optimised with everything else.

Parameter tree (the optimiser's lr multipliers match on these paths)::

    trunk/<caffe layer name>/{kernel,bias}   GoogLeNet (or the tiny trunk)
    embed/kernel [F, D], embed/bias [D]      fc_embedding
    proxies [C, D]                           only when num_proxies > 0
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deml_jax.models.attention import caffe_xavier
from deml_jax.models.deml import BACKBONES, l2_normalize
from deml_jax.models.googlenet import GoogLeNet
from deml_jax.models.tiny import TinyNet


class EmbeddingNet(nn.Module):
    """``__call__(images, train=...) -> dict``.

    Output dict:

    * ``embeddings`` ``[B, D]`` float32: ``W pool5 + b``, unnormalised;
    * ``embedding`` ``[B, D]``: the inference embedding, L2-normalised;
    * ``confusion`` ``[B, D]`` (``confusion=True`` only):
      ``stop_gradient(pool5) W + stop_gradient(b)``.  The bias cancels in every
      difference ``z_i - z_j`` the energy-confusion term reads (related-methods.md §2.2 item 6);
      stopping it makes its zero gradient exact rather than a floating-point
      sum of cancelling terms.
    """

    embedding_dim: int = 512
    backbone: str = "bvlc"
    use_bias: bool = True
    confusion: bool = False
    num_proxies: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3:
            raise ValueError(f"images must be [B, S, S, 3], got shape {images.shape}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone == "tiny":
            trunk = TinyNet(dtype=self.dtype, name="trunk")
        else:
            trunk = GoogLeNet(variant=self.backbone, dtype=self.dtype, name="trunk")
        pooled, _ = trunk(images, train=train, stop="pool5")
        pooled = pooled.astype(jnp.float32).reshape(images.shape[0], -1)
        embed = nn.Dense(self.embedding_dim, use_bias=self.use_bias,
                         kernel_init=caffe_xavier, name="embed")
        z = embed(pooled)
        out = {"embeddings": z, "embedding": l2_normalize(z)}
        if self.confusion:
            kernel = embed.variables["params"]["kernel"]
            za = jax.lax.stop_gradient(pooled) @ kernel
            if self.use_bias:
                za = za + jax.lax.stop_gradient(embed.variables["params"]["bias"])
            out["confusion"] = za
        if self.num_proxies:
            self.param("proxies", nn.initializers.xavier_uniform(),
                       (self.num_proxies, self.embedding_dim), jnp.float32)
        return out
