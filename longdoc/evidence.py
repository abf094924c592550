"""Kept context tokens -> merged character spans of the source, strongest first."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prompt import PromptLayout

QUOTE_CHARS = 200


@dataclass(frozen=True)
class Evidence:
    start: int  # character offset in the context text
    end: int
    quote: str
    score: float
    tokens: int  # kept tokens in this span
    peak: int = -1  # character offset of the span's highest-scoring token
    message: int | None = None  # for a prompt given as messages: the message the span lies in (offsets are its)


def evidence_spans(
    layout: PromptLayout, kept: torch.Tensor, scores: torch.Tensor, max_gap: int = 2, limit: int = 50
) -> list[Evidence]:
    """Merge kept context tokens that lie within `max_gap` tokens of each other into spans.

    A span's score is the highest score among its tokens; spans come strongest first.
    """
    if kept is None or kept.numel() == 0:
        return []
    kept_list = kept.tolist()
    score_list = scores.tolist()
    runs: list[tuple[int, int, float, int, int]] = []  # first, last, best score, count, best token
    first = last = peak = kept_list[0]
    best, count = score_list[0], 1
    for index, score in zip(kept_list[1:], score_list[1:], strict=True):
        if index - last <= max_gap:
            last, count = index, count + 1
            if score > best:
                best, peak = score, index
        else:
            runs.append((first, last, best, count, peak))
            first = last = peak = index
            best, count = score, 1
    runs.append((first, last, best, count, peak))
    spans = []
    for first, last, best, count, peak in sorted(runs, key=lambda r: -r[2])[:limit]:
        start, end = layout.context_offsets[first][0], layout.context_offsets[last][1]
        quote = quote_of(layout.context_text, start, end)
        message, start_in, end_in = layout.source_of(start, end)
        at = layout.source_of(layout.context_offsets[peak][0], end)[1]
        spans.append(
            Evidence(start=start_in, end=end_in, quote=quote, score=float(best), tokens=count, peak=at, message=message)
        )
    return spans


def quote_of(text: str, start: int, end: int) -> str:
    """The span's text on one line, cut to QUOTE_CHARS."""
    quote = " ".join(text[start:end].split())
    return quote if len(quote) <= QUOTE_CHARS else quote[: QUOTE_CHARS - 1] + "\u2026"
