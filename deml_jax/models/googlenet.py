"""GoogLeNet (Inception v1) trunks in Flax Linen, returning named intermediates.

Two variants share one module:

* ``'bvlc'``: the BVLC Caffe GoogLeNet the released DeML code fine-tunes
  (docs/reference.md §3.2): conv + bias + ReLU, LRN after conv1/pool1 and conv2,
  Caffe ceil-mode max pooling, no BatchNorm, no auxiliary heads.  Parameters are
  named after the Caffe layers with '/' replaced by '_' (``conv1_7x7_s2``,
  ``inception_3a_5x5_reduce``, ...) so that ``weights.bvlc_params_from_caffe`` is
  a plain rename.
* ``'torchvision_bn'``: torchvision's GoogLeNet (conv without bias + BatchNorm
  eps 1e-3 + ReLU), quirks included: the "5x5" branch is a 3x3 conv, ``maxpool4``
  is k2 s2 and the pool branch is a k3 s1 p1 ceil-mode max pool.  Parameter names
  are torchvision's state_dict keys with '.' replaced by '_' (``conv1_conv``,
  ``inception3a_branch2_1_bn``, ``fc``).

Layout: images and feature maps NHWC (CONTRIBUTING.md).  Parameters are float32;
``dtype`` is the compute dtype.  LRN and BatchNorm statistics are computed in
float32 whatever ``dtype`` is.

Speed, all exact:
* an inception block's three 1x1 convs reading the same input (1x1, 3x3_reduce,
  5x5_reduce) run as ONE conv on concatenated kernels (``fuse_1x1``);
* kernels chosen per backend (:mod:`deml_jax.models.kernels`): on CPU
  ('custom') 1x1 convs are matmuls, k>1 convs keep XLA's forward and input
  gradient but compute the kernel gradient as k*k GEMMs
  (``conv_weight_grad_fast``), and max pooling has a slice-based VJP with
  Caffe's first-max routing (XLA:CPU's default versions of these two gradients
  dominated the naive step, experiments/bench/backbone_step.py); on GPU/TPU
  ('native') XLA's own convolution and select-and-scatter gradients.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from deml_jax.models import kernels as kernel_choice

# ---------------------------------------------------------------------------
# Architecture tables.
# ---------------------------------------------------------------------------
VARIANTS = ("bvlc", "torchvision_bn")

# (c1x1, c3x3_reduce, c3x3, c5x5_reduce, c5x5, pool_proj): docs/reference.md §3.2
# table; identical numbers in torchvision's GoogLeNet.
INCEPTION_CFG = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
_INCEPTION_3 = ("inception_3a", "inception_3b")
_INCEPTION_4 = tuple(f"inception_4{c}" for c in "abcde")
_INCEPTION_5 = ("inception_5a", "inception_5b")

STAGES = {
    "bvlc": ("conv1", "pool1", "norm1", "conv2", "norm2", "pool2", *_INCEPTION_3,
             "pool3", *_INCEPTION_4, "pool4", *_INCEPTION_5, "pool5"),
    "torchvision_bn": ("conv1", "pool1", "conv2", "conv3", "pool2", *_INCEPTION_3,
                       "pool3", *_INCEPTION_4, "pool4", *_INCEPTION_5, "pool5",
                       "logits"),
}

# LRN of BVLC norm1/norm2 (§3.2): Caffe divides alpha by local_size.
LRN_SIZE = 5
LRN_ALPHA = 1e-4
LRN_BETA = 0.75
LRN_K = 1.0
BN_EPS = 1e-3          # torchvision BasicConv2d: BatchNorm2d(eps=0.001).
BN_MOMENTUM = 0.1      # torch convention: running = (1-m) * running + m * batch.
DROPOUT_RATE = 0.2     # torchvision GoogLeNet default before fc.
# torchvision transform_input: ImageNet mean/std re-mapping from (x-0.5)/0.5.
_TV_MEAN = (0.485, 0.456, 0.406)
_TV_STD = (0.229, 0.224, 0.225)


def _inception_channels(cfg: Sequence[int]) -> int:
    return cfg[0] + cfg[2] + cfg[4] + cfg[5]


def stage_channels(variant: str) -> dict[str, int]:
    """Output channels of every stage (the last axis of its NHWC output)."""
    out, c = {}, 3
    for name in STAGES[variant]:
        if name.startswith("inception_"):
            c = _inception_channels(INCEPTION_CFG[name[-2:]])
        elif name == "conv1":
            c = 64
        elif name == "conv2":
            c = 192 if variant == "bvlc" else 64
        elif name == "conv3":
            c = 192
        out[name] = c
    return out


def conv_specs(variant: str, num_classes: int | None = None) -> dict[str, tuple]:
    """Every conv of the trunk: ``{param_prefix: (k, in_ch, out_ch)}``.

    For 'bvlc' the prefix is the Caffe layer name with '/' -> '_'; for
    'torchvision_bn' it is the state_dict module path with '.' -> '_' (the conv is
    ``<prefix>_conv``, its BatchNorm ``<prefix>_bn``).
    """
    _check_variant(variant)
    bv = variant == "bvlc"
    specs = {"conv1_7x7_s2" if bv else "conv1": (7, 3, 64)}
    if bv:
        specs.update(conv2_3x3_reduce=(1, 64, 64), conv2_3x3=(3, 64, 192))
    else:
        specs.update(conv2=(1, 64, 64), conv3=(3, 64, 192))
    cin = 192
    for tag, (c1, c3r, c3, c5r, c5, pp) in INCEPTION_CFG.items():
        k5 = 5 if bv else 3  # torchvision's "5x5" branch is a 3x3 conv.
        rows = [(c1, 1, cin), (c3r, 1, cin), (c3, 3, c3r), (c5r, 1, cin),
                (c5, k5, c5r), (pp, 1, cin)]
        for name, (co, k, ci) in zip(_inception_unit_names(variant, tag), rows):
            specs[name] = (k, ci, co)
        cin = _inception_channels((c1, c3r, c3, c5r, c5, pp))
    return specs


def _inception_unit_names(variant: str, tag: str) -> tuple[str, ...]:
    """Names of (1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj) units."""
    if variant == "bvlc":
        return tuple(f"inception_{tag}_{s}" for s in
                     ("1x1", "3x3_reduce", "3x3", "5x5_reduce", "5x5", "pool_proj"))
    p = f"inception{tag}_"
    return (p + "branch1", p + "branch2_0", p + "branch2_1", p + "branch3_0",
            p + "branch3_1", p + "branch4_1")


def _check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


# ---------------------------------------------------------------------------
# Pure array helpers.
# ---------------------------------------------------------------------------
def ceil_pool_padding(size: int, k: int, s: int, p: int = 0) -> tuple[int, int, int]:
    """Caffe ceil-mode pooling geometry along one axis (§3.2).

    Returns ``(out, pad_lo, pad_hi)`` with ``out = ceil((size + 2p - k) / s) + 1``,
    minus one when the last window would start in the right padding (Caffe's
    ``(out - 1) * s >= size + p`` rule, also torch's).  ``pad_hi >= p`` is the
    padding that makes the last (clipped) window fit; it never wins a max.
    """
    if size + 2 * p < k:
        raise ValueError(f"pooling window {k} larger than padded input {size}+2*{p}")
    out = -(-(size + 2 * p - k) // s) + 1
    if p > 0 and (out - 1) * s >= size + p:
        out -= 1
    pad_hi = (out - 1) * s + k - size - p
    return out, p, max(pad_hi, 0)


def _pool_window_slice(xp, i, j, out_h, out_w, s):
    """The (i, j)-th element of every pooling window: xp[:, i::s, j::s] cut to out."""
    b, _, _, c = xp.shape
    return lax.slice(xp, (0, i, j, 0), (b, i + (out_h - 1) * s + 1, j + (out_w - 1) * s + 1, c),
                     (1, s, s, 1))


def max_pool_ceil(x: jax.Array, k: int, s: int, p: int = 0) -> jax.Array:
    """Max pool [B,H,W,C] -> [B,H',W',C], Caffe ceil mode, padding acts as -inf.

    The gradient is the CPU-tuned first-max VJP (:func:`max_pool_ceil_custom`)
    or XLA's select-and-scatter, per :func:`deml_jax.models.kernels.resolve`.
    """
    if kernel_choice.resolve() == "custom":
        return max_pool_ceil_custom(x, k, s, p)
    return _max_pool_raw(x, k, s, p)


def _max_pool_raw(x, k, s, p):
    _, h, w, _ = x.shape
    _, hl, hh = ceil_pool_padding(h, k, s, p)
    _, wl, wh = ceil_pool_padding(w, k, s, p)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, k, k, 1), (1, s, s, 1),
                             ((0, 0), (hl, hh), (wl, wh), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_ceil_custom(x: jax.Array, k: int, s: int, p: int = 0) -> jax.Array:
    """:func:`max_pool_ceil` with the slice-based first-max VJP ('custom' kernels).

    Backward routes each output gradient to the FIRST maximum of its window in
    row-major order, like Caffe's argmax mask (and torch); it is written as k*k
    strided slices and pads because XLA:CPU's select-and-scatter (the default
    gradient of reduce_window) was ~3x slower here (experiments/bench).
    """
    return _max_pool_raw(x, k, s, p)


def _max_pool_fwd(x, k, s, p):
    y = _max_pool_raw(x, k, s, p)
    return y, (x, y)


def _max_pool_bwd(k, s, p, res, dy):
    x, y = res
    _, h, w, _ = x.shape
    oh, hl, hh = ceil_pool_padding(h, k, s, p)
    ow, wl, wh = ceil_pool_padding(w, k, s, p)
    pads = ((0, 0), (hl, hh), (wl, wh), (0, 0))
    xp = jnp.pad(x, pads, constant_values=-jnp.inf)
    ph, pw = xp.shape[1:3]
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, dy.dtype)
    zero = jnp.zeros((), dy.dtype)
    for i in range(k):
        for j in range(k):
            hit = (_pool_window_slice(xp, i, j, oh, ow, s) == y) & ~taken
            taken = taken | hit
            g = jnp.where(hit, dy, zero)
            # Transpose of the strided slice: interior padding puts g back in place.
            dxp = dxp + lax.pad(g, zero, ((0, 0, 0), (i, ph - i - (oh - 1) * s - 1, s - 1),
                                          (j, pw - j - (ow - 1) * s - 1, s - 1), (0, 0, 0)))
    return (dxp[:, hl:hl + h, wl:wl + w, :],)


max_pool_ceil_custom.defvjp(_max_pool_fwd, _max_pool_bwd)


def local_response_norm(x: jax.Array, *, size: int = LRN_SIZE,
                        alpha: float = LRN_ALPHA, beta: float = LRN_BETA,
                        k: float = LRN_K) -> jax.Array:
    """Caffe ACROSS_CHANNELS LRN on NHWC: ``x / (k + alpha/size * sum x^2)^beta``.

    The sum runs over ``size`` channels centred on each channel (zero outside),
    as ``size`` shifted slices of a padded array (one fused elementwise loop,
    cheaper than a conv).  Math in float32 (bf16 squares lose too much); the
    result is cast back to ``x.dtype``.  Defaults: §3.2 norm1/norm2.
    """
    xf = x.astype(jnp.float32)
    sq = jnp.pad(xf * xf, ((0, 0), (0, 0), (0, 0), (size // 2, (size - 1) // 2)))
    c = x.shape[-1]
    window = sum(sq[..., d:d + c] for d in range(size))
    den = k + (alpha / size) * window
    if beta == 0.75:  # d^-0.75 = rsqrt(d * sqrt(d)): avoids exp/log of pow.
        scale = lax.rsqrt(den * jnp.sqrt(den))
    else:
        scale = den ** (-beta)
    return (xf * scale).astype(x.dtype)


def conv2d(x, kernel, bias, *, stride: int = 1, pad: int = 0, dtype=jnp.float32):
    """NHWC x HWIO convolution, output ``floor((H + 2p - k) / s) + 1`` (§3.2).

    With 'custom' kernels (CPU default, :mod:`deml_jax.models.kernels`) 1x1
    stride-1 convs are matmuls (their gradients are matmuls too) and other convs
    use ``conv_weight_grad_fast`` for the kernel gradient; with 'native' kernels
    (GPU/TPU default) every conv is ``lax.conv_general_dilated`` with XLA's
    gradients.
    """
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    k = kernel.shape[0]
    if kernel_choice.resolve() == "native":
        y = _conv_raw(x, kernel, stride, pad)
    elif k == 1 and stride == 1 and pad == 0:
        y = jnp.dot(x, kernel[0, 0])
    else:
        y = _conv(x, kernel, stride, pad)
    return y if bias is None else y + bias.astype(dtype)


def _conv_raw(x, kernel, stride, pad):
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, stride, pad):
    return _conv_raw(x, kernel, stride, pad)


def _conv_fwd(x, kernel, stride, pad):
    return _conv_raw(x, kernel, stride, pad), (x, kernel)


def _conv_bwd(stride, pad, res, dy):
    x, kernel = res
    _, vjp_x = jax.vjp(lambda x_: _conv_raw(x_, kernel, stride, pad), x)
    dx = vjp_x(dy)[0]  # XLA's input gradient is fine; only the kernel one is slow
    return dx, conv_weight_grad_fast(x, dy, kernel.shape[0], stride, pad).astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_weight_grad_fast(x, dy, k: int, stride: int, pad: int) -> jax.Array:
    """dL/dkernel [k,k,Cin,Cout] of an NHWC conv as k*k matmuls over B*H*W.

    XLA:CPU's own kernel gradient of a 3x3 conv was 2-5x slower than these
    GEMMs (experiments/bench).  For tiny Cin (conv1: RGB) an im2col (patches)
    matmul is used instead.  Accumulates in float32.
    """
    b, _, _, cin = x.shape
    _, oh, ow, cout = dy.shape
    dyf = dy.reshape(-1, cout)
    if cin < 8:
        pt = lax.conv_general_dilated_patches(
            x, (k, k), (stride, stride), ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))  # features ordered (Cin, kh, kw)
        g = lax.dot_general(pt.reshape(-1, cin * k * k), dyf, (((0,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
        return g.reshape(cin, k, k, cout).transpose(1, 2, 0, 3)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = [lax.dot_general(_pool_window_slice(xp, i, j, oh, ow, stride).reshape(-1, cin), dyf,
                            (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            for i in range(k) for j in range(k)]
    return jnp.stack(rows).reshape(k, k, cin, cout)


def batch_norm_apply(y, scale, bias, mean, var, *, eps: float = BN_EPS):
    """``(y - mean) / sqrt(var + eps) * scale + bias`` folded to one FMA, f32 coefs."""
    a = scale * lax.rsqrt(var + eps)
    b = bias - mean * a
    return (y.astype(jnp.float32) * a + b).astype(y.dtype)


# ---------------------------------------------------------------------------
# Parameter holders (they only create and return variables; math is above).
# ---------------------------------------------------------------------------
class ConvParams(nn.Module):
    """Holds ``kernel`` [k,k,in,out] (HWIO) and optional ``bias`` [out], float32."""
    features: int
    kernel_size: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

    @nn.compact
    def __call__(self, in_features: int):
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init,
                            (k, k, in_features, self.features), jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
                if self.use_bias else None)
        return kernel, bias


class BatchNormParams(nn.Module):
    """Holds ``scale``/``bias`` params and ``mean``/``var`` batch_stats [features]."""
    features: int

    @nn.compact
    def __call__(self):
        f = self.features
        scale = self.param("scale", nn.initializers.ones, (f,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (f,), jnp.float32)
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((f,), jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((f,), jnp.float32))
        return scale, bias, mean, var


# ---------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------
class GoogLeNet(nn.Module):
    """GoogLeNet trunk; ``__call__`` runs a contiguous range of named stages.

    Attributes:
      variant: 'bvlc' (§3.2, Caffe BVLC GoogLeNet) or 'torchvision_bn'.
      num_classes: torchvision_bn only; adds stage 'logits' (dropout + Dense 'fc').
      dtype: compute dtype (params stay float32; LRN/BN statistics in float32).
      transform_input: torchvision's ImageNet re-normalisation of the input.
    """
    variant: str = "bvlc"
    num_classes: int | None = None
    dtype: Any = jnp.float32
    transform_input: bool = False
    dropout_rate: float = DROPOUT_RATE
    fuse_1x1: bool = True  # run an inception's three 1x1 convs as one (exact; speed)

    def stage_names(self) -> tuple[str, ...]:
        """Stages valid for this configuration, in execution order."""
        _check_variant(self.variant)
        names = STAGES[self.variant]
        return names if self.num_classes else tuple(n for n in names if n != "logits")

    @nn.compact
    def __call__(self, x, *, train: bool = False, start: str | None = None,
                 stop: str = "pool5"):
        """Runs the stages after ``start`` (from the image if None) up to ``stop``.

        Args:
          x: float [B, H, W, 3] image (NHWC, BGR mean-subtracted for 'bvlc') when
            ``start`` is None, else the output of stage ``start`` ([B, h, w, C], or
            [B, 1024] for 'pool5').
          train: BatchNorm uses batch statistics (and updates 'batch_stats', which
            must then be mutable) and dropout is active (needs a 'dropout' rng).
          start: stage whose output ``x`` is; computation resumes after it.
          stop: last stage computed (inclusive).
        Returns:
          ``(out, intermediates)``: ``out`` is the output of ``stop`` in ``dtype``
          ('pool5' gives [B, 1024]); ``intermediates`` maps every stage computed in
          this call to its output.
        """
        names = self.stage_names()
        first, last = self._validate_range(x, names, start, stop)
        if start is None and self.transform_input:
            x = self._transform(x)
        x = x.astype(self.dtype)
        inter = {}
        for name in names[first:last + 1]:
            x = self._stage(name, x, train)
            inter[name] = x
        return x, inter

    def _validate_range(self, x, names, start, stop):
        if stop not in names:
            raise ValueError(f"stop must be one of {names}, got {stop!r}")
        if start is not None and start not in names[:-1]:
            raise ValueError(f"start must be None or one of {names[:-1]}, got {start!r}")
        first = 0 if start is None else names.index(start) + 1
        last = names.index(stop)
        if first > last:
            raise ValueError(f"stop={stop!r} comes before the first stage to run "
                             f"after start={start!r}; order is {names}")
        chans = 3 if start is None else stage_channels(self.variant)[start]
        ndim = 2 if start in ("pool5", "logits") else 4
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != ndim or shape[-1] != chans:
            raise ValueError(f"x must have rank {ndim} with {chans} channels last "
                             f"(output of {start or 'the image'}), got shape {shape}")
        return first, last

    def _transform(self, x):
        """torchvision ``_transform_input``: x*std/0.5 + (mean-0.5)/0.5 per channel."""
        std = jnp.asarray(_TV_STD, jnp.float32) / 0.5
        mean = (jnp.asarray(_TV_MEAN, jnp.float32) - 0.5) / 0.5
        return x * std + mean

    def _stage(self, name, x, train):
        bv = self.variant == "bvlc"
        if name == "conv1":
            return self._units(x, [("conv1_7x7_s2" if bv else "conv1", 64)], 7, 2, 3, train)[0]
        if name == "conv2":
            if bv:  # conv2 = 3x3_reduce + 3x3 (§3.2)
                x = self._units(x, [("conv2_3x3_reduce", 64)], 1, 1, 0, train)[0]
                return self._units(x, [("conv2_3x3", 192)], 3, 1, 1, train)[0]
            return self._units(x, [("conv2", 64)], 1, 1, 0, train)[0]
        if name == "conv3":
            return self._units(x, [("conv3", 192)], 3, 1, 1, train)[0]
        if name in ("norm1", "norm2"):
            return local_response_norm(x)
        if name == "pool4" and not bv:
            return max_pool_ceil(x, 2, 2)  # torchvision quirk: maxpool4 is k2 s2.
        if name.startswith("pool") and name != "pool5":
            return max_pool_ceil(x, 3, 2)
        if name == "pool5":  # §3.2 AVE 7x7 at 227 input == global mean; generalised.
            return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        if name == "logits":
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                            kernel_init=nn.initializers.normal(0.01), name="fc")(x)
        return self._inception(name[-2:], x, train)

    def _inception(self, tag, x, train):
        """[1x1, 3x3, 5x5, pool_proj] concatenated on channels (§3.2)."""
        c1, c3r, c3, c5r, c5, pp = INCEPTION_CFG[tag]
        n1, n3r, n3, n5r, n5, npp = _inception_unit_names(self.variant, tag)
        heads = [(n1, c1), (n3r, c3r), (n5r, c5r)]
        if self.fuse_1x1:
            b1, r3, r5 = self._units(x, heads, 1, 1, 0, train)
        else:
            b1, r3, r5 = (self._units(x, [h], 1, 1, 0, train)[0] for h in heads)
        b3 = self._units(r3, [(n3, c3)], 3, 1, 1, train)[0]
        k5 = 5 if self.variant == "bvlc" else 3
        b5 = self._units(r5, [(n5, c5)], k5, 1, k5 // 2, train)[0]
        bp = self._units(max_pool_ceil(x, 3, 1, 1), [(npp, pp)], 1, 1, 0, train)[0]
        return jnp.concatenate([b1, b3, b5, bp], axis=-1)

    def _units(self, x, named_features, k, stride, pad, train):
        """Conv(+BN)+ReLU units reading the same ``x``, run as one fused conv.

        ``named_features`` lists (unit name, out channels); returns one output per
        unit.  Fusing is exact: output channels of a conv are independent.
        """
        bv = self.variant == "bvlc"
        cin, kernels, biases, bns = x.shape[-1], [], [], []
        for name, feats in named_features:
            if bv:
                kern, bias = ConvParams(feats, k, name=name)(cin)
                biases.append(bias)
            else:
                kern, _ = ConvParams(feats, k, use_bias=False, name=name + "_conv",
                                     kernel_init=_KAIMING_FAN_OUT)(cin)
                bns.append(BatchNormParams(feats, name=name + "_bn")())
            kernels.append(kern)
        kernel = jnp.concatenate(kernels, axis=-1) if len(kernels) > 1 else kernels[0]
        bias = jnp.concatenate(biases) if bv else None
        y = conv2d(x, kernel, bias, stride=stride, pad=pad, dtype=self.dtype)
        if not bv:
            y = self._batch_norm(y, bns, train)
        y = jax.nn.relu(y)
        if len(named_features) == 1:
            return [y]
        cuts, acc = [], 0
        for _, feats in named_features[:-1]:
            acc += feats
            cuts.append(acc)
        return jnp.split(y, cuts, axis=-1)

    def _batch_norm(self, y, bns, train):
        """BatchNorm over the fused channels; batch stats in float32 (torch math)."""
        scale = jnp.concatenate([b[0] for b in bns])
        bias = jnp.concatenate([b[1] for b in bns])
        if not train:
            mean = jnp.concatenate([b[2].value for b in bns])
            var = jnp.concatenate([b[3].value for b in bns])
            return batch_norm_apply(y, scale, bias, mean, var)
        yf = y.astype(jnp.float32)
        mean = jnp.mean(yf, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(yf - mean), axis=(0, 1, 2))
        if not self.is_initializing():
            n = math.prod(y.shape[:3])
            unbiased = lax.stop_gradient(var) * (n / max(n - 1, 1))  # torch's running var
            start = 0
            for _, _, rmean, rvar in bns:
                sl = slice(start, start + rmean.value.shape[0])
                start = sl.stop
                rmean.value = ((1 - BN_MOMENTUM) * rmean.value
                               + BN_MOMENTUM * lax.stop_gradient(mean[sl]))
                rvar.value = (1 - BN_MOMENTUM) * rvar.value + BN_MOMENTUM * unbiased[sl]
        return batch_norm_apply(y, scale, bias, mean, var)


# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu') for convs.
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
