"""RAG, a peer baseline: rank passages of the context with BM25 and prefill only the best ones.

The context is cut into passages of `passage_tokens` tokens; bm25s ranks them against the question;
the best are taken, in document order, until `top_k` context tokens are used; [prefix | passages |
suffix] is prefilled at fresh positions, as GemFilter's second pass is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import Arch
from ..errors import LongDocError
from ..progress import ProgressHook, no_progress
from ..prompt import PromptLayout
from .base import Method, Prefill, reread_kept


@dataclass(frozen=True)
class Rag(Method):
    """BM25 passages up to GemFilter's budget: the retrieval baseline on the same engine."""

    top_k: int = 1024  # context tokens kept (GemFilter's budget)
    passage_tokens: int = 128
    prefill_chunk: int = 8192  # tokens per forward chunk

    name = "rag"
    reads_past_window = True  # only the retrieved passages are read
    needs_question_text = True
    budget_option = "top_k"

    def __post_init__(self) -> None:
        for field_name in ("top_k", "passage_tokens", "prefill_chunk"):
            if getattr(self, field_name) < 1:
                raise LongDocError(f"{field_name} must be at least 1, got {getattr(self, field_name)}")

    def rank(self, layout: PromptLayout, question: str) -> tuple[list[tuple[int, int]], list[float]]:
        """Passages as (first, end) context-token ranges, and their BM25 scores for the question."""
        try:
            import bm25s
        except ImportError:
            raise LongDocError("the rag baseline needs bm25s: pip install bm25s") from None
        c = layout.context_len
        passages = [(s, min(s + self.passage_tokens, c)) for s in range(0, c, self.passage_tokens)]
        offsets = layout.context_offsets
        texts = [layout.context_text[offsets[s][0] : offsets[e - 1][1]] for s, e in passages]
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        query = bm25s.tokenize([question], stopwords="en", show_progress=False)
        if not query.vocab:  # nothing but stopwords: no passage is preferred
            return passages, [0.0] * len(passages)
        scores = retriever.get_scores(query_tokens_single=[*query.vocab])
        return passages, [float(x) for x in scores]

    def prefill(self, arch: Arch, layout: PromptLayout, progress: ProgressHook = no_progress, reading=None) -> Prefill:
        if layout.question is None:
            raise LongDocError("the rag baseline needs the question text in the prompt layout")
        passages, scores = self.rank(layout, layout.question)
        order = sorted(range(len(passages)), key=lambda i: -scores[i])
        chosen, used = [], 0
        for i in order:
            if used >= self.top_k:
                break
            first, end = passages[i]
            end = min(end, first + self.top_k - used)
            chosen.append((first, end, scores[i]))
            used += end - first
        chosen.sort()
        kept_context = torch.cat([torch.arange(first, end) for first, end, _ in chosen])
        context_scores = torch.cat([torch.full((end - first,), score) for first, end, score in chosen])
        notes = [f"rag: {len(chosen)} of {len(passages)} passages of {self.passage_tokens} tokens (BM25)"]
        return reread_kept(arch, layout, kept_context, context_scores, self.prefill_chunk, progress, notes)
