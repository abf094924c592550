"""PromptLayout: prefix | context | suffix token ids, built with the tokenizer's chat template.

The document goes first in the user message and the question after it, so the question and the
assistant header form the suffix that every method keeps:

    prefix  = [BOS] [system] user-header
    context = the document (with the character offset of every token)
    suffix  = "\n\n" question end-of-turn assistant-header
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LongDocError

_MARK = "\u2063LONGDOC-CONTEXT\u2063"

PLAIN_TEMPLATE = "{system}{context}\n\nQuestion: {question}\nAnswer:"


@dataclass(frozen=True)
class PromptLayout:
    prefix_ids: list[int]
    context_ids: list[int]
    suffix_ids: list[int]
    context_offsets: list[tuple[int, int]]  # (start, end) character span of each context token
    context_text: str
    question: str | None = None  # the question as asked (the rag baseline ranks passages with it)

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    @property
    def context_len(self) -> int:
        return len(self.context_ids)

    @property
    def suffix_len(self) -> int:
        return len(self.suffix_ids)

    def __len__(self) -> int:
        return self.prefix_len + self.context_len + self.suffix_len

    def input_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(1, n) token ids of the whole prompt."""
        return torch.tensor([self.prefix_ids + self.context_ids + self.suffix_ids], device=device)


def build_layout(tokenizer, context: str, question: str, system: str | None = None) -> PromptLayout:
    """Split the rendered prompt into prefix | context | suffix and tokenize each part.

    An empty context is allowed (a plain chat turn): the layout then has no context tokens.
    """
    context = context if context and context.strip() else ""
    if not question or not question.strip():
        raise LongDocError("the question is empty; ask something about the document")
    prefix_text, suffix_text, add_bos = _render(tokenizer, question.strip(), system)
    prefix_ids = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None and prefix_ids[:1] != [tokenizer.bos_token_id]:
        prefix_ids = [tokenizer.bos_token_id] + prefix_ids
    # verbose=False: a document longer than the tokenizer's model_max_length is what longdoc is for, not an error.
    encoded = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    suffix_ids = tokenizer(suffix_text, add_special_tokens=False)["input_ids"]
    return PromptLayout(
        prefix_ids=list(prefix_ids),
        context_ids=list(encoded["input_ids"]),
        suffix_ids=list(suffix_ids),
        context_offsets=[tuple(o) for o in encoded["offset_mapping"]],
        context_text=context,
        question=question.strip(),
    )


def _render(tokenizer, question: str, system: str | None) -> tuple[str, str, bool]:
    """Prefix and suffix text around the document; whether BOS must be added by hand."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": f"{_MARK}\n\n{question}"})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = text.split(_MARK)
        if len(parts) != 2:
            raise LongDocError("the tokenizer's chat template does not keep the user message intact; use a plain model")
        return parts[0], parts[1], False
    # A base model without a chat template: a plain question/answer layout, BOS as the tokenizer adds it.
    text = PLAIN_TEMPLATE.format(system=f"{system}\n\n" if system else "", context=_MARK, question=question)
    prefix, suffix = text.split(_MARK)
    adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return prefix, suffix, adds_bos
