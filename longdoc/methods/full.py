"""Full: the ordinary prefill of the whole prompt, the quality ceiling inside the model's window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import Arch
from ..cache import KVCache
from ..errors import LongDocError
from ..progress import ProgressHook, no_progress
from ..quantized import QuantizedCache
from .base import Method, Prefill, run_model


@dataclass(frozen=True)
class Full(Method):
    """Prefill every token; `prefill_chunk` bounds activation memory without changing what is attended."""

    prefill_chunk: int = 8192  # tokens per forward chunk
    past_window: bool = False  # run on prompts longer than the trained window anyway (for comparisons)

    name = "full"
    reusable = True  # the document's cache is the same whatever the question

    def __post_init__(self) -> None:
        if self.prefill_chunk < 1:
            raise LongDocError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")

    def reading_layers(self, arch: Arch) -> int:
        return arch.num_layers

    def extend(self, arch: Arch, cache: KVCache, input_ids: torch.Tensor, progress: ProgressHook = no_progress) -> None:
        """Append every layer's keys and values of `input_ids` (1, m), which follow the rows `cache` holds."""
        start = cache.seq_length()
        run_model(arch, input_ids, _positions(start, input_ids, arch), cache, self.prefill_chunk, progress, "reading")

    def prefill(
        self,
        arch: Arch,
        layout,
        progress: ProgressHook = no_progress,
        reading: KVCache | QuantizedCache | None = None,
    ) -> Prefill:
        n, split = len(layout), layout.reading_len
        arch.check_span(n)
        input_ids = layout.input_ids(arch.device)
        if reading is not None:
            cache = reading  # the caller's own lease of the reading: appending to it leaves the reading whole
        else:  # the document part as a reading (quantized with kv_bits), so this equals a follow-up on one
            cache = self.read(arch, input_ids[:, :split], progress, capacity=n)
        rest = input_ids[:, split:]
        logits = run_model(arch, rest, _positions(split, rest, arch), cache, self.prefill_chunk, progress)
        # No evidence: every token stays, so no passage is singled out (a score would be attention read as
        # importance, which full never uses); the notes say so, so --json's empty evidence is explained.
        notes = ["full: no evidence spans, it keeps every token"] if layout.context_len else []
        return Prefill(cache=cache, next_position=n, last_logits=logits, notes=notes)


def _positions(start: int, input_ids: torch.Tensor, arch: Arch) -> torch.Tensor:
    return torch.arange(start, start + input_ids.shape[1], device=arch.device)[None]
