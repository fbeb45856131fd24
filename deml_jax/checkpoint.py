"""Checkpoints (orbax) and preemption handling for the training loop.

Layout under ``workdir``::

    checkpoints/<step>/{state,meta}   the latest ``max_to_keep`` saves (auto-resume)
    best/<step>/{state,meta}          the one save with the best *validation* metric

Why two managers: orbax's ``best_fn`` changes which checkpoints ``max_to_keep``
keeps (the best N instead of the newest N), so one manager cannot both resume
from the newest step and keep the best one.

The caller passes validation metrics only (never test metrics): model
selection on the test split would leak it (docs/reference.md
§7 evaluates all snapshots without choosing one).  Metric names containing
``'test'`` are refused as ``best_metric``.

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<time>`` and
renames it when complete, so a process killed during a save leaves the last
complete step as the latest one; leftover tmp directories are ignored and
removed when the next :class:`Checkpointer` opens the directory.

Failures (README "Failure behaviour"): an unreadable checkpoint (truncated
data file, missing manifest, empty directory) is skipped for the next older one
with a one-line warning; a writer renames it ``<step>.unreadable`` (not a step
name for orbax, so it is never tried again, and left for inspection), a
read-only :class:`Checkpointer` (``evaluate``) leaves it as it is.  If none is
readable, :class:`CheckpointUnreadableError` names the directory.  A state
whose shapes differ from the checkpoint's raises :class:`CheckpointMismatchError`
(nothing is renamed).  A failed write (e.g. a full disk) raises
:class:`CheckpointWriteError`; orbax's unfinished ``<step>.orbax-checkpoint-tmp``
directory is never a step, so the last complete checkpoint stays the latest.

Multi-host: every process calls :meth:`Checkpointer.save` (orbax synchronises
and writes from the primary where needed); the training loop should poll
:meth:`PreemptionFlag.should_stop` which also honours JAX's preemption sync
point (``multihost_utils.reached_preemption_sync_point``) on multi-process runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from deml_jax.checkpoint_failures import (  # noqa: F401 - re-exported
    CheckpointMismatchError, CheckpointUnreadableError, CheckpointWriteError, disk_error,
    first_line, leaf_shapes, quiet_orbax)

log = logging.getLogger(__name__)

BEST_MODES = ("max", "min")
UNREADABLE_SUFFIX = ".unreadable"


def _json_default(value):
    """Makes numpy scalars/arrays and ConfigDicts JSON-serialisable."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"meta value of type {type(value).__name__} is not "
                    f"JSON-serialisable: {value!r}")


def _as_json(meta: Mapping[str, Any] | None) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    return json.loads(json.dumps(dict(meta), default=_json_default))


def _check_saveable(state) -> None:
    """Typed PRNG keys cannot be serialised: ask for ``jax.random.key_data``."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"state leaf {jax.tree_util.keystr(path)} is a typed PRNG key; "
                f"save jax.random.key_data(key) (a uint32 array) instead")


def _abstract(tree):
    """Leaves as ``jax.ShapeDtypeStruct`` with a sharding (orbax needs one).

    Concrete jax arrays keep their sharding; shardless structs go to the first
    local device; numpy arrays stay numpy targets (restored as numpy).
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            if x.sharding is None:
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(one, tree)


def _remove_unfinished(directory: Path) -> None:
    """Deletes the ``*.orbax-checkpoint-tmp*`` leftovers of interrupted saves now.

    orbax also does it, but in a background thread that can race with the
    first save of the same step (e.g. re-saving a step whose write failed).
    """
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for entry in directory.iterdir():
        if ".orbax-checkpoint-tmp" in entry.name and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _manager(directory: Path, *, max_to_keep: int, async_save: bool,
             best_fn=None, best_mode: str = "max",
             read_only: bool = False) -> ocp.CheckpointManager | None:
    # The save interval is decided by Checkpointer.should_save (orbax's own
    # policy also saves the first step it sees, whatever the interval).
    if read_only:
        if not directory.is_dir():
            return None  # nothing to read, and nothing is created
        options = ocp.CheckpointManagerOptions(
            read_only=True, save_interval_steps=0, max_to_keep=None, create=False,
            cleanup_tmp_directories=False, enable_async_checkpointing=False,
            best_fn=best_fn, best_mode=best_mode,
            keep_checkpoints_without_metrics=best_fn is None)
    else:
        _remove_unfinished(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=1, create=True,
            cleanup_tmp_directories=True, enable_async_checkpointing=async_save,
            best_fn=best_fn, best_mode=best_mode,
            keep_checkpoints_without_metrics=best_fn is None)
    with quiet_orbax():  # INFO chatter; a corrupt step is reported by restore_or_none
        # Handlers up front: item_metadata (the shape check) works before any restore.
        return ocp.CheckpointManager(directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


class Checkpointer:
    """Latest-N and best-on-validation checkpoints of any pytree ``state``.

    Args:
      workdir: run directory; checkpoints go to ``workdir/checkpoints`` and
        ``workdir/best``.
      max_to_keep: newest checkpoints kept (snapshot every 500 iters, §6).
      save_every: :meth:`save` writes only on multiples of this (unless
        ``force``).  The default 1 lets the caller decide (the trainer calls
        :meth:`save` every ``config.checkpoint_every_steps``, 500 in the
        released solver, §6, and at the end or on preemption).
      best_metric: name of a *validation* metric to track, or None.
      best_mode: ``'max'`` (e.g. Recall@1) or ``'min'``.
      async_save: orbax writes in a background thread; :meth:`wait` /
        :meth:`close` make the writes durable.
      read_only: only read (``evaluate``, ``export_features``): creates,
        renames and deletes nothing; a missing directory has no checkpoints.

    ``state`` leaves: jax/numpy arrays and Python scalars (e.g. params, optax
    state, an int step, ``jax.random.key_data(rng)``); ``meta``: a JSON dict.
    """

    def __init__(self, workdir, *, max_to_keep: int = 3, save_every: int = 1,
                 best_metric: str | None = None, best_mode: str = "max",
                 async_save: bool = True, read_only: bool = False):
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be an int >= 1, got {max_to_keep!r}")
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be an int >= 1, got {save_every!r}")
        if best_mode not in BEST_MODES:
            raise ValueError(f"best_mode must be one of {BEST_MODES}, got {best_mode!r}")
        if best_metric is not None and "test" in best_metric.lower():
            raise ValueError(f"best_metric must be a validation metric, got "
                             f"{best_metric!r} (model selection on test leaks it)")
        root = Path(workdir).absolute()
        self.best_metric, self.best_mode = best_metric, best_mode
        self.save_every = save_every
        self.read_only = bool(read_only)
        self._pending: int | None = None  # the step of the last started save
        self._latest = _manager(root / "checkpoints", max_to_keep=max_to_keep,
                                async_save=async_save, read_only=read_only)
        self._best = None
        self._best_value = None
        self._has_best = best_metric is not None
        if best_metric is not None:
            self._best = _manager(
                root / "best", max_to_keep=1, async_save=async_save,
                best_fn=lambda m: float(m[best_metric]), best_mode=best_mode,
                read_only=read_only)
            step = self.best_step()
            if step is not None:
                with quiet_orbax():
                    metrics = self._best.metrics(step)
                if metrics and best_metric in metrics:
                    self._best_value = float(metrics[best_metric])

    # -- queries -------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest complete checkpoint step, or None."""
        return None if self._latest is None else self._latest.latest_step()

    def best_step(self) -> int | None:
        """The step of the best-metric checkpoint, or None."""
        return None if self._best is None else self._best.best_step()

    @property
    def directory(self) -> Path | None:
        """``workdir/checkpoints`` (None for a read-only one that does not exist)."""
        return None if self._latest is None else Path(self._latest.directory)

    @property
    def best_value(self) -> float | None:
        """The best validation metric value saved so far, or None."""
        return self._best_value

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` writes ``step`` without ``force``.

        True on multiples of ``save_every`` (or at a multi-host preemption sync
        point) when ``step`` is newer than the latest checkpoint.
        """
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        return step % self.save_every == 0 or self.reached_preemption(step)

    def reached_preemption(self, step: int) -> bool:
        """orbax/JAX multi-host preemption sync point reached at ``step``."""
        return ocp.utils.reached_preemption(step) if self._latest is None else (
            self._latest.reached_preemption(step))

    # -- save ----------------------------------------------------------------
    def save(self, step: int, state, meta: Mapping[str, Any] | None = None, *,
             metrics: Mapping[str, float] | None = None,
             force: bool = False) -> bool:
        """Saves ``state`` and ``meta`` at ``step`` when due; returns whether it wrote.

        ``metrics`` (validation only) containing ``best_metric`` also update
        ``best/`` when the value improves, whatever the save interval.
        """
        if self.read_only:
            raise RuntimeError("this Checkpointer is read-only (read_only=True)")
        _check_saveable(state)
        meta = _as_json(meta)
        if metrics is not None:
            meta.setdefault("metrics", _as_json(metrics))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta))
        saved = False
        due = force or self.should_save(step)
        with self._write_errors(step):
            if due and step not in self._latest.all_steps():
                # A failure of the previous (asynchronous) save surfaces here.
                saved = self._latest.save(step, args=args, force=True)
                self._pending = step
            if self._best is not None and metrics is not None:
                self._maybe_save_best(step, args, metrics)
        return bool(saved)

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        """Turns an OS-level write failure into one clear CheckpointWriteError."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as err:  # orbax wraps background errors in various types
            cause = disk_error(err)
            if cause is None:
                raise
            failed = self._pending if self._pending is not None else step
            self._pending = None
            try:
                with quiet_orbax():
                    self._latest.reload()
                kept = self._latest.latest_step()
            except Exception:  # noqa: BLE001 - best effort for the message
                kept = None
            what = (f"the last complete checkpoint, step {kept}, is kept"
                    if kept is not None else "no complete checkpoint exists yet")
            raise CheckpointWriteError(
                cause.errno or errno.EIO,
                f"could not write checkpoint step {failed} under "
                f"{self._latest.directory}: {cause.strerror or cause}; {what} and stays "
                f"the latest. "
                + ("Free space and rerun" if cause.errno in (errno.ENOSPC, errno.EDQUOT)
                   else "Fix the cause and rerun")
                + " the same command to resume") from err

    def _maybe_save_best(self, step, args, metrics) -> None:
        if self.best_metric not in metrics:
            raise ValueError(f"metrics lack best_metric {self.best_metric!r}; "
                             f"got keys {sorted(metrics)}")
        value = float(np.asarray(metrics[self.best_metric]))
        if not np.isfinite(value):
            log.warning("best metric %s=%s at step %d ignored", self.best_metric,
                        value, step)
            return
        best = self._best_value
        better = best is None or (value > best if self.best_mode == "max"
                                  else value < best)
        if better and step not in self._best.all_steps():
            self._best.save(step, args=args, force=True,
                            metrics={self.best_metric: value})
            self._best_value = value

    # -- restore -------------------------------------------------------------
    def restore(self, step: int, abstract_state, *, best: bool = False):
        """``(state, meta)`` of ``step``; ``abstract_state`` gives the structure.

        Leaves of ``abstract_state`` may be ``jax.ShapeDtypeStruct`` (e.g. from
        ``jax.eval_shape``; restored as jax arrays on their sharding or on the
        first local device), jax arrays (same sharding) or numpy arrays
        (restored as numpy).  Raises :class:`CheckpointMismatchError` if the
        checkpoint's shapes or structure differ from ``abstract_state``'s.
        """
        manager = self._best if best else self._latest
        if manager is None:
            if best and not self._has_best:
                raise ValueError("restore(best=True) needs best_metric to be set")
            raise FileNotFoundError(f"no checkpoint directory to restore step {step} from")
        self._check_structure(manager, step, abstract_state)
        with quiet_orbax():
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(abstract_state)),
                meta=ocp.args.JsonRestore()))
        return out.state, dict(out.meta)

    def _check_structure(self, manager, step: int, abstract_state) -> None:
        """Refuses a state whose names/shapes/dtypes differ from the checkpoint's.

        (orbax would silently restore a differently-shaped array.)  Unreadable
        metadata is left to the restore itself to report.
        """
        try:
            with quiet_orbax():
                saved = manager.item_metadata(step)["state"]
            saved = leaf_shapes(getattr(saved, "tree", saved))
        except Exception:  # noqa: BLE001 - unreadable: the restore will say so
            return
        if not saved:
            return
        wanted = leaf_shapes(abstract_state)
        diffs = [f"{n}: checkpoint {saved.get(n, 'absent')} vs model {wanted.get(n, 'absent')}"
                 for n in sorted(set(saved) | set(wanted)) if saved.get(n) != wanted.get(n)]
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 6 else "")
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {manager.directory} does not fit this model "
                f"(the config changed? compare with the workdir's config.json): {shown}")

    def _restore_newest_readable(self, manager, abstract_state, what: str):
        """Tries the steps newest first; skips (and, if writable, renames) unreadable ones."""
        if manager is None:
            return None
        failures = []
        steps = sorted(manager.all_steps(), reverse=True)
        for step in steps:
            try:
                return self.restore(step, abstract_state, best=manager is self._best)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 - any read failure means unreadable
                path = Path(manager.directory) / str(step)
                failures.append(f"{path} ({first_line(err)})")
                note = "left in place (read-only)"
                if not self.read_only and jax.process_index() == 0:
                    target = path.with_name(path.name + UNREADABLE_SUFFIX)
                    if target.exists():
                        target = path.with_name(f"{path.name}{UNREADABLE_SUFFIX}.{int(time.time())}")
                    os.rename(path, target)
                    note = f"renamed to {target.name}"
                log.warning("unreadable %s checkpoint %s (%s): %s; trying an older one",
                            what, path, first_line(err), note)
        if failures:
            with quiet_orbax():
                manager.reload()
            raise CheckpointUnreadableError(
                f"no readable {what} checkpoint in {manager.directory}: "
                + "; ".join(failures))
        return None

    def restore_or_none(self, abstract_state):
        """``(state, meta)`` of the newest readable checkpoint, or None if there is none.

        Unreadable newer ones are skipped with a warning (renamed
        ``<step>.unreadable`` unless read-only); :class:`CheckpointUnreadableError`
        if none is readable.
        """
        restored = self._restore_newest_readable(self._latest, abstract_state, "latest")
        if restored is not None and not self.read_only:
            with quiet_orbax():
                self._latest.reload()  # forget renamed steps
        return restored

    def restore_best(self, abstract_state):
        """``(state, meta)`` of the best-validation checkpoint, or None."""
        if not self._has_best:
            raise ValueError("restore_best needs best_metric to be set")
        return self._restore_newest_readable(self._best, abstract_state, "best")

    # -- lifetime ------------------------------------------------------------
    def wait(self) -> None:
        """Blocks until every started save is durable on disk.

        Raises :class:`CheckpointWriteError` if a save failed to write.
        """
        with self._write_errors(None):
            for manager in (self._latest, self._best):
                if manager is not None:
                    manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads (even if one failed)."""
        failed = True
        try:
            self.wait()
            failed = False
        finally:
            for manager in (self._latest, self._best):
                if manager is None:
                    continue
                try:
                    with self._write_errors(None):
                        manager.close()
                except Exception:
                    if not failed:  # else: the same failure, already raised by wait()
                        raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Preemption lives in its own module; re-exported here.
from deml_jax.preemption import PreemptionFlag, install_preemption_handler  # noqa: E402,F401
