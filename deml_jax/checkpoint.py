"""Checkpoints (orbax) and preemption handling for the training loop.

Layout under ``workdir``::

    checkpoints/<step>/{state,meta}   the latest ``max_to_keep`` saves (auto-resume)
    best/<step>/{state,meta}          the one save with the best *validation* metric

Why two managers: orbax's ``best_fn`` changes which checkpoints ``max_to_keep``
keeps (the best N instead of the newest N), so one manager cannot both resume
from the newest step and keep the best one.

The caller passes validation metrics only (never test metrics): model
selection on the test split would leak it (architecture.md §4, deml-reference.md
§7 evaluates all snapshots without choosing one).  Metric names containing
``'test'`` are refused as ``best_metric``.

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<time>`` and
renames it when complete, so a process killed during a save leaves the last
complete step as the latest one; leftover tmp directories are ignored and
removed when the next :class:`Checkpointer` opens the directory.

Multi-host: every process calls :meth:`Checkpointer.save` (orbax synchronises
and writes from the primary where needed); the training loop should poll
:meth:`PreemptionFlag.should_stop` which also honours JAX's preemption sync
point (``multihost_utils.reached_preemption_sync_point``) on multi-process runs.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

BEST_MODES = ("max", "min")


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


def _manager(directory: Path, *, max_to_keep: int, async_save: bool,
             best_fn=None, best_mode: str = "max") -> ocp.CheckpointManager:
    # The save interval is decided by Checkpointer.should_save (orbax's own
    # policy also saves the first step it sees, whatever the interval).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=1, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=async_save,
        best_fn=best_fn, best_mode=best_mode,
        keep_checkpoints_without_metrics=best_fn is None)
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=("state", "meta"))


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

    ``state`` leaves: jax/numpy arrays and Python scalars (e.g. params, optax
    state, an int step, ``jax.random.key_data(rng)``); ``meta``: a JSON dict.
    """

    def __init__(self, workdir, *, max_to_keep: int = 3, save_every: int = 1,
                 best_metric: str | None = None, best_mode: str = "max",
                 async_save: bool = True):
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
        self._latest = _manager(root / "checkpoints", max_to_keep=max_to_keep,
                                async_save=async_save)
        self._best = None
        self._best_value = None
        if best_metric is not None:
            self._best = _manager(
                root / "best", max_to_keep=1, async_save=async_save,
                best_fn=lambda m: float(m[best_metric]), best_mode=best_mode)
            step = self._best.best_step()
            if step is not None:
                self._best_value = float(self._best.metrics(step)[best_metric])

    # -- queries -------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest complete checkpoint step, or None."""
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        """The step of the best-metric checkpoint, or None."""
        return None if self._best is None else self._best.best_step()

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
        return self._latest.reached_preemption(step)

    # -- save ----------------------------------------------------------------
    def save(self, step: int, state, meta: Mapping[str, Any] | None = None, *,
             metrics: Mapping[str, float] | None = None,
             force: bool = False) -> bool:
        """Saves ``state`` and ``meta`` at ``step`` when due; returns whether it wrote.

        ``metrics`` (validation only) containing ``best_metric`` also update
        ``best/`` when the value improves, whatever the save interval.
        """
        _check_saveable(state)
        meta = _as_json(meta)
        if metrics is not None:
            meta.setdefault("metrics", _as_json(metrics))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta))
        saved = False
        due = force or self.should_save(step)
        if due and step not in self._latest.all_steps():
            saved = self._latest.save(step, args=args, force=True)
        if self._best is not None and metrics is not None:
            self._maybe_save_best(step, args, metrics)
        return bool(saved)

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
        (restored as numpy).
        """
        manager = self._best if best else self._latest
        if manager is None:
            raise ValueError("restore(best=True) needs best_metric to be set")
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(abstract_state)),
            meta=ocp.args.JsonRestore()))
        return out.state, dict(out.meta)

    def restore_or_none(self, abstract_state):
        """``(state, meta)`` of the latest checkpoint, or None if there is none."""
        step = self.latest_step()
        return None if step is None else self.restore(step, abstract_state)

    def restore_best(self, abstract_state):
        """``(state, meta)`` of the best-validation checkpoint, or None."""
        step = self.best_step()
        return None if step is None else self.restore(step, abstract_state,
                                                      best=True)

    # -- lifetime ------------------------------------------------------------
    def wait(self) -> None:
        """Blocks until every started save is durable on disk."""
        self._latest.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self.wait()
        self._latest.close()
        if self._best is not None:
            self._best.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------
# Preemption.

class PreemptionFlag:
    """Set by SIGTERM (and optionally SIGINT); the training loop polls it.

    The loop saves a checkpoint and exits cleanly when :meth:`should_stop`
    returns True.  A second SIGINT after the flag is set raises
    ``KeyboardInterrupt`` (so Ctrl-C twice still stops a stuck run).
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self, signum: int | None = None) -> None:
        self.signum = signum
        self._event.set()

    def should_stop(self, step: int) -> bool:
        """Flag set locally, or (multi-process) JAX's preemption sync point.

        ``reached_preemption_sync_point`` must be called by every process at
        the same steps; it needs ``jax.distributed.initialize()``.
        """
        if self.is_set():
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return False

    def _handle(self, signum, frame):
        if self.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("received signal %d: will checkpoint and stop", signum)
        self.set(signum)

    def install(self, signums) -> "PreemptionFlag":
        for signum in signums:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were installed before."""
        while self._previous:
            signum, handler = self._previous.popitem()
            signal.signal(signum, handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.uninstall()


def install_preemption_handler(*, sigint: bool = False) -> PreemptionFlag:
    """Installs SIGTERM (and SIGINT if ``sigint``) handlers that set a flag.

    Must be called from the main thread (Python's rule for signal handlers).
    Call ``flag.uninstall()`` (or use it as a context manager) to restore the
    previous handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_preemption_handler must be called from the "
                           "main thread (Python only runs signal handlers there)")
    signums = [signal.SIGTERM] + ([signal.SIGINT] if sigint else [])
    return PreemptionFlag().install(signums)
