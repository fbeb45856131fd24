"""Failure handling of :mod:`deml_jax.checkpoint`: error types, orbax log
filtering, and the helpers that classify read and write failures.

orbax logs through absl (and tensorstore's failed reads end as asyncio "Future
exception was never retrieved" records); the filters installed here keep those
out of the default output because :mod:`deml_jax.checkpoint` reports each
failure itself on one line.  absl verbosity INFO or lower (``--verbosity=0``)
shows orbax's own lines again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os

import jax
import numpy as np


class CheckpointUnreadableError(RuntimeError):
    """No checkpoint of a directory could be read."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameter shapes or structure differ from the model's."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full)."""


class _OrbaxFilter(logging.Filter):
    """Keeps orbax's own log lines (INFO chatter, background-thread tracebacks of
    failures this module reports itself) out of the default output; absl
    verbosity INFO or lower (``--verbosity=0``) shows them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        return (record.levelno >= logging.CRITICAL
                or logging.getLogger("absl").getEffectiveLevel() < logging.WARNING)


class _AbandonedReadFilter(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" records of
    tensorstore reads abandoned when a corrupt checkpoint failed to restore."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Future exception was never retrieved"):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return "tensorstore_spec" not in str(exc) and "tensorstore_spec" not in str(
            record.getMessage())


for _name, _filter in (("absl", _OrbaxFilter), ("asyncio", _AbandonedReadFilter)):
    if not any(isinstance(f, _filter) for f in logging.getLogger(_name).filters):
        logging.getLogger(_name).addFilter(_filter())


@contextlib.contextmanager
def quiet_orbax(level: int = logging.CRITICAL):
    """Silences orbax's absl log lines (INFO chatter, parse errors) inside the block."""
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(max(level, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    text = text[0] if text else ""
    return f"{type(err).__name__}: {text[:200]}"


def disk_error(err: BaseException) -> OSError | None:
    """The OSError (or tensorstore's text of one) behind ``err``, if it is a write failure."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and not isinstance(err, CheckpointWriteError):
            return err
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return OSError(errno.ENOSPC, str(err).splitlines()[0][:200])
        err = err.__cause__ or err.__context__
    return None


def _leaf_name(path) -> str:
    """orbax's parameter name of a key path (the names in a checkpoint's metadata)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def leaf_shapes(tree) -> dict[str, tuple]:
    """``{orbax name: (shape, dtype)}`` of the leaves of ``tree`` that have a shape."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            out[_leaf_name(path)] = (tuple(shape), str(np.dtype(leaf.dtype)))
    return out
