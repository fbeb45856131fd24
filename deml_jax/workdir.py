"""The training workdir: an exclusive lock, and the saved resolved config.

``workdir/.lock`` (JSON ``{pid, host, start_time, proc_start, argv}``) is held
by the one training run that writes the workdir; a second run refuses to start
and names the holder.  The file is created atomically (written aside, then
``os.link``-ed into place, which fails if it exists), so a reader never sees a
half-written lock.  A lock left by a dead process on the same host (``kill -9``,
a crash; a zombie its parent has not reaped counts as dead) is taken over with
a warning; one from another host is never guessed stale.  Commands that only
read (``evaluate``, ``export_features``) take no lock.  Multi-host runs: only
process 0 holds it (the caller decides).

``workdir/config.json`` (``{config, argv, versions, history}``) is written when
a run starts; a resumed run (and ``evaluate``) compares its config with it:

* keys in :data:`SHAPE_KEYS` change the parameters' structure: always refused
  (the checkpoint cannot fit; start a new workdir);
* keys in :data:`FREE_KEYS` (evaluation, logging, checkpoint cadence, paths,
  the run length) may change freely; the change is noted on one line;
* every other key changes the data or the objective: refused unless named in
  ``allow`` (``--allow_config_change=key1,key2``; ``group.*`` names a group).
  ``evaluate`` also ignores the keys that only matter for training
  (:data:`TRAINING_ONLY_KEYS`).
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import logging
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"

# Prefixes: "eval." matches every eval key; a bare name matches that key only.
SHAPE_KEYS = (
    "method", "model.num_branches", "model.num_learners", "model.embedding_dim",
    "model.backbone", "model.channel_attention", "model.cam_hidden",
    "model.adversary_hidden", "loss.diversity", "loss.adversary_mhn_hidden",
)
FREE_KEYS = (
    "eval.", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "total_steps", "dataset.data_dir", "dataset.num_workers",
    "parallel.launcher", "parallel.num_devices", "model.pretrained", "model.kernels",
)
TRAINING_ONLY_KEYS = (
    "seed", "optim.", "loss.", "parallel.", "eval_on_split", "dataset.train_split",
    "dataset.augmentation", "dataset.images_per_class", "dataset.global_batch_size",
)
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                      "ml_collections", "tensorflow-datasets")


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock."""


class ConfigChangeError(ValueError):
    """The config differs from the workdir's saved config in refused keys."""


# ----------------------------------------------------------------------------
# Lock.

def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/PID/stat`` (after the command name), or None (no such
    process, or no ``/proc``: not Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22), or None.

    Distinguishes a live holder from an unrelated process that reused its pid.
    """
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _alive(pid: int) -> bool:
    """True if ``pid`` runs; a zombie (killed, not yet reaped by its parent) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    fields = _proc_stat(pid)
    if not fields:
        return True  # no /proc (not Linux): trust kill(0)
    return fields[0] not in ("Z", "X")  # field 3: the state


def describe_holder(holder: Mapping[str, Any]) -> str:
    started = holder.get("start_time")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, (int, float)) else "?")
    argv = " ".join(holder.get("argv") or [])
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {when}"
            + (f" ({argv})" if argv else ""))


class WorkdirLock:
    """Exclusive lock on ``workdir`` (a context manager; creates ``workdir``).

    Raises :class:`WorkdirLockedError` naming the holder when a live process
    (or any process on another host) holds it.
    """

    def __init__(self, workdir, *, argv: Iterable[str] | None = None):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.argv = list(sys.argv if argv is None else argv)
        self.held = False
        self._token: dict | None = None

    def read(self) -> dict | None:
        """The holder's record, ``{}`` if unreadable, None if unlocked."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return record if isinstance(record, dict) else {}

    def _is_stale(self, holder: Mapping[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        if not _alive(pid):
            return True
        recorded, now = holder.get("proc_start"), _proc_start(pid)
        return recorded is not None and now is not None and recorded != now

    def acquire(self) -> "WorkdirLock":
        self.workdir.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        record = {"pid": pid, "host": socket.gethostname(), "start_time": time.time(),
                  "proc_start": _proc_start(pid), "argv": self.argv}
        aside = self.workdir / f"{LOCK_FILE}.{socket.gethostname()}.{pid}"
        aside.write_text(json.dumps(record), encoding="utf-8")
        try:
            for _ in range(3):
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    holder = self.read()
                    if holder is None:  # released meanwhile
                        continue
                    if holder and self._is_stale(holder):
                        log.warning("taking over the stale lock %s of a dead process (%s)",
                                    self.path, describe_holder(holder))
                        self.path.unlink(missing_ok=True)
                        continue
                    who = describe_holder(holder) if holder else "unreadable lock record"
                    raise WorkdirLockedError(
                        f"workdir {str(self.workdir)!r} is in use by another training run: "
                        f"{who}. Wait for it to finish or stop it; if it is surely gone, "
                        f"delete {str(self.path)!r}.") from None
                except OSError as err:
                    if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise
                    # File systems without hard links: exclusive create instead.
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(json.dumps(record))
                self._token, self.held = record, True
                return self
            raise WorkdirLockedError(f"could not take the lock {str(self.path)!r} "
                                     f"(it keeps changing hands)")
        finally:
            aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Removes the lock file if it is still ours."""
        if not self.held:
            return
        self.held = False
        holder = self.read()
        if holder and holder.get("pid") == self._token["pid"] and (
                holder.get("start_time") == self._token["start_time"]):
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------
# Saved config.

def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_as_json(config) -> dict:
    """The config as plain JSON data (tuples become lists)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(data, default=str))


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_saved_config(workdir) -> dict | None:
    """``workdir/config.json`` as a dict, or None if absent."""
    path = Path(workdir) / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        assert isinstance(record, dict) and isinstance(record.get("config"), dict)
    except (json.JSONDecodeError, AssertionError):
        raise ValueError(f"{path} is not a saved deml_jax config (expected JSON with a "
                         f"'config' object); move it away to start afresh") from None
    return record


def has_checkpoints(workdir) -> bool:
    """Whether ``workdir/checkpoints`` or ``workdir/best`` holds a step directory."""
    for sub in ("checkpoints", "best"):
        try:
            if any(e.name.isdigit() for e in (Path(workdir) / sub).iterdir()):
                return True
        except (FileNotFoundError, NotADirectoryError):
            pass
    return False


def parse_allow(allow) -> tuple[str, ...]:
    """``"a.b,eval.*"`` or a sequence -> patterns (``group.*`` -> ``group.``)."""
    if allow is None:
        return ()
    items = allow.split(",") if isinstance(allow, str) else list(allow)
    return tuple(a.strip()[:-1] if a.strip().endswith(".*") else a.strip()
                 for a in items if a.strip())


def compare_configs(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                    allow=(), context: str = "train") -> dict[str, tuple]:
    """Classifies the keys that differ; raises :class:`ConfigChangeError` if refused.

    ``context``: ``"train"`` (resume) or ``"eval"`` (``evaluate`` and
    ``export_features``, where the training-only keys do not matter).
    Returns ``{key: (saved, current)}`` of the accepted changes.
    """
    if context not in ("train", "eval"):
        raise ValueError(f"context must be 'train' or 'eval', got {context!r}")
    allow = parse_allow(allow)
    old, new = _flatten(saved), _flatten(current)
    missing = object()
    shape, refused, accepted = {}, {}, {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a == b:
            continue
        pair = tuple("<absent>" if v is missing else v for v in (a, b))
        if _matches(key, SHAPE_KEYS):
            shape[key] = pair
        elif (_matches(key, FREE_KEYS) or _matches(key, allow)
              or (context == "eval" and _matches(key, TRAINING_ONLY_KEYS))):
            accepted[key] = pair
        else:
            refused[key] = pair
    if shape or refused:
        show = lambda d: "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in d.items())
        parts = []
        if shape:
            parts.append(f"keys that change the model's parameters (never allowed; "
                         f"use a new workdir): {show(shape)}")
        if refused:
            parts.append(f"keys that change the data or the objective: {show(refused)} "
                         f"(pass --allow_config_change={','.join(refused)} if this is "
                         f"intended)")
        raise ConfigChangeError("the config differs from the one this workdir was trained "
                                "with (" + CONFIG_FILE + "): " + ". ".join(parts))
    return accepted


def check_or_save_config(workdir, config, *, allow=(), context: str = "train",
                         write: bool = True, argv: Iterable[str] | None = None) -> dict:
    """Compares ``config`` with ``workdir/config.json``; writes it when ``write``.

    A workdir without a saved config (new, or from before this file existed)
    or without a checkpoint (nothing trained yet) accepts any config.  Accepted changes are logged on one line and, when
    ``write``, recorded in the file's ``history`` with the new config.
    Returns the accepted changes ``{key: (saved, current)}``.
    """
    current = config_as_json(config)
    saved = read_saved_config(workdir)
    if saved is not None and not has_checkpoints(workdir):
        saved = None  # nothing trained yet (e.g. a run that failed to start): no constraint
    changes = {}
    if saved is not None:
        changes = compare_configs(saved["config"], current, allow=allow, context=context)
        if changes:  # evaluate/export: training-only keys differ routinely, so quieter
            log.log(logging.WARNING if context == "train" else logging.INFO,
                    "config changed since this workdir was created (accepted): %s",
                    ", ".join(f"{k}={b!r} (was {a!r})" for k, (a, b) in changes.items()))
    if write and (saved is None or changes):
        history = list(saved.get("history", [])) if saved else []
        if saved is not None:
            history.append({"time": time.time(), "argv": saved.get("argv"),
                            "changed": {k: a for k, (a, _) in changes.items()}})
        record = {"config": current, "argv": list(sys.argv if argv is None else argv),
                  "versions": versions(), "history": history}
        path = Path(workdir) / CONFIG_FILE
        tmp = path.with_name(f"{CONFIG_FILE}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return changes
