"""Where the CLI writes: answers and tables to stdout, progress and errors to stderr."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

out = Console()
err = Console(stderr=True)


def fail(message: str) -> None:
    """One line on stderr, exit code 2: how every expected error ends."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def progress_bar(quiet: bool, transient: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=transient,
        disable=quiet,
    )
