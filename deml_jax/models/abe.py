"""ABE-M: attention-based ensemble (Kim et al., ECCV 2018; related-methods.md §3).

Learner m computes ``f_m(x) = W G(S(x) * A_m(T(S(x))))`` (related-methods.md §3.1):

* ``S``: the shared stem, GoogLeNet ``conv1 .. inception_3b, pool3``
  (480 x 14 x 14 at 227 px);
* ``T``: the attention trunk, a *separate* trainable copy of ``inception_4a ..
  4e`` (832 x 14 x 14), initialised from the same pretrained weights as the
  main trunk's 4a..4e (HORDE's form, related-methods.md §3.1);
* ``A_m``: per learner, a 1x1 convolution 832 -> 480 with bias and a sigmoid:
  a mask in (0, 1) over positions and channels of ``S(x)``;
* ``G``: the rest of the main trunk, shared by the learners (``inception_4a ..
  5b``, ``pool4``, global average pool -> 1024);
* ``W``: one embedding layer shared by the learners, Dense 1024 -> 512/M
  without bias.

The M masked copies of ``S(x)`` are stacked along the batch axis, learner
major, so that ``G`` runs once on ``M * B`` images (related-methods.md §3.1 "fold the M learners
into the batch axis").  The inference embedding is the concatenation
``[f_1/|f_1|; ..; f_M/|f_M|]`` (norm sqrt(M)).

Backbones: 'bvlc' and 'torchvision_bn' split GoogLeNet at ``pool3`` / after
``inception_4e``; 'tiny' (CPU tests and demo) uses ``TinyNet(abe_stage=True)``,
stem up to ``conv2`` and a copy of its stride-1 ``inception_4a`` as attention
trunk (same geometry: the attention trunk keeps the stem's resolution).

Parameter tree (the optimiser's lr multiplier rules match these paths)::

    trunk/<layer>/{kernel,bias}            S and G: one GoogLeNet (lr x1 / x2)
    attention_trunk/<layer>/{kernel,bias}  T: only the 4a..4e layers (lr x1 / x2)
    cam_{m}/{kernel,bias}                  A_m, [1, 1, 832, 480] (lr x10 / x20,
                                           the rules of DeML's CAMs)
    embed/kernel                           W, [1024, 512/M] (lr x10)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from deml_jax.models.attention import caffe_xavier
from deml_jax.models.deml import BACKBONES, l2_normalize
from deml_jax.models.googlenet import GoogLeNet
from deml_jax.models.tiny import TinyNet

# backbone -> (last stage of the stem S, last stage of the attention trunk T)
ABE_SPLITS = {
    "bvlc": ("pool3", "inception_4e"),
    "torchvision_bn": ("pool3", "inception_4e"),
    "tiny": ("conv2", "inception_4a"),
}


def make_trunk(backbone: str, dtype: Any, name: str) -> nn.Module:
    """The GoogLeNet (or tiny) trunk ABE splits (stage interface of googlenet.py)."""
    if backbone not in BACKBONES:
        raise ValueError(f"config.model.backbone must be one of {BACKBONES}, got {backbone!r}")
    if backbone == "tiny":
        return TinyNet(dtype=dtype, abe_stage=True, name=name)
    return GoogLeNet(variant=backbone, dtype=dtype, name=name)


class ABE(nn.Module):
    """ABE-M; ``__call__(images, train=..., return_masks=False) -> dict``.

    Input: ``[B, S, S, 3]`` images (CONTRIBUTING.md).  Output dict:

    * ``embeddings`` ``[M, B, D]`` float32 unnormalised learner embeddings
      (learner major, like DeML's ``[I, J, B, D]`` with I = 1);
    * ``embedding`` ``[B, M*D]``: concatenation of the L2-normalised learner
      embeddings, learner 1 first;
    * ``masks`` ``[M, B, h, w, C]`` (only with ``return_masks=True``): the
      sigmoid attention masks A_m (C = 480, h = w = 14 for GoogLeNet at 227 px).
    """

    num_learners: int = 8
    embedding_dim: int = 64  # per learner: 512 // M for ABE-M (related-methods.md §3.1)
    backbone: str = "bvlc"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool = False, return_masks: bool = False):
        if self.num_learners < 1 or self.embedding_dim < 1:
            raise ValueError("config.model.num_learners and config.model.embedding_dim must "
                             f"be >= 1, got {self.num_learners} and {self.embedding_dim}")
        if images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"images must be [B, S, S, 3], got shape {images.shape}")
        if self.backbone not in ABE_SPLITS:
            raise ValueError(f"config.model.backbone must be one of {sorted(ABE_SPLITS)} "
                             f"for method 'abe', got {self.backbone!r}")
        stem_stop, att_stop = ABE_SPLITS[self.backbone]
        trunk = make_trunk(self.backbone, self.dtype, "trunk")
        attention_trunk = make_trunk(self.backbone, self.dtype, "attention_trunk")
        batch, m = images.shape[0], self.num_learners
        s, _ = trunk(images, train=train, stop=stem_stop)  # S(x), shared (related-methods.md §3.1)
        t, _ = attention_trunk(s, train=train, start=stem_stop, stop=att_stop)  # T(S(x))
        channels = s.shape[-1]
        masks = jnp.stack([
            nn.sigmoid(nn.Conv(channels, (1, 1), dtype=self.dtype, kernel_init=caffe_xavier,
                               name=f"cam_{j}")(t))
            for j in range(m)])  # [M, B, h, w, C], A_m (related-methods.md §3.1)
        # learner-major fold: row j * B + b is learner j on image b
        stacked = (masks * s[None]).reshape((m * batch,) + s.shape[1:])
        pooled, _ = trunk(stacked, train=train, start=stem_stop, stop="pool5")  # G, one call
        pooled = pooled.astype(jnp.float32).reshape(m, batch, -1)
        embeddings = nn.Dense(self.embedding_dim, use_bias=False, kernel_init=caffe_xavier,
                              name="embed")(pooled)  # W shared by the learners (related-methods.md §3.1)
        normed = l2_normalize(embeddings)
        out = {
            "embeddings": embeddings,
            "embedding": jnp.transpose(normed, (1, 0, 2)).reshape(batch, m * self.embedding_dim),
        }
        if return_masks:
            out["masks"] = masks
        return out


def build_abe(model_config) -> ABE:
    """:class:`ABE` from ``config.model`` (num_learners, embedding_dim, backbone, dtype)."""
    m = model_config
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if m.dtype not in dtypes:
        raise ValueError(f"config.model.dtype must be one of {sorted(dtypes)}, got {m.dtype!r}")
    if m.backbone not in ABE_SPLITS:
        raise ValueError(f"config.model.backbone must be one of {sorted(ABE_SPLITS)} for "
                         f"method 'abe', got {m.backbone!r}")
    for key in ("num_learners", "embedding_dim"):
        value = m[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.model.{key} must be an int >= 1 for method 'abe', "
                             f"got {value!r}")
    return ABE(num_learners=m.num_learners, embedding_dim=m.embedding_dim,
               backbone=m.backbone, dtype=dtypes[m.dtype])
