"""Run needle samples through a LongDoc and record every answer."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

from ..api import LongDoc
from .needle import Haystacks, is_correct


def needle_records(
    doc: LongDoc,
    haystacks: Haystacks,
    *,
    length: int,
    needles: int = 1,
    samples: int = 20,
    depths: Iterable[float] | None = None,
    passkey: bool = False,
    seed: int = 0,
    max_new_tokens: int = 32,
    label: str | None = None,
) -> list[dict]:
    """Ask `samples` fresh haystacks of about `length` tokens; one record per sample.

    With `depths`, the samples cycle through them; otherwise the asked needle's depth is random.
    The same seed gives the same haystacks to every method, so methods compare like for like; each
    (length, depths) cell gets haystacks of its own, so cells are independent samples, not one set reused. `label` names
    the records' method (default: the method's name), for rows such as kivi-4 that are one method with settings.
    """
    rng = random.Random(f"{seed}-{length}-{needles}-{passkey}-{depths if depths is None else list(depths)}")
    depth_list = list(depths) if depths is not None else None
    records = []
    for i in range(samples):
        depth = depth_list[i % len(depth_list)] if depth_list else None
        sample = haystacks.sample(rng, length, needles=needles, depth=depth, passkey=passkey)
        answer = doc.ask(sample.context, sample.question, max_new_tokens=max_new_tokens)
        start, end = sample.needle_spans[sample.target]
        ranks = [i for i, e in enumerate(answer.evidence) if e.start < end and start < e.end]
        records.append(
            dict(
                method=label or doc.method.name,
                length=length,
                tokens_in=answer.stats.tokens_in,
                tokens_kept=answer.stats.tokens_kept,
                needles=needles,
                passkey=passkey,
                depth=round(sample.depths[sample.target], 3),
                correct=is_correct(answer.text, sample),
                answer=answer.text,
                expected=sample.value,
                prefill_seconds=round(answer.stats.prefill_seconds, 4),
                evidence_rank=ranks[0] if ranks else None,  # the asked needle among the evidence spans (0: strongest)
                evidence_spans=len(answer.evidence),
            )
        )
    return records


def accuracy(records: list[dict]) -> float:
    return sum(r["correct"] for r in records) / max(1, len(records))


def grounded(records: list[dict]) -> float:
    """Share of samples answered exactly with the asked needle as the strongest evidence span: an answer a reader can
    check against the passage longdoc points to first."""
    return sum(r["correct"] and r["evidence_rank"] == 0 for r in records) / max(1, len(records))


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion: honest at small n and near 0 or 1, unlike p +- z*sqrt(p(1-p)/n)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)
