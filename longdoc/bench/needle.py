"""RULER-style needle tasks over haystacks cut from real books.

The phrasings below are fixed: the bundled needle model was trained on them, and tests and
benchmarks ask with them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
# Answers repeat the key before the value, like RULER's answer prefix: the value is then found by
# matching "{key} is:" while decoding, which a small model learns. (Trained to answer the value first, the
# bundled model matched keys among distractors only ~60 % of the time in every run.)
ANSWER = "The special magic number for {key} is: {value}."
PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER = "The pass key is {value}."

# Books held out of the needle model's training; evaluation haystacks come from these.
HELD_OUT_BOOKS = ("the-scarlet-letter", "walden", "wuthering-heights")

KEYS = """
apple anchor arrow autumn badge basket beacon blanket bottle bridge bucket butter button cabin camera
candle canvas carpet castle cellar chain chapel cherry chimney circle cloak clock cloud comet copper
cotton crown crystal curtain cushion dagger desert diamond dinner dragon drum eagle ember engine falcon
feather fiddle finger flag flame forest fountain garden garlic ginger glove granite harbor harvest hammer
helmet honey island ivory jacket jungle kettle kingdom ladder lantern lemon letter lily lizard lobster
marble meadow mirror monkey mountain needle nickel oyster paddle palace parrot pearl pencil pepper pillow
pirate planet pocket potato prism puzzle quarry rabbit radio raven ribbon river rocket saddle salmon
satchel scarf shadow shelter shield silver sketch sparrow spider spirit statue stone summer sunset
thunder tiger timber tower trumpet tulip tunnel turtle valley velvet violin wagon walnut whistle willow
window winter wizard wolf yarn zebra
""".split()


@dataclass(frozen=True)
class NeedleSample:
    context: str
    question: str
    answer: str  # the full reference answer sentence
    value: str  # what a correct answer must contain
    key: str | None
    depths: tuple[float, ...]  # where each needle sits, as a fraction of the haystack
    needle_spans: tuple[tuple[int, int], ...]  # character span of each needle in `context`
    target: int  # index of the needle the question asks about


def strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's header and its license, line ends normalised."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    start = re.search(r"^\*\*\*\s*START OF.*$", text, re.MULTILINE)
    end = re.search(
        r"^\s*\*\*\*\s*END OF|^End of (the )?Project Gutenberg|^\*\*\* START: FULL LICENSE",
        text,
        re.MULTILINE | re.IGNORECASE,
    )
    return text[start.end() if start else 0 : end.start() if end else len(text)].strip()


def load_books(folder: str | Path, held_out: bool | None = None) -> dict[str, str]:
    """Books of a folder by name. held_out=True: only HELD_OUT_BOOKS; False: all but them; None: all."""
    books = {}
    for path in sorted(Path(folder).glob("*.txt")):
        if held_out is not None and (path.stem in HELD_OUT_BOOKS) != held_out:
            continue
        books[path.stem] = " ".join(strip_gutenberg(path.read_text(encoding="utf-8", errors="replace")).split())
    return books


class Haystacks:
    """Cuts haystacks of a given token length from books and hides needles in them."""

    def __init__(self, books: dict[str, str], tokenizer) -> None:
        if not books:
            raise ValueError("no books to cut haystacks from")
        self.books = list(books.values())
        self.tokenizer = tokenizer

    def cut(self, rng: random.Random, tokens: int) -> str:
        """About `tokens` tokens of text from a random book, starting and ending at word boundaries."""
        book = rng.choice(self.books)
        chars = tokens * 6 + 200
        start = rng.randrange(0, max(1, len(book) - chars))
        start = book.find(" ", start) + 1
        window = book[start : start + chars]
        offsets = self.tokenizer(window, add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
            "offset_mapping"
        ]
        if len(offsets) > tokens:
            window = window[: offsets[tokens][0]]
        cut = window.rfind(" ")
        return window[:cut] if cut > 0 else window

    def sample(
        self,
        rng: random.Random,
        tokens: int,
        needles: int = 1,
        depth: float | None = None,
        passkey: bool = False,
        together: bool = False,
        keys: list[str] | None = None,
        values: list[str] | None = None,
    ) -> NeedleSample:
        """A haystack of about `tokens` tokens (needles included) with `needles` needles.

        The question asks about one needle; `depth` (0..1) places that one, the others are random, or
        with `together` right beside it (the hardest distractors: their surroundings are the same text).
        A passkey sample has one needle and the pass-key question. `keys` and `values` (one per needle) replace
        the drawn ones: a training script asks with keys from an open vocabulary and values of any length.
        """
        if values is None:
            values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in range(needles)]
        if passkey:
            needles = 1
            sentences = [PASSKEY_NEEDLE.format(value=values[0])]
            keys = [None]
        else:
            keys = rng.sample(KEYS, needles) if keys is None else list(keys)
            sentences = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
        needle_tokens = sum(len(self.tokenizer(s, add_special_tokens=False)["input_ids"]) + 1 for s in sentences)
        hay = self.cut(rng, max(8, tokens - needle_tokens))
        target = rng.randrange(needles)
        depths = [rng.random() for _ in range(needles)]
        if depth is not None:
            depths[target] = depth
        if together:
            depths = [depths[target]] * needles
        # Insert from the deepest needle up so earlier offsets stay valid.
        inserts = sorted(((_boundary(hay, d), i) for i, d in enumerate(depths)), reverse=True)
        spans: dict[int, tuple[int, int]] = {}
        for at, i in inserts:
            piece = sentences[i] if at == 0 else " " + sentences[i]
            piece = piece + " " if at == 0 else piece
            hay = hay[:at] + piece + hay[at:]
            start = at if at == 0 else at + 1
            spans = {j: (s + len(piece), e + len(piece)) if s >= at else (s, e) for j, (s, e) in spans.items()}
            spans[i] = (start, start + len(sentences[i]))
        key = keys[target]
        if passkey:
            question, answer = PASSKEY_QUESTION, PASSKEY_ANSWER.format(value=values[0])
        else:
            question, answer = QUESTION.format(key=key), ANSWER.format(key=key, value=values[target])
        return NeedleSample(
            context=hay,
            question=question,
            answer=answer,
            value=values[target],
            key=key,
            depths=tuple(depths),
            needle_spans=tuple(spans[i] for i in range(needles)),
            target=target,
        )


def _boundary(text: str, depth: float) -> int:
    """The sentence end nearest to `depth` of the text (0 = start, 1 = end)."""
    if depth <= 0:
        return 0
    at = int(depth * len(text))
    if depth >= 1 or at >= len(text):
        return len(text)
    before = text.rfind(". ", 0, at)
    after = text.find(". ", at)
    options = [p + 1 for p in (before, after) if p >= 0]
    if not options:
        return text.rfind(" ", 0, at) if text.rfind(" ", 0, at) > 0 else at
    return min(options, key=lambda p: abs(p - at))


def is_correct(answer: str, sample: NeedleSample) -> bool:
    """Exact: the answer contains the needle's 7-digit value."""
    return sample.value in answer
