"""A 3x3 'same' convolution whose kernel gradient is nine matrix products.

XLA's CPU backend lowers the kernel gradient of a convolution (the
"backward-filter" convolution, which contracts over batch and positions) to
a slow path: for the small trunk's stride-1 stage of ABE (160 x 28 x 28 x 32 ->
64) it took 1.1 s against 0.03 s for the forward pass on 2 cores (JAX 0.10.2).
:func:`conv3x3` keeps XLA's convolution for the forward pass and for the input
gradient (both fast) and writes the kernel gradient as what it is, for each of
the nine taps ``(i, j)``::

    dK[i, j] = X_ij^T dY,    X_ij = pad(X)[:, i::s, j::s, :] as [B*H'*W', Cin]

one ``[Cin, B*H'*W'] x [B*H'*W', Cout]`` product per tap, which CPUs run at
matrix-product speed.  The value is the same function (the forward pass is the
same XLA convolution); gradients agree with autodiff of ``lax.conv`` to float32
rounding (tests/ops/test_conv.py checks both against NumPy loops).  Measured
with ``experiments/bench/conv_grad.py``; used by the small trunk
(models/tiny.py), the CPU demos' backbone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_DIMS = ("NHWC", "HWIO", "NHWC")


def _forward(x, kernel, stride: int):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3(x, kernel, stride):
    return _forward(x, kernel, stride)


def _conv3x3_fwd(x, kernel, stride):
    return _forward(x, kernel, stride), (x, kernel)


def _conv3x3_bwd(stride, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda v: _forward(v, kernel, stride), x)
    (dx,) = input_vjp(dy)
    kh, kw, cin, cout = kernel.shape
    out_h, out_w = dy.shape[1], dy.shape[2]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dy_rows = dy.reshape(-1, cout)
    taps = []
    for i in range(kh):
        for j in range(kw):
            tap = padded[:, i:i + stride * (out_h - 1) + 1:stride,
                         j:j + stride * (out_w - 1) + 1:stride, :]
            taps.append(jnp.matmul(tap.reshape(-1, cin).T, dy_rows,
                                   preferred_element_type=jnp.float32))
    dk = jnp.stack(taps).reshape(kh, kw, cin, cout)
    return dx, dk.astype(kernel.dtype)


_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv3x3(x, kernel, stride: int = 1):
    """``[B, H, W, Cin]`` conv ``[3, 3, Cin, Cout]`` (padding 1, ``stride``) -> ``[B, H', W', Cout]``.

    ``H' = (H - 1) // stride + 1``, as ``flax.linen.Conv(..., padding=1)``.
    Differentiable in ``x`` and ``kernel`` (reverse mode only: a custom VJP).
    """
    if x.ndim != 4:
        raise ValueError(f"conv3x3: x must be [B, H, W, Cin], got shape {x.shape}")
    if kernel.shape[:2] != (3, 3) or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"conv3x3: kernel must be [3, 3, {x.shape[3]}, Cout], "
                         f"got shape {kernel.shape}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"conv3x3: stride must be an int >= 1, got {stride!r}")
    return _conv3x3(x, kernel, stride)
