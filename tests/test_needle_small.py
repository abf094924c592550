"""The second bundled model, needle-small: its prompt's last token finds the needle (GemFilter's premise), any key."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from longdoc import LongDoc
from longdoc.bench.needle import QUESTION, Haystacks, is_correct, load_books

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "needle-small"
BOOKS = next(
    (b for b in (r / "shared" / "corpus" / "books" for r in ROOT.parents[:2]) if b.is_dir()),
    ROOT.parent / "shared" / "corpus" / "books",
)
needs_books = pytest.mark.skipif(not BOOKS.is_dir(), reason="needs ../shared/corpus/books beside the checkout")


@pytest.fixture(scope="module")
def doc() -> LongDoc:
    return LongDoc.from_pretrained(str(MODEL), method="full", device="cpu")


def test_the_readme_haystack_with_the_profile(doc):
    """The profile's method (gemfilter at layer 6, `longdoc tune`'s choice) answers the README demo, value first."""
    text = (ROOT / "examples" / "haystack.txt").read_text(encoding="utf-8")
    answer = doc.with_method("auto").ask(text, QUESTION.format(key="beacon"), max_new_tokens=16)
    assert answer.text.startswith("2867825."), answer.text


@needs_books
def test_the_last_prompt_token_attends_to_the_needle(doc):
    """GemFilter's premise: at layer 2 the prompt's last token puts most of its attention on the needle sentence."""
    hay = Haystacks(load_books(BOOKS, held_out=True), doc.tokenizer)
    sample = hay.sample(random.Random("premise"), 600, needles=1, depth=0.5)
    layout = doc.layout(sample.context, sample.question)
    start, end = sample.needle_spans[0]
    rows = [layout.prefix_len + i for i, (a, b) in enumerate(layout.context_offsets) if a >= start and b <= end]
    model = doc.model
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # only eager attention returns its weights
    try:
        with torch.no_grad():
            out = model(layout.input_ids(), output_attentions=True)
    finally:
        model.config._attn_implementation = previous
    on_needle = out.attentions[2][0, :, -1, rows].sum(-1)  # each head's share of attention on the needle
    assert on_needle.mean() > 0.5, on_needle


@needs_books
def test_with_four_needles_the_asked_one_is_the_strongest_evidence(doc):
    """The profile's gemfilter layer is tune's by grounded answers: among four needles it ranks the asked one first
    (layers 2-4 keep all four and rank it first about half the time: the model's card)."""
    from longdoc.bench.evaluate import needle_records

    hay = Haystacks(load_books(BOOKS, held_out=True), doc.tokenizer)
    records = needle_records(doc.with_method("gemfilter"), hay, length=2000, needles=4, samples=4, seed=7)
    assert [(r["correct"], r["evidence_rank"]) for r in records] == [(True, 0)] * 4, records


@needs_books
def test_a_two_word_key_it_never_saw_and_a_ten_digit_value(doc):
    hay = Haystacks(load_books(BOOKS, held_out=True), doc.tokenizer)
    sample = hay.sample(random.Random("open"), 1500, needles=1, keys=["velvet harbor"], values=["4817263590"])
    answer = doc.ask(sample.context, sample.question, max_new_tokens=16)
    assert is_correct(answer.text, sample) and answer.text.startswith("4817263590."), answer.text


@needs_books
def test_homer_answers_past_the_trained_window(doc):
    """HOMER with the profile (calibrated merges) finds a needle in 8,192 tokens, twice the model's 4,096 window."""
    hay = Haystacks(load_books(BOOKS, held_out=True), doc.tokenizer)
    sample = hay.sample(random.Random("past the window"), 8192, needles=1, depth=0.5)
    assert doc.layout(sample.context, sample.question).input_ids().shape[1] > 8192
    answer = doc.with_method("homer").ask(sample.context, sample.question, max_new_tokens=16)
    assert is_correct(answer.text, sample), answer.text
