"""PromptLayout: prefix | context | suffix token ids, and which of them a method may drop.

Two ways in, one shape out:
- a document and a separate question (`build_layout`): the document goes first in the user message
  and the question after it, so the question and the assistant header form the suffix:
      prefix  = [BOS] [system] user-header
      context = the document (with the character offset of every token)
      suffix  = "\\n\\n" question end-of-turn assistant-header
- any prompt as the frameworks send it (`layout_messages`, `layout_completion`): chat messages (or one
  completion string) rendered with the model's own chat template, the user's wording kept. Message text
  is compressible except the last user message's head and tail (the question and the answer cue); the
  template's own tokens and the assistant header always stay. The context runs from the first
  compressible token to the last; template tokens and protected text inside it are `protected` rows
  that every method keeps.

`reading_len` is where the question-independent part ends: a reading keeps the model's work on
tokens [0, reading_len), and a prompt is always computed as [0, reading_len) then the rest, so a
follow-up question on a reading gives the one-shot answer exactly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from .errors import LongDocError

_MARK = "\u2063LONGDOC-CONTEXT\u2063"

PLAIN_TEMPLATE = "{system}{context}\n\nQuestion: {question}\nAnswer:"
PROTECT_TAIL = 128  # tokens at the end of the last user message that always stay: the question and answer cue
PROTECT_HEAD = 16  # tokens at its start that always stay (an instruction often opens the message)
READING_BLOCK = 64  # a framework prompt's reading ends on a multiple of this, so questions of similar length share it


@dataclass(frozen=True)
class MessageSpan:
    """Where one message's text lies in `PromptLayout.context_text`."""

    message: int  # index of the message in the list given
    start: int  # character span in context_text
    end: int
    offset: int  # character offset of `start` within the message's own text


@dataclass(frozen=True)
class PromptLayout:
    prefix_ids: list[int]
    context_ids: list[int]
    suffix_ids: list[int]
    context_offsets: list[tuple[int, int]]  # (start, end) character span of each context token in context_text
    context_text: str
    question: str | None = None  # the question as asked (the rag baseline ranks passages with it)
    protected: tuple[int, ...] = ()  # context rows every method keeps (template tokens, the question's message)
    reading: int | None = None  # end of the question-independent part; default prefix + context
    messages: tuple[MessageSpan, ...] = ()  # for a prompt given as messages: where each message's text lies

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    @property
    def context_len(self) -> int:
        return len(self.context_ids)

    @property
    def suffix_len(self) -> int:
        return len(self.suffix_ids)

    @property
    def reading_len(self) -> int:
        """Tokens [0, reading_len) do not depend on the question: what a reading keeps."""
        return self.prefix_len + self.context_len if self.reading is None else self.reading

    @property
    def compressible(self) -> int:
        """Context tokens a method may drop."""
        return self.context_len - len(self.protected)

    def __len__(self) -> int:
        return self.prefix_len + self.context_len + self.suffix_len

    def token_ids(self) -> list[int]:
        return self.prefix_ids + self.context_ids + self.suffix_ids

    def input_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(1, n) token ids of the whole prompt."""
        return torch.tensor([self.token_ids()], device=device)

    def protected_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(context_len,) True at the context rows no method may drop."""
        mask = torch.zeros(self.context_len, dtype=torch.bool, device=device)
        if self.protected:
            mask[torch.tensor(self.protected, device=device)] = True
        return mask

    def keep_index(self, rows: torch.Tensor) -> torch.Tensor:
        """Prompt rows of the whole prefix, the kept context `rows` (ascending) with the protected ones, the suffix."""
        device = rows.device
        if self.protected:
            rows = torch.cat([rows, torch.tensor(self.protected, device=device, dtype=rows.dtype)]).unique()
        p, c = self.prefix_len, self.context_len
        return torch.cat([torch.arange(p, device=device), p + rows, torch.arange(p + c, len(self), device=device)])

    def source_of(self, start: int, end: int) -> tuple[int | None, int, int]:
        """A character span of context_text as (message index, start, end) in that message's text.

        For a document given on its own the message is None and the span is unchanged.
        """
        if not self.messages:
            return None, start, end
        starts = [m.start for m in self.messages]
        span = self.messages[max(0, bisect.bisect_right(starts, start) - 1)]
        end = min(end, span.end)
        return span.message, span.offset + start - span.start, span.offset + end - span.start


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


USER_ROLES = {"user", "human"}
ROLE_NAMES = {"human": "user", "ai": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def layout_messages(
    tokenizer,
    messages: list[tuple[str, str]],
    protect_tail: int = PROTECT_TAIL,
    protect_head: int = PROTECT_HEAD,
) -> PromptLayout:
    """Lay out chat messages (role, text) as the model's chat template renders them, with the compressible spans.

    The last user message holds the question: its last `protect_tail` and first `protect_head` tokens stay,
    as do the template's tokens and the assistant header. Everything else in the messages may be dropped.
    """
    if not messages:
        raise LongDocError("no messages: give at least one user message")
    unknown = sorted({role for role, _ in messages} - set(ROLE_NAMES))
    if unknown:
        raise LongDocError(f"unknown message role {', '.join(unknown)}; use system, user or assistant")
    last_user = max((i for i, (role, _) in enumerate(messages) if role in USER_ROLES), default=None)
    if last_user is None or not messages[last_user][1].strip():
        raise LongDocError("the prompt has no user message with a question; the last user message is the question")
    rendered = [{"role": ROLE_NAMES[role], "content": text} for role, text in messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
        bos = []
    else:  # a base model: the messages' text one after another, then the answer cue
        text = "\n\n".join(m["content"] for m in rendered) + "\nAnswer:"
        adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        bos = [tokenizer.bos_token_id] if adds_bos and tokenizer.bos_token_id is not None else []
    spans = _message_spans(text, [m["content"] for m in rendered])
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = bos + list(encoded["input_ids"]), [(0, 0)] * len(bos) + [tuple(o) for o in encoded["offset_mapping"]]
    owner = [_owner(spans, start, end) for start, end in offsets]  # message index of each token, or None
    in_last = [i for i, m in enumerate(owner) if m == last_user]
    keep_last = set(in_last[:protect_head]) | set(in_last[max(0, len(in_last) - protect_tail) :])
    free = [i for i, m in enumerate(owner) if m is not None and i not in keep_last]
    if not free:  # nothing to compress: the whole prompt is prefix and suffix
        return _split(ids, offsets, text, 0, 0, (), (), None, messages[last_user][1].strip())
    first, last = free[0], free[-1] + 1
    protected = tuple(i - first for i in range(first, last) if owner[i] is None or i in keep_last)
    tail_start = in_last[max(0, len(in_last) - protect_tail)]
    reading = max(first, (tail_start // READING_BLOCK) * READING_BLOCK)
    return _split(ids, offsets, text, first, last, protected, spans, reading, messages[last_user][1].strip())


def layout_completion(tokenizer, prompt: str, **protect) -> PromptLayout:
    """A completion prompt (the frameworks' text form: template, documents and question in one string).

    It is the user message of a one-turn chat when the model has a chat template, else the text itself.
    """
    if not prompt or not prompt.strip():
        raise LongDocError("the prompt is empty")
    return layout_messages(tokenizer, [("user", prompt)], **protect)


def _message_spans(text: str, contents: list[str]) -> list[tuple[int, int, int, int]]:
    """(start, end, message, offset in message) of each message's text in the rendered prompt, in order."""
    spans, cursor = [], 0
    for index, content in enumerate(contents):
        if not content.strip():
            continue
        found, offset = text.find(content, cursor), 0
        if found < 0:  # templates often trim message text
            stripped = content.strip()
            found, offset = text.find(stripped, cursor), content.index(stripped)
            content = stripped
        if found < 0:
            raise LongDocError(
                "the model's chat template rewrites message text, so longdoc cannot tell the messages' text from the "
                "template; pass the document and question separately"
            )
        spans.append((found, found + len(content), index, offset))
        cursor = found + len(content)
    return spans


def _owner(spans, start: int, end: int) -> int | None:
    """The message whose text holds this token's characters, or None for template tokens."""
    if end <= start:
        return None
    for span_start, span_end, message, _ in spans:
        if span_start <= start and end <= span_end:
            return message
    return None


def _split(ids, offsets, text, first, last, protected, messages_spans, reading, question) -> PromptLayout:
    base = offsets[first][0] if last > first else 0
    context_text = text[base : offsets[last - 1][1]] if last > first else ""
    messages = tuple(
        MessageSpan(message, max(0, start - base), end - base, offset + max(0, base - start))
        for start, end, message, offset in messages_spans
        if end > base and start < base + len(context_text)
    )
    return PromptLayout(
        prefix_ids=ids[:first],
        context_ids=ids[first:last],
        suffix_ids=ids[last:],
        context_offsets=[(max(0, s - base), max(0, e - base)) for s, e in offsets[first:last]],
        context_text=context_text,
        question=question,
        protected=protected,
        reading=reading,
        messages=messages,
    )
