"""SPMD launchers for one per-device step function (README "Training on many devices").

The step function is written once, for one device, with collectives over the
axis name ``'data'`` (``lax.pmean`` of gradients, ``lax.all_gather`` of
embeddings when a loss group spans devices: deml_jax/loss_groups.py).  Two
launchers run it:

* :class:`PmapLauncher` (default, the design card's pmap): the state carries a
  leading axis of local devices; the host batch is ``[local_devices, ...]``.
* :class:`ShardMapLauncher`: ``jax.jit(jax.shard_map(...))`` over a 1-D mesh
  of all devices (pmap's successor in JAX 0.10); the state is one replicated
  global array per leaf, the batch is sharded along its leading axis.

Both take and give host-side batches of the same layout and both hand back an
unreplicated state for checkpoints, so the trainer does not care which runs.
Multi-host: each process passes only its local slice of the batch; pmap and
``make_array_from_process_local_data`` join them into the global program.
"""

from __future__ import annotations

import flax.jax_utils
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
LAUNCHERS = ("pmap", "shard_map")


def pmap_devices(devices):
    """``devices`` argument for ``jax.pmap``: None when they are all the local
    devices, which multi-process pmap requires (all local devices, global axis)."""
    return None if list(devices) == jax.local_devices() else list(devices)


class PmapLauncher:
    """Runs ``step_fn(state, batch) -> (state, metrics)`` with ``jax.pmap``."""

    def __init__(self, step_fn, devices=None):
        self.devices = list(devices or jax.local_devices())
        self._step = jax.pmap(step_fn, axis_name=AXIS, devices=pmap_devices(self.devices),
                              donate_argnums=(0,))

    @property
    def num_local_devices(self) -> int:
        return len(self.devices)

    def put_state(self, state):
        """Host (unreplicated) state -> replicated on the local devices."""
        return flax.jax_utils.replicate(state, self.devices)

    def get_state(self, state):
        """Replicated device state -> one host copy (for checkpoints and eval)."""
        return jax.tree.map(lambda x: np.asarray(x[0]), state)

    def step(self, state, batch):
        state, metrics = self._step(state, batch)
        return state, jax.tree.map(lambda m: m[0], metrics)


class ShardMapLauncher:
    """Runs the same per-device step with ``jax.shard_map`` over a 1-D mesh."""

    def __init__(self, step_fn, devices=None):
        devices = list(devices or jax.devices())
        self.mesh = Mesh(np.array(devices), (AXIS,))  # Auto axes (stack-notes, JAX 0.10)
        self._replicated = NamedSharding(self.mesh, P())
        self._sharded = NamedSharding(self.mesh, P(AXIS))

        def per_device(state, batch):
            batch = jax.tree.map(lambda x: x[0], batch)  # drop the local device axis
            return step_fn(state, batch)

        mapped = jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P(AXIS)),
                               out_specs=(P(), P()), check_vma=False)
        self._step = jax.jit(mapped, donate_argnums=(0,))

    @property
    def num_local_devices(self) -> int:
        return len([d for d in self.mesh.devices.flat
                    if d.process_index == jax.process_index()])

    def put_state(self, state):
        return jax.device_put(state, self._replicated)

    def get_state(self, state):
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state)

    def step(self, state, batch):
        batch = jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self._sharded, x), batch)
        return self._step(state, batch)


def make_launcher(kind: str, step_fn, devices=None):
    """``kind`` is ``config.parallel.launcher``: ``'pmap'`` or ``'shard_map'``."""
    if kind == "pmap":
        return PmapLauncher(step_fn, devices)
    if kind == "shard_map":
        return ShardMapLauncher(step_fn, devices)
    raise ValueError(f"config.parallel.launcher must be one of {LAUNCHERS}, got {kind!r}")


def tree_pmean(tree):
    return jax.tree.map(lambda x: jax.lax.pmean(x, AXIS), tree)
