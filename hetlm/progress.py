"""Progress: a live bar on a terminal, a plain line every N seconds elsewhere (nohup, CI, a pipe), where
rich's live bar prints nothing until the run ends.

    with progress_bar(TextColumn(...), BarColumn(), disable=not show) as bar:
        task = bar.add_task("train", total=n, info="")
        bar.update(task, completed=i, info="loss 2.1")   # or bar.advance(task, k)

HETLM_PROGRESS_SECONDS sets the seconds between lines (default 30). `Estimate` prints one line with the
expected duration once the first steps of a long task are timed.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import rich
from rich.progress import Progress


def progress_bar(*columns, disable: bool = False) -> Progress | LineProgress:
    console = rich.get_console()
    if disable or console.is_terminal or console.is_jupyter:
        return Progress(*columns, disable=disable)
    return LineProgress(float(os.environ.get("HETLM_PROGRESS_SECONDS", 30)))


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0
    fields: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    printed: float = field(default_factory=time.monotonic)


class LineProgress:
    """The part of rich's Progress hetlm uses, printed as `description: done/total (pct) info, elapsed, left`
    lines: one every `every` seconds of a task, and one when it completes."""

    def __init__(self, every: float = 30.0, stream=None):
        self.every, self.stream, self.tasks = every, stream or sys.stdout, []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        self.tasks.append(_Task(description, total, completed, fields))
        return len(self.tasks) - 1

    def update(self, task: int, completed: float | None = None, advance: float | None = None, **fields) -> None:
        t = self.tasks[task]
        t.completed = completed if completed is not None else t.completed + (advance or 0)
        t.fields.update(fields)
        now = time.monotonic()
        if now - t.printed >= self.every or (t.total is not None and t.completed >= t.total):
            t.printed = now
            print(self._line(t, now), file=self.stream, flush=True)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    @staticmethod
    def _line(t: _Task, now: float) -> str:
        elapsed = now - t.started
        done = f"{t.completed:g}" if t.total is None else f"{t.completed:g}/{t.total:g} ({t.completed / max(t.total, 1):.0%})"
        info = " ".join(str(v) for v in t.fields.values() if v != "")
        left = ""
        if t.total and 0 < t.completed < t.total:
            left = f", about {_clock(elapsed * (t.total - t.completed) / t.completed)} left"
        return f"{t.description}: {done}{' ' + info if info else ''}, {_clock(elapsed)} elapsed{left}"


@dataclass
class Estimate:
    """One line, `what: about 4 min for 594 steps (timed over the first 12)`, printed once the first steps
    of a task have taken `after_seconds` (nothing when it ends sooner): an up-front estimate of how long it runs,
    from its own measured rate, so a user can stop a run that would take too long. `done` counts from
    `done_at_start` (a resumed run times only its own steps)."""

    what: str
    total: int
    unit: str = "steps"
    done_at_start: int = 0
    note: str = ""           # what the rate leaves out, e.g. "validation not included"
    after_seconds: float = 5.0
    show: bool = True
    started: float = field(default_factory=time.monotonic)
    said: bool = False

    def update(self, done: int) -> None:
        timed, elapsed = done - self.done_at_start, time.monotonic() - self.started
        if self.said or not self.show or timed < 1 or (elapsed < self.after_seconds and done < self.total):
            return
        self.said = True
        if done >= self.total:
            return  # finished before it was timed: nothing to announce
        rest = elapsed / timed * (self.total - done)
        note = f"; {self.note}" if self.note else ""
        rich.get_console().print(f"{self.what}: about {duration(elapsed + rest)} for {self.total - self.done_at_start:,} "
                                 f"{self.unit} (timed over the first {timed:,}{note})", highlight=False)


def duration(seconds: float) -> str:
    """A rough duration for people: 40 s, 3 min, 1.5 h."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"
