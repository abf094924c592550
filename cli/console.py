"""Where the CLI writes: answers and tables to stdout, progress and errors to stderr.

Both consoles print text literally (no rich markup, no highlighting): messages carry paths, model ids and
install hints such as `pip install 'longdoc[bench]'`, whose square brackets are not markup. Styles are
applied through `Text` objects only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

out = Console(markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)

PLAIN_INTERVAL = 2.0  # seconds between two plain progress lines of one task


def fail(message: str) -> None:
    """One line on stderr, exit code 2: how every expected error ends."""
    err.print(Text.assemble(("error:", "bold red"), " ", message))
    raise typer.Exit(2)


def progress_bar(quiet: bool, transient: bool = False) -> Progress | LineProgress:
    """A live bar on a terminal; plain throttled lines when stderr is a file or a pipe (logs, CI)."""
    if not quiet and not err.is_terminal:
        return LineProgress(PLAIN_INTERVAL)
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=transient,
        disable=quiet,
    )


class LineProgress:
    """The part of rich's `Progress` the CLI uses, as lines: `stage done/total (elapsed)`.

    A task prints at most one line every `interval` seconds, and its final state once it has printed, so a
    log shows that long work moves without filling up with a line per layer or chunk, and a quick task (or
    a run that ends in a one-line error) prints nothing.
    """

    def __init__(self, interval: float = PLAIN_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.tasks: list[_LineTask] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        if exc_info[0] is None:
            for task in self.tasks:
                if task.printed_state is not None or task.updated_at - task.started_at >= self.interval:
                    self._print(task)

    def add_task(self, description: str, total: float | None = None) -> int:
        self.tasks.append(_LineTask(description, total, self.clock()))
        return len(self.tasks) - 1

    def update(
        self,
        task_id: int,
        completed: float | None = None,
        total: float | None = None,
        advance: float | None = None,
        description: str | None = None,
    ) -> None:
        task = self.tasks[task_id]
        task.description = task.description if description is None else description
        task.total = task.total if total is None else total
        task.completed = task.completed if completed is None else completed
        task.completed += advance or 0
        task.updated_at = self.clock()
        finished = task.total is not None and task.completed >= task.total
        if task.updated_at - task.printed_at >= self.interval or (finished and task.printed_state is not None):
            self._print(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _print(self, task: _LineTask) -> None:
        state = (task.completed, task.total)
        if state == task.printed_state:
            return
        total = "?" if task.total is None else _count(task.total)
        err.print(f"{task.description} {_count(task.completed)}/{total} ({task.updated_at - task.started_at:.1f}s)")
        task.printed_at, task.printed_state = task.updated_at, state


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


class _LineTask:
    def __init__(self, description: str, total: float | None, now: float) -> None:
        self.description = description
        self.total = total
        self.completed: float = 0
        self.started_at = now
        self.updated_at = now
        self.printed_at = now  # the first line comes one interval after the start, not at once
        self.printed_state: tuple[float, float | None] | None = None


class StageStatus:
    """What the CLI is doing before progress can be counted (reading, loading the model).

    A spinner on a terminal. Otherwise a stage that took `PLAIN_INTERVAL` or more gets one line once it is
    done, so a log says where the time went while a quick run (or one ending in an error) stays silent.
    """

    def __init__(self, quiet: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.live = None if quiet or not err.is_terminal else err.status(Text(""), spinner="dots")
        self.plain = not quiet and self.live is None
        self.clock = clock
        self.stage: tuple[str, float] | None = None

    def __enter__(self) -> StageStatus:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.live is not None:
            self.live.stop()
        elif exc_info[0] is None:
            self._finish_stage()

    def update(self, stage: str) -> None:
        if self.live is not None:
            self.live.update(Text(stage))
        elif self.plain:
            self._finish_stage()
            self.stage = (stage, self.clock())

    def _finish_stage(self) -> None:
        if self.stage is not None:
            name, started = self.stage
            if self.clock() - started >= PLAIN_INTERVAL:
                err.print(f"{name} ({self.clock() - started:.1f}s)")
        self.stage = None
