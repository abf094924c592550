"""LLMLingua-style prompt compression (arXiv 2310.05736, 2310.06839), a peer baseline; the model is its own small LM.

Each context token's self-information given the question, I(x) = -log p(x | question, earlier text), and
without it, are measured in segments of `segment` tokens: [prefix | suffix | segment] and [prefix | segment],
the suffix being the question and its answer cue. Coarse: sentences are ranked by how much the question
raises their tokens' probability on average (LongLLMLingua's question-aware ranking) and the best kept,
in document order, up to `coarse` times `top_k` tokens. Fine: of those, the `top_k` tokens with the most
self-information given the question stay (LLMLingua's token-level compression). The compressed text is
then prefilled at fresh positions, as RAG's passages are.

LLMLingua-2 replaces the small LM with a trained token classifier; its weights cannot be downloaded here,
so this is the self-information method of LLMLingua / LongLLMLingua.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..arch import Arch
from ..errors import LongDocError
from ..progress import ProgressHook, no_progress
from ..prompt import PromptLayout
from .base import Method, Prefill, reread_kept, strongest

SENTENCE_END = re.compile(r"[.!?]['\")\]]*\s+|\n\s*")


@dataclass(frozen=True)
class Lingua(Method):
    """Question-aware token dropping by the model's own surprise: LLMLingua on the same engine."""

    top_k: int = 1024  # context tokens kept (GemFilter's budget)
    coarse: float = 2.0  # the sentence stage keeps up to coarse * top_k tokens for the token stage
    segment: int = 512  # context tokens scored per pass
    prefill_chunk: int = 8192  # tokens per forward chunk of the compressed prompt

    name = "lingua"
    reads_past_window = True  # scored a segment at a time; only the kept tokens are read together
    budget_option = "top_k"

    def __post_init__(self) -> None:
        for field_name in ("top_k", "segment", "prefill_chunk"):
            if getattr(self, field_name) < 1:
                raise LongDocError(f"{field_name} must be at least 1, got {getattr(self, field_name)}")
        if self.coarse < 1:
            raise LongDocError(
                f"coarse must be at least 1 (the sentence stage keeps coarse * top_k), got {self.coarse}"
            )

    @torch.inference_mode()
    def information(self, arch: Arch, layout: PromptLayout, progress: ProgressHook = no_progress):
        """(given the question, without it): each context token's -log p, float32 (context_len,) each."""
        context = torch.tensor(layout.context_ids, device=arch.device)
        prefix = torch.tensor(layout.prefix_ids, device=arch.device, dtype=torch.long)
        question = torch.cat([prefix, torch.tensor(layout.suffix_ids, device=arch.device, dtype=torch.long)])
        given, alone = torch.empty(len(context), device=arch.device), torch.empty(len(context), device=arch.device)
        for start in range(0, len(context), self.segment):
            piece = context[start : start + self.segment]
            for lead, out in ((question, given), (prefix, alone)):
                ids = torch.cat([lead, piece])[None]
                arch.check_span(ids.shape[1])
                hidden = arch.embed(ids)
                hidden = arch.forward(hidden, arch.rotary(hidden, torch.arange(ids.shape[1], device=arch.device)[None]))
                # The row before each context token predicts it; with no lead the first token has no prediction.
                rows = hidden[:, max(len(lead) - 1, 0) : -1]
                logprobs = arch.logits(arch.final_norm(rows))[0].log_softmax(-1)  # on the head's device
                targets = piece[len(piece) - rows.shape[1] :].to(logprobs.device)
                surprise = -logprobs.gather(-1, targets[:, None])[:, 0]
                out[start + len(piece) - rows.shape[1] : start + len(piece)] = surprise.to(out.device)
                if rows.shape[1] < len(piece):
                    out[start] = 0.0
            progress("lingua", min(start + self.segment, len(context)), len(context))
        return given, alone

    def prefill(self, arch: Arch, layout: PromptLayout, progress: ProgressHook = no_progress, reading=None) -> Prefill:
        given, alone = self.information(arch, layout, progress)
        c = layout.context_len
        sentences = _sentences(layout)  # (first, end) context-token ranges
        gain = alone - given  # how much the question raises each token's probability, in nats
        scores = [float(gain[first:end].mean()) for first, end in sentences]
        coarse_budget, used, chosen = int(self.coarse * self.top_k), 0, torch.zeros(c, dtype=torch.bool)
        for s in sorted(range(len(sentences)), key=lambda s: -scores[s]):
            if used >= coarse_budget:
                break
            first, end = sentences[s]
            chosen[first:end] = True
            used += end - first
        fine = given.cpu().masked_fill(~chosen, float("-inf"))
        fine = fine.masked_fill(layout.protected_mask(), float("inf"))
        kept_context = strongest(fine, min(self.top_k, c))
        notes = [
            f"lingua: {int(chosen.sum())} tokens in {sum(1 for s in sentences if chosen[s[0]])} of "
            f"{len(sentences)} sentences, then the {kept_context.numel()} most informative given the question"
        ]
        return reread_kept(arch, layout, kept_context, given.cpu()[kept_context], self.prefill_chunk, progress, notes)


def _sentences(layout: PromptLayout) -> list[tuple[int, int]]:
    """Context-token ranges of the context text's sentences (a token belongs to the sentence it starts in)."""
    ends = [m.end() for m in SENTENCE_END.finditer(layout.context_text)]
    starts = [offset[0] for offset in layout.context_offsets]
    sentences, first, e = [], 0, 0
    for i, start in enumerate(starts):
        while e < len(ends) and ends[e] <= start:
            e += 1
            if i > first:
                sentences.append((first, i))
                first = i
    sentences.append((first, len(starts)))
    return [s for s in sentences if s[1] > s[0]]
