"""DeML(I, J): hybrid-attention decoupled metric learning (docs/reference.md §0, §3).

I object-attention branches, each a separately parameterised GoogLeNet trunk;
branch 1 sees the image, branch i+1 sees the object-attention zoom of branch
i's input (§3.5).  Inside a branch, J channel-attention learners mask the
``inception_4b`` features, share the upper trunk and the branch's embedding
matrix (§3.3, §3.4).  The U512 baseline (§8) is ``DeML(1, 1, 512,
channel_attention='none')``.

Parameter tree (the optimiser's lr multipliers match on these paths)::

    branch_{i}/trunk/<caffe layer name>/{kernel,bias}   GoogLeNet (§3.2)
    branch_{i}/cam_{j}/{reduce,expand}/{kernel,bias}    CAM (§3.3)
    branch_{i}/embed/kernel                             W_b, [1024, D] (§3.4)
    branch_{i}/adversary/pair_{j}_{k}/...               only for diversity='adversary'
    branch_{i}/adversary_mhn/{fc1,bn1,fc2,bn2}/...      only for diversity='adversary_mhn'
                                                        (+ batch_stats bn{1,2}/{mean,var})
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deml_jax.models.adversary import MHN_HIDDEN, AdversaryMHN, AdversaryRegressors
from deml_jax.models.attention import ChannelAttention, caffe_xavier
from deml_jax.models.googlenet import GoogLeNet
from deml_jax.models.tiny import TinyNet
from deml_jax.ops import object_attention_crop

BACKBONES = ("bvlc", "torchvision_bn", "tiny")

CAM_STAGE = "inception_4b"  # CAM sits after 4b (§3.3)
OAM_STAGE = "inception_5b"  # the random walk reads learner 1's 5b map (§3.5)


def l2_normalize(x, axis=-1):
    """``x / ||x||`` that is finite for a zero vector (the Caffe layer has no eps, §3.6)."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, jnp.finfo(jnp.float32).tiny))


class DeMLBranch(nn.Module):
    """One object-attention branch: trunk, J CAMs, shared embedding (§3.2-§3.4)."""

    num_learners: int
    embedding_dim: int
    backbone: str = "bvlc"  # one of BACKBONES
    channel_attention: str = "spatial"  # 'spatial' | 'se' | 'none'
    cam_hidden: int = 64
    adversary: bool = False
    adversary_hidden: int = 0
    dtype: Any = jnp.float32
    adversary_mhn: bool = False  # related-methods.md §1.3
    adversary_mhn_hidden: int = MHN_HIDDEN

    @nn.compact
    def __call__(self, x, *, train: bool, grl_scale=1.0):
        if self.backbone == "tiny":
            trunk = TinyNet(dtype=self.dtype, name="trunk")
        else:
            trunk = GoogLeNet(variant=self.backbone, dtype=self.dtype, name="trunk")
        batch = x.shape[0]
        h, _ = trunk(x, train=train, stop=CAM_STAGE)
        if self.channel_attention == "none":
            stacked = jnp.tile(h, (self.num_learners, 1, 1, 1))
        else:  # J masked copies stacked along the batch (concat_att, §3.3)
            stacked = jnp.concatenate([
                ChannelAttention(self.channel_attention, self.cam_hidden, self.dtype,
                                 name=f"cam_{j}")(h)[0]
                for j in range(self.num_learners)])
        pooled, feats = trunk(stacked, train=train, start=CAM_STAGE, stop="pool5")
        pooled = pooled.astype(jnp.float32).reshape(self.num_learners, batch, -1)
        embed = nn.Dense(self.embedding_dim, use_bias=False, kernel_init=caffe_xavier,
                         name="embed")  # one W_b shared by the J learners (§3.4)
        out = {
            "embeddings": embed(pooled),  # [J, B, D], unnormalised
            # fc_embedding_a: W_b on learner 1's pooled features, propagate_down 0 (§5.3)
            "act": embed(jax.lax.stop_gradient(pooled[0])),
            "oam_features": feats[OAM_STAGE][:batch],  # learner 1 (§3.5)
        }
        if self.adversary:
            pred, target = AdversaryRegressors(
                self.num_learners, self.embedding_dim, self.adversary_hidden or None,
                name="adversary")(out["embeddings"], grl_scale)
            out["adversary"] = (pred, target)
        if self.adversary_mhn:  # [J, B, H] shared-adversary maps (related-methods.md §1.3 of related-methods.md)
            out["adversary_mhn"] = AdversaryMHN(
                self.num_learners, self.embedding_dim, self.adversary_mhn_hidden,
                name="adversary_mhn")(out["embeddings"], grl_scale, train=train)
        return out


class DeML(nn.Module):
    """The DeML model; ``__call__(images, train=..., grl_scale=...) -> dict``.

    Input: ``[B, S, S, 3]`` BGR mean-subtracted images (CONTRIBUTING.md).
    Output dict:

    * ``embeddings`` ``[I, J, B, D]`` float32 per-learner embeddings (training);
    * ``act`` ``[I, B, D]``: ``W_b stop_grad(p_b1)`` for the activation loss (§5.3);
    * ``embedding`` ``[B, I*J*D]``: the inference embedding, the concatenation of
      the L2-normalised learner embeddings in order b1:j1..jJ, b2:..., (§3.6);
    * ``attention`` ``[I-1, B, h, w]``, ``boxes`` ``[I-1, B, 4]``, ``crops``
      ``[I-1, B, S, S, 3]``: the object-attention chain (absent when I = 1);
    * ``adversary``: ``(pred, target)`` each ``[I, P, B, D]`` when enabled.
    * ``adversary_mhn``: ``[I, J, B, H]`` maps of the shared MHN-form adversary
      when enabled (its BatchNorms need ``mutable=['batch_stats']`` in training).
    """

    num_branches: int = 3
    num_learners: int = 3
    embedding_dim: int = 56
    backbone: str = "bvlc"
    channel_attention: str = "spatial"
    cam_hidden: int = 64
    oam_steps: int = 10
    oam_sigma_ratio: float = 0.15
    oam_method: str = "device"
    oam_converged: bool = False
    # 'uint8': rebuild Caffe's uint8 pixels (mean_bgr added back, §4 step 1);
    # 'float': crop the float images as they are (e.g. ImageNet-normalised RGB).
    oam_pixels: str = "uint8"
    mean_bgr: Sequence[float] = (123.0, 117.0, 104.0)
    adversary: bool = False
    adversary_hidden: int = 0
    dtype: Any = jnp.float32
    adversary_mhn: bool = False
    adversary_mhn_hidden: int = MHN_HIDDEN
    # False: an ablation (not the method): every branch sees the whole image,
    # no random walk, no box, no crop (§3.5 skipped); no attention/boxes/crops out.
    object_attention: bool = True

    def setup(self):
        if self.num_branches < 1 or self.num_learners < 1 or self.embedding_dim < 1:
            raise ValueError(
                "num_branches, num_learners and embedding_dim must be >= 1, got "
                f"{self.num_branches}, {self.num_learners}, {self.embedding_dim}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.channel_attention == "none" and self.num_learners != 1:
            raise ValueError("channel_attention='none' makes identical learners: "
                             f"use num_learners=1, got {self.num_learners}")
        self.branches = [
            DeMLBranch(self.num_learners, self.embedding_dim, self.backbone,
                       self.channel_attention, self.cam_hidden,
                       self.adversary and self.num_learners > 1, self.adversary_hidden,
                       self.dtype, name=f"branch_{i}",
                       adversary_mhn=self.adversary_mhn and self.num_learners > 1,
                       adversary_mhn_hidden=self.adversary_mhn_hidden)
            for i in range(self.num_branches)]

    def __call__(self, images, *, train: bool = False, grl_scale=1.0):
        if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3:
            raise ValueError(f"images must be [B, S, S, 3], got shape {images.shape}")
        x, outs, chain = images, [], []
        for i, branch in enumerate(self.branches):
            out = branch(x, train=train, grl_scale=grl_scale)
            outs.append(out)
            if i + 1 < self.num_branches and self.object_attention:  # zoom (§3.5), no gradient
                oam = object_attention_crop(
                    x, out["oam_features"].astype(jnp.float32), out_size=images.shape[1],
                    num_steps=self.oam_steps, sigma_ratio=self.oam_sigma_ratio,
                    method=self.oam_method, mean_bgr=tuple(self.mean_bgr),
                    converged=self.oam_converged, pixels=self.oam_pixels)
                chain.append(oam)
                x = oam["crops"].astype(images.dtype)
        return self._assemble(outs, chain)

    def _assemble(self, outs, chain):
        embeddings = jnp.stack([o["embeddings"] for o in outs])  # [I, J, B, D]
        i, j, b, d = embeddings.shape
        normed = l2_normalize(embeddings)
        result = {
            "embeddings": embeddings,
            "act": jnp.stack([o["act"] for o in outs]),
            "embedding": jnp.transpose(normed, (2, 0, 1, 3)).reshape(b, i * j * d),
        }
        if chain:
            for key in ("attention", "boxes", "crops"):
                result[key] = jnp.stack([c[key] for c in chain])
        if "adversary" in outs[0]:
            result["adversary"] = tuple(
                jnp.stack([o["adversary"][k] for o in outs]) for k in range(2))
        if "adversary_mhn" in outs[0]:
            result["adversary_mhn"] = jnp.stack([o["adversary_mhn"] for o in outs])
        return result


def build_model(model_config, mean_bgr=(123.0, 117.0, 104.0), diversity="hinge",
                augmentation="caffe", adversary_mhn_hidden=MHN_HIDDEN) -> DeML:
    """Builds :class:`DeML` from ``config.model`` (configs/common.py).

    ``adversary_mhn_hidden`` is ``config.loss.adversary_mhn_hidden``, used only
    for ``diversity='adversary_mhn'``.

    ``augmentation='modern'`` feeds ImageNet-normalised RGB, which has no uint8
    pixels to rebuild: the crops are then taken from the float images.
    """
    m = model_config
    if augmentation != "caffe" and m.oam_method == "host":
        raise ValueError("config.model.oam_method='host' reproduces Caffe's uint8 pixels and "
                         "needs config.dataset.augmentation='caffe'")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if m.dtype not in dtypes:
        raise ValueError(f"config.model.dtype must be one of {sorted(dtypes)}, got {m.dtype!r}")
    return DeML(
        num_branches=m.num_branches, num_learners=m.num_learners,
        embedding_dim=m.embedding_dim, backbone=m.backbone,
        channel_attention=m.channel_attention, cam_hidden=m.cam_hidden,
        oam_steps=m.oam_steps, oam_sigma_ratio=m.oam_sigma_ratio,
        oam_method=m.oam_method, oam_converged=m.oam_converged,
        oam_pixels="uint8" if augmentation == "caffe" else "float", mean_bgr=tuple(mean_bgr),
        adversary=diversity == "adversary", adversary_hidden=m.adversary_hidden,
        dtype=dtypes[m.dtype], adversary_mhn=diversity == "adversary_mhn",
        adversary_mhn_hidden=adversary_mhn_hidden,
        object_attention=bool(m.get("object_attention", True)))
