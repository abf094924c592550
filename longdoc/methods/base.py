"""What a prefill method is, what it hands to decoding, and the passes several methods share.

A method is a frozen dataclass of its settings that subclasses `Method` and declares, as class
attributes, what its callers need to know (whether it reads past the trained window, whether it
needs the question's words, whether its work on the document carries over to later questions).
Its `prefill` returns a `Prefill`: the cache for decoding and what it kept. The caller times it,
measures memory and writes the stats; a method does no bookkeeping of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from ..arch import Arch
from ..cache import KVCache
from ..progress import ProgressHook, no_progress
from ..quantized import QuantizedCache


@dataclass
class Prefill:
    """A cache ready for decoding, plus what the method kept."""

    cache: KVCache | QuantizedCache
    next_position: int  # RoPE position of the first generated token
    last_logits: torch.Tensor  # (1, vocab) float32 logits for the first generated token
    kept_context: torch.Tensor | None = None  # indices into the layout's context tokens, ascending
    context_scores: torch.Tensor | None = None  # the method's score of each kept context token
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # method-specific measurements (chunks, schedule, ...)
    tokens_kept: int = 0  # tokens in the decoding cache (per KV head for snapkv); set from the cache

    def __post_init__(self) -> None:
        self.tokens_kept = self.tokens_kept or self.cache.seq_length()


@dataclass(frozen=True)
class Method:
    """Base of every method's settings dataclass: the facts callers ask instead of comparing names.

    `kv_bits` (8, 4 or 2) quantizes the cache each method hands to decoding, KIVI's way (longdoc/quantized.py),
    and a reusable method's reading (`read`); it is keyword-only, so it follows each method's own fields.
    """

    kv_bits: int | None = field(default=None, kw_only=True)

    name: ClassVar[str]
    reads_past_window: ClassVar[bool] = False  # takes prompts longer than the model's trained window
    needs_question_text: ClassVar[bool] = False  # ranks the document with the question's words
    # Its work on [prefix | document] does not depend on the question, so a reading keeps it (layers below).
    reusable: ClassVar[bool] = False
    budget_option: ClassVar[str | None] = None  # the field that sets its token budget (bench's --top-k)

    def prefill(
        self,
        arch: Arch,
        layout,
        progress: ProgressHook = no_progress,
        reading: KVCache | QuantizedCache | None = None,
    ) -> Prefill:
        """The cache for decoding and what was kept. `reading`, for reusable methods, is a cache of the prompt's
        first `layout.reading_len` tokens that the method may append to (a fork or lease of a reading, never the
        reading itself); None computes everything."""
        raise NotImplementedError

    def read(
        self, arch: Arch, input_ids: torch.Tensor, progress: ProgressHook = no_progress, capacity: int = 0
    ) -> KVCache | QuantizedCache:
        """The question-independent work on [prefix | document] (1, L) as a KVCache of `capacity` rows (reusable
        methods): `extend` from nothing.

        With `kv_bits` the reading is quantized (KIVI, layer by layer, each full-precision layer freed once its codes
        exist) and a question's rows attend to it dequantized. A prefill without a reading computes its document
        part through this too, so a one-shot answer and a follow-up on a stored or saved reading are the same
        computation: the price is that a one-shot answer's question attends to the quantized document, not to the
        full-precision one (README, kv_bits).
        """
        cache = KVCache(arch.num_layers, capacity=capacity)
        if input_ids.shape[1]:
            self.extend(arch, cache, input_ids, progress)
        if self.kv_bits is None:
            return cache
        return QuantizedCache(cache, self.kv_bits, decoding=False, free=True)

    def extend(self, arch: Arch, cache: KVCache, input_ids: torch.Tensor, progress: ProgressHook = no_progress) -> None:
        """Add the work on `input_ids`, the tokens after those `cache` holds (reusable methods)."""
        raise NotImplementedError(f"'{self.name}' does not reuse its work across questions")

    def reading_layers(self, arch: Arch) -> int:
        """How many layers of [prefix | document] keys and values a reading keeps (reusable methods)."""
        raise NotImplementedError(f"'{self.name}' does not reuse its work across questions")

    def options(self) -> dict:
        """The settings that differ from the defaults, by field name (for stats, JSON and reading checks)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def describe(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({options})"


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
    positions: torch.Tensor,
    cache: KVCache,
    prefill_chunk: int,
    progress: ProgressHook = no_progress,
    stage: str = "prefill",
) -> torch.Tensor:
    """Run every layer over `input_ids` (1, n) in sequence chunks, appending to `cache`; the last position's logits.

    Chunking bounds the activations to `prefill_chunk` tokens; attention still sees every earlier token
    through the cache. Chunks start at multiples of `prefill_chunk` from the first of `input_ids`, so a
    prompt run as [document] then [question] is split the same way whether or not the document's part
    was kept from an earlier question: that is what makes a follow-up equal a one-shot answer.
    """
    n = input_ids.shape[1]
    cache.capacity = max(cache.capacity, cache.seq_length() + n)  # allocate each layer once
    hidden = None
    for start in range(0, n, prefill_chunk):
        end = min(start + prefill_chunk, n)
        hidden = arch.embed(input_ids[:, start:end])
        hidden = arch.forward(hidden, arch.rotary(hidden, positions[:, start:end]), cache)
        progress(stage, end, n)
    return arch.head(hidden)


def reread_kept(
    arch: Arch,
    layout,
    kept_context: torch.Tensor,
    context_scores: torch.Tensor,
    prefill_chunk: int,
    progress: ProgressHook = no_progress,
    notes: list[str] | None = None,
) -> Prefill:
    """Prefill [prefix | kept context rows | suffix] through the whole model at fresh positions 0..m-1.

    The second pass of GemFilter, RAG and lingua; decoding continues at m. `context_scores` are the kept rows'.
    """
    kept = layout.keep_index(kept_context.to(arch.device))
    input_ids = layout.input_ids(arch.device)[:, kept]
    m = input_ids.shape[1]
    arch.check_span(m)
    cache = KVCache(arch.num_layers)
    logits = run_model(arch, input_ids, torch.arange(m, device=arch.device)[None], cache, prefill_chunk, progress)
    return Prefill(
        cache=cache,
        next_position=m,
        last_logits=logits,
        kept_context=kept_context.cpu(),
        context_scores=context_scores.cpu(),
        notes=notes or [],
    )
