"""StreamingLLM (arXiv 2309.17453), a peer baseline: attention sinks plus a recent window, same budget.

After the ordinary prefill the cache keeps the prefix (at least its first 4 tokens are the attention
sinks), the last `top_k` context tokens and the suffix, at their original positions. Whatever lies
further back is gone; decoding continues at n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import Arch
from ..cache import KVCache
from ..errors import LongDocError
from ..progress import ProgressHook, no_progress
from ..prompt import PromptLayout
from .base import Method, Prefill, run_model

SINKS = 4


@dataclass(frozen=True)
class Streaming(Method):
    """Attention sinks plus the most recent context tokens: the StreamingLLM baseline at GemFilter's budget."""

    top_k: int = 1024  # recent context tokens kept (GemFilter's budget)
    prefill_chunk: int = 8192  # tokens per forward chunk
    past_window: bool = False  # run on prompts longer than the trained window anyway (for comparisons)

    name = "streaming"
    budget_option = "top_k"

    def __post_init__(self) -> None:
        for field_name in ("top_k", "prefill_chunk"):
            if getattr(self, field_name) < 1:
                raise LongDocError(f"{field_name} must be at least 1, got {getattr(self, field_name)}")

    def prefill(self, arch: Arch, layout: PromptLayout, progress: ProgressHook = no_progress, reading=None) -> Prefill:
        n, p, c = len(layout), layout.prefix_len, layout.context_len
        arch.check_span(n)
        positions = torch.arange(n, device=arch.device)[None]
        cache = KVCache(arch.num_layers)
        logits = run_model(arch, layout.input_ids(arch.device), positions, cache, self.prefill_chunk, progress)
        # Sinks: the prefix, or the first SINKS context tokens when the prefix is shorter.
        sinks = max(0, min(SINKS - p, c))
        recent = torch.arange(max(sinks, c - self.top_k), c, device=arch.device)
        kept_context = torch.cat([torch.arange(sinks, device=arch.device), recent])
        cache.keep(layout.keep_index(kept_context))
        return Prefill(
            cache=cache,
            next_position=n,
            last_logits=logits,
            kept_context=kept_context.cpu(),
            context_scores=kept_context.float().cpu(),  # more recent ranks higher
            notes=[f"streaming: {max(p, SINKS)} sink tokens + the last {recent.numel()} context tokens"],
        )
