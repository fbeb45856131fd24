"""Metric logging without TensorFlow: JSONL + TensorBoard, progress bar, NaN guard.

``workdir/metrics.jsonl`` holds one JSON object per ``write_scalars`` call,
``{"step": int, name: float, ...}``, flushed to the OS at every write so a killed
process loses nothing already written; it is the source of truth that
:func:`read_metrics` and the README table scripts read.  TensorBoard event files
go to ``workdir/tb`` through ``tensorboardX`` (no TensorFlow, stack-notes.md
"Logging"); without tensorboardX the writer logs one warning and keeps JSONL
only.  Only the primary host (``jax.process_index() == 0``) writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

_logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TEXT_FILE = "text.jsonl"
TENSORBOARD_DIR = "tb"
_warned_no_tensorboard = False


class NonFiniteError(FloatingPointError):
    """A logged value is NaN or +-Inf; ``step`` and ``names`` say where."""

    def __init__(self, step: int, names: Sequence[str],
                 values: Mapping[str, Any] | None = None):
        self.step, self.names = int(step), tuple(names)
        shown = ", ".join(f"{n}={values[n]}" if values else n for n in self.names)
        super().__init__(f"non-finite value(s) at step {self.step}: {shown}")


def _scalar(name: str, value) -> float:
    """A Python float from a number or a size-1 array; ValueError otherwise."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"metric {name!r} must be a number, got "
                         f"{type(value).__name__}: {value!r}") from None
    if arr.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
    return float(arr.reshape(()))


def _step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}: {step!r}")
    return int(step)


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
    """Raises :class:`NonFiniteError` naming every NaN/Inf entry of ``metrics``.

    Values may be numbers or arrays of any shape (all elements are checked).
    """
    bad = {}
    for name, value in metrics.items():
        arr = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            bad[name] = arr.reshape(()).item() if arr.size == 1 else "array"
    if bad:
        raise NonFiniteError(step, list(bad), bad)


def tree_norm(tree) -> jax.Array:
    """Global L2 norm of all leaves, accumulated in float32; shape ``()``.

    An empty tree gives 0.  Works inside ``jit``.
    """
    leaves = jax.tree.leaves(tree)
    total = sum((jnp.sum(jnp.square(jnp.asarray(x, jnp.float32)))
                 for x in leaves), jnp.zeros([], jnp.float32))
    return jnp.sqrt(total)


def read_metrics(workdir) -> list[dict]:
    """The ``metrics.jsonl`` of ``workdir`` as a list of dicts, in write order.

    A truncated last line (a kill during a write) is skipped; a bad line
    elsewhere raises ValueError.  A missing file gives ``[]``.
    """
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                _logger.warning("skipping truncated last line of %s", path)
                continue
            raise ValueError(f"{path}:{i + 1} is not JSON: {line[:80]!r}") from None
    return rows


def _tensorboard_writer(logdir: Path, purge_step: int | None = None):
    """A ``tensorboardX.SummaryWriter``, or None (warned once) if unavailable."""
    global _warned_no_tensorboard
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        if not _warned_no_tensorboard:
            _logger.warning("tensorboardX unavailable (%s): writing %s only",
                        err, METRICS_FILE)
            _warned_no_tensorboard = True
        return None
    return SummaryWriter(logdir=str(logdir), flush_secs=30, purge_step=purge_step)


def repair_metrics(path, resume_step: int | None = None) -> int:
    """Makes ``path`` (a ``metrics.jsonl``) safe to append to; returns rows dropped.

    A partial last line (a kill during a write) is cut off (or, if it is a
    complete row that lacks only its newline, terminated).  With
    ``resume_step``, rows of steps after it (logged after the last checkpoint
    by a run that was then killed; the resumed run logs them again) are
    dropped, so each step appears once.  The file is replaced atomically.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    data = path.read_bytes()
    dropped = 0
    if not data.endswith(b"\n"):
        head, _, last = data.rpartition(b"\n")
        try:
            json.loads(last.decode("utf-8"))
            data += b"\n"
        except (UnicodeDecodeError, json.JSONDecodeError):
            _logger.warning("%s: cut off a partial last line (%d bytes) left by an "
                            "interrupted write", path, len(last))
            data = head + b"\n" if head else b""
            dropped += 1
    if resume_step is not None:
        kept, late = [], 0
        for line in data.splitlines(keepends=True):
            try:
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                kept.append(line)  # read_metrics reports it with its line number
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and (
                    row["step"] > resume_step):
                late += 1
                continue
            kept.append(line)
        if late:
            _logger.warning("%s: dropped %d row(s) of steps after %d, the step this run "
                            "resumes from (they are logged again)", path, late, resume_step)
            data = b"".join(kept)
            dropped += late
    if data != path.read_bytes():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return dropped


class MetricWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard (primary host only).

    Appends to an existing ``metrics.jsonl`` (a resumed run continues it)
    after :func:`repair_metrics`: a partial last line is cut off and, with
    ``resume_step``, rows after that step are dropped (TensorBoard is told to
    purge them too).  Non-primary hosts (``is_primary=False``) create and
    write nothing.
    """

    def __init__(self, workdir, *, is_primary: bool = True,
                 tensorboard: bool = True, resume_step: int | None = None):
        self.is_primary = bool(is_primary)
        self.workdir = Path(workdir)
        self._jsonl: TextIO | None = None
        self._tb = None
        if not self.is_primary:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        repair_metrics(self.workdir / METRICS_FILE, resume_step)
        self._jsonl = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            self._tb = _tensorboard_writer(
                self.workdir / TENSORBOARD_DIR,
                purge_step=None if resume_step is None else resume_step + 1)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One JSONL line ``{"step": step, **scalars}`` (flushed) + TB scalars.

        Values: numbers or size-1 arrays (jax arrays are fetched), or None (a
        metric that could not be computed, e.g. a degenerate evaluation split:
        JSON ``null``, not written to TensorBoard). NaN/Inf are written as JSON
        ``NaN``/``Infinity``; use :func:`check_finite` to stop.
        """
        step = _step(step)
        if "step" in scalars:
            raise ValueError("scalars must not contain the reserved key 'step'")
        values = {str(k): None if v is None else _scalar(k, v) for k, v in scalars.items()}
        if not self.is_primary:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                if value is not None:
                    self._tb.add_scalar(name, value, step)

    def write_text(self, step: int, name: str, text: str) -> None:
        """A text entry: TensorBoard text and a line of ``workdir/text.jsonl``."""
        step = _step(step)
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not self.is_primary:
            return
        with open(self.workdir / TEXT_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "name": name, "text": text}) + "\n")
        if self._tb is not None:
            self._tb.add_text(name, text, step)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """``step/total``, steps/s, images/s and ETA, on one line.

    On a TTY the line is redrawn in place (``\\r``) at every :meth:`update`;
    otherwise a full line is printed every ``every`` steps and at the last.
    Rates are measured from the first :meth:`update` call, so the first
    step's compilation time does not distort them.

    Args:
      total_steps: the step at which training ends.
      start_step: the step training (re)starts from.
      images_per_step: global batch size, for images/s (None: not shown).
      stream: where to write (default ``sys.stderr``).
      every: printing period on a non-TTY stream.
      clock: seconds source (injectable for tests).
      enabled: False prints nothing (e.g. on non-primary hosts).
    """

    def __init__(self, total_steps: int, start_step: int = 0, *,
                 images_per_step: int | None = None, stream: TextIO | None = None,
                 every: int = 100, clock: Callable[[], float] = time.monotonic,
                 enabled: bool = True):
        if _step(total_steps) < _step(start_step):
            raise ValueError(f"total_steps ({total_steps}) must be >= start_step "
                             f"({start_step})")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.total, self.start = int(total_steps), int(start_step)
        self.images_per_step, self.every, self.clock = images_per_step, every, clock
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = bool(enabled)
        self._first: tuple[int, float] | None = None
        self._width = 0

    def format(self, step: int, extras: Mapping[str, float] | None = None) -> str:
        """The progress line for ``step`` (updates the rate reference)."""
        now = self.clock()
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        elapsed = now - first_time
        rate = (step - first_step) / elapsed if elapsed > 0 else float("nan")
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        pct = 100.0 * step / self.total if self.total else 100.0
        parts = [f"step {step}/{self.total} ({pct:.1f}%)",
                 f"{rate:.2f} steps/s" if math.isfinite(rate) else "? steps/s"]
        if self.images_per_step:
            ips = rate * self.images_per_step
            parts.append(f"{ips:.1f} img/s" if math.isfinite(ips) else "? img/s")
        parts.append(f"ETA {_format_duration(eta)}")
        parts += [f"{k} {float(v):.4g}" for k, v in (extras or {}).items()]
        return " | ".join(parts)

    def update(self, step: int, metrics: Mapping[str, float] | None = None,
               **extras: float) -> None:
        """Reports that ``step`` is done; ``metrics``/``extras`` (e.g. loss) are shown."""
        step = _step(step)
        if not self.enabled:
            return
        line = self.format(step, {**(metrics or {}), **extras})
        if self.is_tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = max(self._width, len(line))
        elif step % self.every == 0 or step >= self.total:
            self.stream.write(line + "\n")
        else:
            return
        self.stream.flush()

    def close(self) -> None:
        """Ends the in-place line on a TTY."""
        if self.is_tty and self._width:
            self.stream.write("\n")
            self.stream.flush()


def log(message: str, *, stream: TextIO | None = None) -> None:
    """Writes ``HH:MM:SS message`` to ``stream`` (default stderr), flushed."""
    stream = stream if stream is not None else sys.stderr
    stream.write(f"{time.strftime('%H:%M:%S')} {message}\n")
    stream.flush()


def format_table(results: Mapping[str, Any], title: str = "") -> str:
    """A two-column ``name | value`` text table (floats with 4 decimals)."""
    rows = [(str(k), f"{v:.4f}" if isinstance(v, (float, np.floating)) else str(v))
            for k, v in results.items()]
    width = max([len(k) for k, _ in rows] + [4])
    lines = [title] if title else []
    lines += [f"{'name':<{width}} | value", f"{'-' * width}-+-------"]
    lines += [f"{k:<{width}} | {v}" for k, v in rows]
    return "\n".join(lines)
