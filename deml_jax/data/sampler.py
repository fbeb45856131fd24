"""Deterministic P x K batch plan: a pure function of (seed, step).

The released run (docs/reference.md §2.2) feeds 2 GPUs x 26 images, each
GPU's 26 = 13 classes x 2 images with the 2 images of a class on adjacent
lines, and computes its losses on its own sub-batch. `PKSampler` rebuilds
that layout: P = classes_per_batch classes per global step, K =
images_per_class adjacent images per class, laid out class-major. The global
batch (P x K images) does not depend on the device count: device d of D takes
the d-th contiguous block of P*K/D images, and loss group g of G (the loss
groups of deml_jax/loss_groups.py) the g-th contiguous block of P/G whole
classes. A device's block may split a class when D does not divide P; the
loss groups then gather the embeddings before pairing them.

Passes: the classes are shuffled once per pass with
np.random.default_rng((seed, pass)); a pass has
steps_per_pass = num_classes // P steps, step s of the pass takes the classes
at positions [s*P, (s+1)*P) of that permutation. The num_classes % P classes
at the end of a pass's permutation are not used in that pass; each pass has
a fresh permutation, so no class is favoured over many passes.
Images of class c at step t: np.random.default_rng((seed, t, c)).choice,
without replacement, or with replacement when the class has < K images.
Resuming therefore needs only the step number.
"""

from __future__ import annotations

import numpy as np


def _check_positive(**kwargs):
    for name, value in kwargs.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f'{name} must be a positive int; got {value!r}')


class PKSampler:
    """Global and per-host P x K plans of example indices.

    Args:
      labels: int [N], the label of each example of the split (record order).
      classes_per_batch: P, classes per global step (2 loss groups x 13 = 26 in
        the released run, docs/reference.md §2.2).
      images_per_class: K (2 in the released run).
      num_devices: devices over all hosts; P x K must be divisible by it; each
        gets P x K / num_devices consecutive images of the global batch.
      seed: integer seed of the plan.
      num_groups: loss groups of the global batch; P must be divisible by it
        (each group holds P / num_groups whole classes).
    """

    def __init__(
        self,
        labels: np.ndarray,
        *,
        classes_per_batch: int,
        images_per_class: int,
        num_devices: int,
        seed: int,
        num_groups: int = 1,
    ):
        _check_positive(
            classes_per_batch=classes_per_batch,
            images_per_class=images_per_class,
            num_devices=num_devices,
            num_groups=num_groups,
        )
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f'labels must be a 1-D integer array; got dtype {labels.dtype} shape {labels.shape}'
            )
        if (classes_per_batch * images_per_class) % num_devices:
            raise ValueError(
                f'the global batch of classes_per_batch x images_per_class = '
                f'{classes_per_batch} x {images_per_class} images must be '
                f'divisible by num_devices ({num_devices})'
            )
        if classes_per_batch % num_groups:
            raise ValueError(
                f'classes_per_batch ({classes_per_batch}) must be divisible by '
                f'num_groups ({num_groups}): each loss group holds whole classes'
            )
        self.classes = np.unique(labels)
        if len(self.classes) < classes_per_batch:
            raise ValueError(
                f'classes_per_batch ({classes_per_batch}) exceeds the '
                f'number of classes ({len(self.classes)})'
            )
        order = np.argsort(labels, kind='stable')
        bounds = np.searchsorted(labels[order], self.classes, side='left')
        self._members = dict(zip(self.classes.tolist(), np.split(order, bounds[1:])))
        self.P, self.K = int(classes_per_batch), int(images_per_class)
        self.num_devices, self.seed = int(num_devices), int(seed)
        self.num_groups = int(num_groups)
        self.per_device = self.P * self.K // self.num_devices
        self.steps_per_pass = len(self.classes) // self.P

    def classes_at(self, step: int) -> np.ndarray:
        """Class ids [P] of global step `step` (device-major order)."""
        if step < 0:
            raise ValueError(f'step must be >= 0; got {step}')
        pass_idx, pos = divmod(int(step), self.steps_per_pass)
        perm = np.random.default_rng((self.seed, pass_idx)).permutation(len(self.classes))
        return self.classes[perm[pos * self.P : (pos + 1) * self.P]]

    def _images(self, step: int, cls: int) -> np.ndarray:
        members = self._members[int(cls)]
        rng = np.random.default_rng((self.seed, int(step), int(cls)))
        return rng.choice(members, self.K, replace=len(members) < self.K)

    def global_plan(self, step: int) -> np.ndarray:
        """int64 [num_devices, per_device] example indices of step `step`.

        The global batch lists the classes of `classes_at(step)` in order, each
        as K adjacent entries (docs/reference.md §2.2 layout); device d holds
        its d-th block of P*K/D entries. The flattened plan does not depend on
        num_devices.
        """
        idx = np.concatenate([self._images(step, c) for c in self.classes_at(step)])
        return idx.astype(np.int64).reshape(self.num_devices, self.per_device)

    def host_plan(self, step: int, process_index: int, process_count: int) -> np.ndarray:
        """int64 [local_devices, per_device]: this host's contiguous device rows.

        Hosts own equal contiguous blocks of devices (jax.devices() order is
        process-major); the union over hosts is `global_plan(step)`.
        """
        if process_count < 1 or self.num_devices % process_count:
            raise ValueError(
                f'num_devices ({self.num_devices}) must be divisible '
                f'by process_count ({process_count})'
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f'process_index must be in [0, {process_count}); got {process_index}')
        local = self.num_devices // process_count
        # Only this host's classes are materialised (each host builds its slice).
        lo = process_index * local * self.per_device
        hi = lo + local * self.per_device
        first, last = lo // self.K, -(-hi // self.K)  # classes overlapping [lo, hi)
        cls = self.classes_at(step)[first:last]
        idx = np.concatenate([self._images(step, c) for c in cls])
        idx = idx[lo - first * self.K : hi - first * self.K]
        return idx.astype(np.int64).reshape(local, self.per_device)
