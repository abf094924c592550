"""What every prefill method returns, and the forward pass they share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..arch import Arch
from ..cache import KVCache
from ..progress import ProgressHook, no_progress


@dataclass
class Prefilled:
    """A cache ready for decoding, plus what the method kept and measured."""

    cache: KVCache
    next_position: int  # RoPE position of the first generated token
    last_logits: torch.Tensor  # (1, vocab) float32 logits for the first generated token
    tokens_in: int
    tokens_kept: int
    kept_context: torch.Tensor | None = None  # indices into the layout's context tokens, ascending
    context_scores: torch.Tensor | None = None  # the method's score of each kept context token
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # method-specific measurements (chunks, schedule, ...)
    prefill_seconds: float = 0.0
    peak_memory_bytes: int | None = None


def strongest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores in ascending (document) order; all of them when k covers the length."""
    if k >= scores.shape[-1]:
        return torch.arange(scores.shape[-1], device=scores.device)
    return scores.topk(k).indices.sort().values


def keep_index(prefix_len: int, context_len: int, total: int, rows: torch.Tensor) -> torch.Tensor:
    """Row indices of the whole prefix, the kept context `rows` (ascending) and the whole suffix."""
    device = rows.device
    return torch.cat(
        [
            torch.arange(prefix_len, device=device),
            prefix_len + rows,
            torch.arange(prefix_len + context_len, total, device=device),
        ]
    )


@torch.inference_mode()
def run_model(
    arch: Arch,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cache: KVCache,
    chunk_size: int,
    progress: ProgressHook = no_progress,
    stage: str = "prefill",
) -> torch.Tensor:
    """Run every layer over `input_ids` (1, n) in sequence chunks, appending to `cache`.

    Returns the float32 logits of the last position, (1, vocab). Chunking bounds the activations
    to `chunk_size` tokens; attention still sees every earlier token through the cache.
    """
    n = input_ids.shape[1]
    hidden = None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        hidden = arch.embed(input_ids[:, start:end])
        position_embeddings = arch.rotary(hidden, position_ids[:, start:end])
        past = cache.seq_length()
        mask = arch.attention_mask(end - start, past + end - start, hidden.dtype, hidden.device)
        for i in range(arch.num_layers):
            hidden = arch.run_layer(i, hidden, position_embeddings, cache, mask)
        progress(stage, end, n)
    return arch.logits(arch.final_norm(hidden[:, -1:]))[:, -1]


def reread_kept(
    arch: Arch, layout, kept_context: torch.Tensor, chunk_size: int, progress: ProgressHook = no_progress
) -> tuple[KVCache, int, torch.Tensor]:
    """Prefill [prefix | kept context rows | suffix] through the whole model at fresh positions 0..m-1.

    The second pass of GemFilter and of the RAG baseline; returns (cache, m, last logits).
    """
    n = len(layout)
    kept = keep_index(layout.prefix_len, layout.context_len, n, kept_context.to(arch.device))
    input_ids = layout.input_ids(arch.device)[:, kept]
    m = input_ids.shape[1]
    cache = KVCache(arch.num_layers)
    logits = run_model(arch, input_ids, torch.arange(m, device=arch.device)[None], cache, chunk_size, progress)
    return cache, m, logits


class Timer:
    """Wall time and peak GPU memory above the starting point, synchronised on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak_bytes = torch.cuda.max_memory_allocated() - self.base if self.cuda else None
