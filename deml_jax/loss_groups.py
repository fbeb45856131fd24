"""Loss groups: the released batch geometry on any number of devices (§2.2, §5.4).

The released run computes its losses on 2 sub-batches of 26 images (13
classes x 2), one per GPU, and averages the gradients (§5.4: "draw 52 images
as two independent 26-image sub-batches ... loss = mean(L_0, L_1) + sum_b
R_b").  Here the global batch (``config.dataset.global_batch_size``) and the
number of loss groups (``config.parallel.loss_groups``) are config values, and
the devices only decide where each group's loss is computed:

* groups a multiple of the devices (1 device, 2 groups): each device reshapes
  its local batch into ``groups / devices`` consecutive groups and takes the
  mean of their losses; the trainer then ``pmean``s the gradients.
* devices a multiple of the groups (4 devices, 2 groups): every device
  all-gathers the embeddings to the global batch (tiled, device-major) and
  takes the mean of the group losses.  ``all_gather``'s transpose sums the
  cotangents of every device's identical copy of the loss, so after the
  ``pmean`` of gradients the update is that of one device computing the mean
  of the group losses on the global batch (as ``loss_scope='global'``).
* otherwise: an error naming ``parallel.loss_groups``,
  ``dataset.global_batch_size`` and the device count.

Group g is the g-th contiguous block of ``global_batch / groups`` images of the
global batch; the sampler (deml_jax/data/sampler.py) lays out whole classes, so
each group holds ``global_batch / (groups x images_per_class)`` whole classes.

Scopes (``config.parallel.loss_scope``): ``'groups'`` (default, above),
``'device'`` (one group per device, whatever ``loss_groups`` says: the
released 2-GPU run on 2 devices) and ``'global'`` (one group: the whole
global batch).  The objective is any ``fn(outputs, labels) -> (loss, aux)``;
the loss and every aux value are averaged over groups, so a parameter
regulariser added once inside the objective (R_b, §5.3) stays added once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from deml_jax import parallel

SCOPES = ("groups", "device", "global")


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """Where the loss groups of one step live.

    Attributes:
      scope: ``config.parallel.loss_scope``.
      num_groups: loss groups of the global batch (devices for 'device', 1 for
        'global').
      num_devices: devices over all hosts.
      local_groups: groups computed on each device.
      gather: whether each device all-gathers the global batch first.
    """

    scope: str
    num_groups: int
    num_devices: int
    local_groups: int
    gather: bool


def make_layout(scope: str, loss_groups: int, num_devices: int,
                global_batch_size: int | None = None,
                images_per_class: int | None = None) -> GroupLayout:
    """The :class:`GroupLayout` of a step; ValueError naming the keys when impossible.

    ``global_batch_size`` and ``images_per_class`` are checked when given
    (every group and, for 'device', every device must hold whole classes).
    """
    if scope not in SCOPES:
        raise ValueError(f"config.parallel.loss_scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"the device count must be a positive int, got {num_devices!r}")
    if scope == "device":
        layout = GroupLayout(scope, num_devices, num_devices, 1, False)
    elif scope == "global":
        layout = GroupLayout(scope, 1, num_devices, 1, num_devices > 1)
    else:
        if not isinstance(loss_groups, int) or loss_groups < 1:
            raise ValueError(f"config.parallel.loss_groups={loss_groups!r} must be a positive int")
        if loss_groups % num_devices == 0:
            layout = GroupLayout(scope, loss_groups, num_devices, loss_groups // num_devices, False)
        elif num_devices % loss_groups == 0:
            layout = GroupLayout(scope, loss_groups, num_devices, loss_groups, True)
        else:
            raise ValueError(
                f"config.parallel.loss_groups={loss_groups} and {num_devices} devices: one must "
                f"divide the other (config.dataset.global_batch_size={global_batch_size} is split "
                "into loss_groups groups over the devices); use 1, 2, 4, ... devices "
                "(config.parallel.num_devices) or change config.parallel.loss_groups")
    if global_batch_size is not None:
        _check_batch(layout, loss_groups, global_batch_size, images_per_class)
    return layout


def _check_batch(layout: GroupLayout, loss_groups, global_batch_size, images_per_class):
    g, d, k = global_batch_size, layout.num_devices, images_per_class or 1
    where = (f"config.dataset.global_batch_size={g}, config.parallel.loss_groups={loss_groups}, "
             f"config.parallel.loss_scope={layout.scope!r}, config.dataset.images_per_class={k}, "
             f"{d} devices")
    if not isinstance(g, int) or g < 1:
        raise ValueError(f"config.dataset.global_batch_size={g!r} must be a positive int")
    if g % d:
        raise ValueError(f"the global batch must split evenly over the devices: {where}")
    if g % (layout.num_groups * k):
        raise ValueError(
            f"each of the {layout.num_groups} loss groups must hold whole classes, i.e. "
            f"global_batch_size must be a multiple of {layout.num_groups} x images_per_class "
            f"= {layout.num_groups * k}: {where}")


def classes_per_group(global_batch_size: int, loss_groups: int, images_per_class: int) -> int:
    """13 for the released 52 images in 2 groups of 13 classes x 2 images."""
    return global_batch_size // (loss_groups * images_per_class)


def _group_slice(x, axis: int, groups: int, g: int):
    """Rows of group ``g`` (of ``groups`` contiguous blocks) along the batch ``axis``."""
    n = x.shape[axis]
    if n % groups:
        raise ValueError(f"a batch of {n} rows does not split into {groups} loss groups "
                         "(config.parallel.loss_groups, config.dataset.global_batch_size)")
    size = n // groups
    return jax.lax.slice_in_dim(x, g * size, (g + 1) * size, axis=axis)


def _axes_tree(outputs: Mapping[str, Any], batch_axes: Mapping[str, int]):
    missing = [k for k in outputs if k not in batch_axes]
    if missing:
        raise ValueError(f"no batch axis given for the objective input(s) {missing}")
    return {k: jax.tree.map(lambda _, a=batch_axes[k]: a, v) for k, v in outputs.items()}


def grouped_objective(objective: Callable, outputs: Mapping[str, Any], labels, *,
                      batch_axes: Mapping[str, int], layout: GroupLayout, mask=None, key=None):
    """Mean over loss groups of ``objective(outputs_g, labels_g) -> (loss, aux)``.

    Call inside the per-device step (axis ``'data'``).  ``outputs`` maps a name
    to an array or a pytree of arrays whose batch axis is ``batch_axes[name]``;
    ``labels`` (and ``mask``) are ``[B_local]``.  With ``mask`` the objective is
    called as ``objective(o, l, mask=m)``; with ``key`` as ``objective(o, l,
    key=fold_in(key, g))`` (g = the group's global index, so groups draw
    differently whatever the device count; ``key`` itself when there is one group).
    Returns ``(mean loss, aux averaged over groups)``.
    """
    axes = _axes_tree(outputs, batch_axes)
    if layout.gather:  # the global batch on every device, device-major
        outputs = jax.tree.map(
            lambda x, a: jax.lax.all_gather(x, parallel.AXIS, axis=a, tiled=True), outputs, axes)
        gather = lambda x: jax.lax.all_gather(x, parallel.AXIS, axis=0, tiled=True)
        labels = gather(labels)
        mask = None if mask is None else gather(mask)
        first = 0
    else:
        first = jax.lax.axis_index(parallel.AXIS) * layout.local_groups
    n = layout.local_groups
    losses, auxes = [], []
    for g in range(n):  # a python loop: n is 1 or 2 in the released geometry
        kw = {}
        if mask is not None:
            kw["mask"] = _group_slice(mask, 0, n, g)
        if key is not None:  # one group overall: the key as given
            kw["key"] = key if layout.num_groups == 1 else jax.random.fold_in(key, first + g)
        out_g = jax.tree.map(lambda x, a, g=g: _group_slice(x, a, n, g), outputs, axes)
        loss, aux = objective(out_g, _group_slice(labels, 0, n, g), **kw)
        losses.append(loss)
        auxes.append(aux)
    if n == 1:
        return losses[0], auxes[0]
    loss = sum(losses) / n
    aux = jax.tree.map(lambda *v: sum(v) / n, *auxes)
    return loss, aux
