"""A folder of documents with a needle in one of them, cut from a held-out corpus book (shared by the examples)."""

from __future__ import annotations

import random
from pathlib import Path

from longdoc.bench.needle import NEEDLE, QUESTION, Haystacks, load_books

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "needle-tiny"  # the end-to-end tests' model
# The README demo's model, which the examples use: its needle is the strongest evidence (needle-tiny ranks it lower).
DEMO_MODEL = ROOT / "examples" / "models" / "needle-small"
# The held-out books beside the checkout (a git worktree under wt/ finds them one level further up).
BOOKS = next(
    (b for b in (r / "shared" / "corpus" / "books" for r in ROOT.parents[:2]) if b.is_dir()),
    ROOT.parent / "shared" / "corpus" / "books",
)
# GemFilter settings for the bundled needle model (see its model card).
NEEDLE_GEMFILTER = dict(top_k=256, filter_layer=7, score="softmax", pool_kernel=41, query_tokens=16)
KEY, VALUE = "lantern", "4071936"
QUESTION_TEXT = QUESTION.format(key=KEY)
NEEDLE_TEXT = NEEDLE.format(key=KEY, value=VALUE)


def require_books(books: Path = BOOKS) -> None:
    """One line, before any model loads, when the corpus books are not there."""
    if not books.is_dir():
        raise SystemExit(f"the examples cut their documents from the corpus books, not found at {books}")


def write_folder(folder: Path, tokenizer, books: Path = BOOKS) -> Path:
    """chapter-1.txt (no needle) and chapter-2.txt (the needle halfway), about 1,200 tokens each."""
    require_books(books)
    haystacks = Haystacks(load_books(books, held_out=True), tokenizer)
    rng = random.Random("example-folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chapter-1.txt").write_text(haystacks.cut(rng, 1200), encoding="utf-8")
    text = haystacks.cut(rng, 1200)
    middle = text.find(". ", len(text) // 2) + 2
    (folder / "chapter-2.txt").write_text(text[:middle] + NEEDLE_TEXT + " " + text[middle:], encoding="utf-8")
    return folder
