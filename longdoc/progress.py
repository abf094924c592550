"""One small progress hook shared by every long step; the CLI renders it with rich."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None: ...


def no_progress(stage: str, done: int, total: int) -> None:
    """The default hook: library code never prints."""


ProgressHook = Callable[[str, int, int], None]
