"""full: the ordinary prefill of the whole prompt, the quality ceiling inside the model's window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import Arch
from ..cache import KVCache
from ..errors import LongDocError
from ..progress import ProgressHook, no_progress
from ..prompt import PromptLayout
from .base import Prefilled, Timer, run_model


@dataclass(frozen=True)
class FullConfig:
    """Prefill every token; `chunk_size` bounds activation memory without changing what is attended."""

    chunk_size: int = 8192

    name = "full"

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise LongDocError(f"chunk_size must be at least 1, got {self.chunk_size}")

    def prefill(self, arch: Arch, layout: PromptLayout, progress: ProgressHook = no_progress) -> Prefilled:
        n = len(layout)
        arch.check_span(n)
        input_ids = layout.input_ids(arch.device)
        with Timer(arch.device) as timer:
            cache = KVCache(arch.num_layers)
            positions = torch.arange(n, device=arch.device)[None]
            logits = run_model(arch, input_ids, positions, cache, self.chunk_size, progress)
        return Prefilled(
            cache=cache,
            next_position=n,
            last_logits=logits,
            tokens_in=n,
            tokens_kept=n,
            prefill_seconds=timer.seconds,
            peak_memory_bytes=timer.peak_bytes,
        )
