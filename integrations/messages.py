"""How chat messages and completion prompts become longdoc's context and question.

The last user message is the question. Everything before it is the context, in order: system and
user content as it is (that is where documents go in a stuff-documents chain), earlier assistant
turns marked "Assistant:". Messages after the last user message are appended to the context too.
A completion prompt's last paragraph (after its last blank line) is the question and the rest is
the context; a one-paragraph prompt is a question with no context.
"""

from __future__ import annotations

USER_ROLES = {"user", "human"}
ASSISTANT_ROLES = {"assistant", "ai"}


def split_messages(messages: list[tuple[str, str]]) -> tuple[str, str]:
    """(role, text) pairs -> (context, question)."""
    if not messages:
        raise ValueError("no messages: give at least one user message")
    last_user = max((i for i, (role, _) in enumerate(messages) if role in USER_ROLES), default=len(messages) - 1)
    parts = []
    for i, (role, text) in enumerate(messages):
        if i == last_user or not text.strip():
            continue
        parts.append(f"Assistant: {text}" if role in ASSISTANT_ROLES else text)
    return "\n\n".join(parts), messages[last_user][1]


def split_prompt(prompt: str) -> tuple[str, str]:
    """A completion prompt -> (context, question)."""
    body = prompt.strip()
    context, _, question = body.rpartition("\n\n")
    return context.strip(), question.strip()
