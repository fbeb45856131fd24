"""The largest foreground region's box on device (docs/reference.md §4 step 8).

Caffe keeps the external contour of largest polygon area (``findContours`` +
``contourArea``) and takes its ``boundingRect``.  Here: the largest 8-connected
component by pixel count, found by label propagation on the graph of row runs
(pixel-level propagation as a fallback), as fixed-shape array programs (§12:
same box in 300/300 simulated maps; see experiments/bench/oam_agreement.py).
Used by :func:`deml_jax.ops.crop.attention_boxes`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Cap on label-propagation sweeps; blob-shaped regions converge in 2-3 (+1 to
# detect convergence).  Past the cap a winding component may stay split.
MAX_CC_SWEEPS = 256
# Runs per row handled by the run-graph components (7 at most seen in tests;
# more in any row of a batch falls back to pixel label propagation).
MAX_ROW_RUNS = 8


# ----------------------------------------------------------------------------- step 8

def _segmented_cummin(values, resets, axis):
    """Running minimum along ``axis`` that restarts wherever ``resets`` is True."""
    def combine(a, b):
        (va, ra), (vb, rb) = a, b
        return jnp.where(rb, vb, jnp.minimum(va, vb)), ra | rb
    return jax.lax.associative_scan(combine, (values, resets), axis=axis)[0]


def _run_min(labels, fg, axis):
    """Smallest label of every run of foreground pixels along ``axis`` (1 or 2).

    Forward and backward segmented running minima (log-depth scans, no scatter).
    """
    def forward(lab, mask):
        prev = jnp.roll(mask, 1, axis=axis)
        first = jnp.arange(mask.shape[axis]).reshape((-1, 1) if axis == 1 else (1, -1)) == 0
        return _segmented_cummin(lab, ~mask | ~prev | first, axis)
    flip = lambda x: jnp.flip(x, axis=axis)
    backward = flip(forward(flip(labels), flip(fg)))
    return jnp.where(fg, jnp.minimum(forward(labels, fg), backward), labels)


def _propagate_once(labels, fg, background):
    """One sweep: row, column and row runs, 3x3 (8-connectivity) min, pointer jump.

    Row-column-row run minima settle any region that is convex along rows and
    columns in one sweep; other shapes take a few.
    """
    b, s, _ = labels.shape
    labels = _run_min(_run_min(_run_min(labels, fg, 2), fg, 1), fg, 2)
    window = jax.lax.reduce_window(labels, background, jax.lax.min, (1, 3, 3), (1, 1, 1), "SAME")
    labels = jnp.where(fg, window, background)
    flat = labels.reshape(b, s * s)  # a label is a pixel index of the same component
    jumped = jnp.take_along_axis(flat, jnp.minimum(flat, s * s - 1), axis=1)
    return jnp.where(fg, jumped.reshape(b, s, s), background)


def connected_components(fg, max_sweeps: int = MAX_CC_SWEEPS):
    """8-connected component labels of ``fg`` bool ``[B, S, S]`` -> int32 ``[B, S, S]``.

    Each foreground pixel gets the smallest row-major index ``r * S + c`` of its
    component; background gets ``S * S``.  Label propagation until nothing
    changes (or ``max_sweeps``).  Labels only ever spread inside a component, so
    when every image's foreground carries one label it is one component and the
    loop stops without a confirming sweep: the usual single blob of an upsampled
    7x7 map costs one sweep.
    """
    b, s, _ = fg.shape
    background = np.int32(s * s)  # a NumPy scalar: reduce_window needs a concrete init value
    index = jnp.arange(s * s, dtype=jnp.int32).reshape(1, s, s)
    labels = jnp.where(fg, index, background)

    def cond(state):
        _, unsettled, sweep = state
        return unsettled & (sweep < max_sweeps)

    def body(state):
        labels, _, sweep = state
        new = _propagate_once(labels, fg, background)
        lowest = jnp.min(new, axis=(1, 2), keepdims=True)
        several = jnp.any(fg & (new != lowest))  # some image still has two labels
        return new, several & jnp.any(new != labels), sweep + 1

    labels, _, _ = jax.lax.while_loop(cond, body, (labels, jnp.array(True), jnp.int32(0)))
    return labels


def _mask_bbox(mask):
    """Inclusive bounding box ``(y, x, h, w)`` int32 ``[B]`` each of bool ``[B, S, S]``."""
    s = mask.shape[1]
    rows, cols = jnp.any(mask, axis=2), jnp.any(mask, axis=1)
    y = jnp.argmax(rows, axis=1)
    x = jnp.argmax(cols, axis=1)
    h = s - jnp.argmax(rows[:, ::-1], axis=1) - y
    w = s - jnp.argmax(cols[:, ::-1], axis=1) - x
    return y.astype(jnp.int32), x.astype(jnp.int32), h.astype(jnp.int32), w.astype(jnp.int32)


def _largest_component_mask(fg):
    """Mask of the largest 8-connected component (pixel count; ties: smallest label)."""
    b, s, _ = fg.shape
    labels = connected_components(fg)
    ids = labels + (jnp.arange(b, dtype=jnp.int32) * (s * s + 1))[:, None, None]
    counts = jax.ops.segment_sum(fg.reshape(-1).astype(jnp.int32), ids.reshape(-1),
                                 num_segments=b * (s * s + 1))
    best = jnp.argmax(counts.reshape(b, s * s + 1)[:, : s * s], axis=1).astype(jnp.int32)
    return fg & (labels == best[:, None, None])


def _row_runs(fg, max_runs: int):
    """First ``max_runs`` runs of every row: start and end columns ``[B, S, K]``
    (inclusive, ascending; missing runs have start ``S`` and end ``-1``)."""
    s = fg.shape[2]
    nth = jnp.arange(1, max_runs + 1, dtype=jnp.int32)[:, None]  # [K, 1]
    left = jnp.pad(fg[:, :, :-1], ((0, 0), (0, 0), (1, 0)))
    right = jnp.pad(fg[:, :, 1:], ((0, 0), (0, 0), (0, 1)))

    def columns(marks):  # column of the k-th mark of each row (S if none)
        seen = jax.lax.associative_scan(jnp.add, marks.astype(jnp.int32), axis=2)
        return jnp.sum(seen[:, :, None, :] < nth, axis=3, dtype=jnp.int32)  # cols before it

    start = columns(fg & ~left)
    return start, jnp.where(start < s, columns(fg & ~right), -1)


def _run_graph_bbox(fg, max_runs: int = MAX_ROW_RUNS):
    """Largest 8-connected component's rect, on the graph of row runs.

    Exact when no row holds more than ``max_runs`` runs.  Runs of consecutive
    rows ``[a0, a1]``, ``[b0, b1]`` touch iff ``b0 <= a1 + 1`` and
    ``b1 >= a0 - 1``; min-label propagation with pointer jumping over the
    ``S * K`` run nodes (a few thousand, not ``S * S`` pixels).  Node order is
    raster order, so ties go to the same component as the pixel labelling.
    """
    b, s, _ = fg.shape
    k, big = max_runs, s * max_runs
    start, end = _row_runs(fg, max_runs)
    valid = start < s
    link = (valid[:, :-1, :, None] & valid[:, 1:, None, :]
            & (start[:, 1:, None, :] <= end[:, :-1, :, None] + 1)
            & (end[:, 1:, None, :] >= start[:, :-1, :, None] - 1))  # [B, S-1, K(above), K]
    pad = lambda x, where_: jnp.pad(x, ((0, 0), where_, (0, 0)), constant_values=big)

    def sweep(labels):
        above = jnp.min(jnp.where(link, labels[:, :-1, :, None], big), axis=2)
        below = jnp.min(jnp.where(link, labels[:, 1:, None, :], big), axis=3)
        new = jnp.minimum(labels, jnp.minimum(pad(above, (1, 0)), pad(below, (0, 1))))
        flat = new.reshape(b, s * k)
        jumped = jnp.take_along_axis(flat, jnp.minimum(flat, s * k - 1), axis=1)
        return jnp.where(valid, jumped.reshape(b, s, k), big)

    index = jnp.arange(s * k, dtype=jnp.int32).reshape(1, s, k)
    labels = jnp.where(valid, index, big)
    def body(state):
        new = sweep(state[0])
        return new, jnp.any(new != state[0])

    labels, _ = jax.lax.while_loop(lambda state: state[1], body, (labels, jnp.array(True)))
    sizes = jnp.where(valid, end - start + 1, 0)
    ids = (labels + (jnp.arange(b, dtype=jnp.int32) * (big + 1))[:, None, None]).reshape(-1)
    counts = jax.ops.segment_sum(sizes.reshape(-1), ids, num_segments=b * (big + 1))
    best = jnp.argmax(counts.reshape(b, big + 1)[:, :big], axis=1)
    chosen = valid & (labels == best[:, None, None])
    rows = jnp.any(chosen, axis=2)
    y = jnp.argmax(rows, axis=1)
    h = s - jnp.argmax(rows[:, ::-1], axis=1) - y
    x = jnp.min(jnp.where(chosen, start, s), axis=(1, 2))
    w = jnp.max(jnp.where(chosen, end, -1), axis=(1, 2)) + 1 - x
    return tuple(v.astype(jnp.int32) for v in (y, x, h, w))


def largest_region_bbox(fg, largest_component: bool = True, max_runs: int = MAX_ROW_RUNS):
    """Bounding rect ``(y, x, h, w)`` of the largest foreground region (§4 step 8).

    ``largest_component=True``: largest 8-connected component by pixel count
    (ties: smallest label), on the graph of row runs when no row of the batch
    holds more than ``max_runs`` runs (:func:`_run_graph_bbox`), else by pixel
    label propagation (``lax.cond``); ``False``: box of all foreground pixels
    (cheaper, equal whenever the binary map has one component).  Also returns
    ``found`` bool ``[B]`` (False when there is no foreground).
    """
    if not largest_component:
        return (*_mask_bbox(fg), jnp.any(fg, axis=(1, 2)))
    max_runs = min(max_runs, (fg.shape[2] + 1) // 2)  # a row has at most ceil(S / 2) runs
    left = jnp.pad(fg[:, :, :-1], ((0, 0), (0, 0), (1, 0)))
    few_runs = jnp.all(jnp.sum(fg & ~left, axis=2) <= max_runs)
    rect = jax.lax.cond(few_runs, lambda m: _run_graph_bbox(m, max_runs),
                        lambda m: _mask_bbox(_largest_component_mask(m)), fg)
    return (*rect, jnp.any(fg, axis=(1, 2)))
