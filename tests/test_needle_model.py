"""End to end with the bundled needle model on haystacks cut from the held-out books."""

from __future__ import annotations

import importlib.util
import random
import re
import sys
from pathlib import Path

import pytest

from longdoc import LongDoc
from longdoc.bench.needle import Haystacks, is_correct, load_books

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from needle_folder import NEEDLE_GEMFILTER  # noqa: E402  (the model card's GemFilter settings)

MODEL = ROOT / "examples" / "models" / "needle-tiny"
BOOKS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "books"

pytestmark = pytest.mark.skipif(not BOOKS.is_dir(), reason="needs ../shared/corpus/books beside the checkout")


@pytest.fixture(scope="module")
def doc() -> LongDoc:
    return LongDoc.from_pretrained(str(MODEL), method="full", device="cpu")


@pytest.fixture(scope="module")
def haystacks(doc) -> Haystacks:
    return Haystacks(load_books(BOOKS, held_out=True), doc.tokenizer)


def test_model_loads_offline_as_a_llama(doc):
    assert doc.arch.config.model_type == "llama"
    assert doc.arch.trained_window == 4096
    assert doc.arch.num_kv_heads < doc.arch.num_heads  # GQA


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_full_answers_a_3k_haystack(doc, haystacks, depth):
    sample = haystacks.sample(random.Random(f"e2e-{depth}"), 3000, needles=1, depth=depth)
    answer = doc.ask(sample.context, sample.question, max_new_tokens=32)
    assert answer.stats.tokens_in > 2900
    assert is_correct(answer.text, sample), (answer.text, sample.value)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_gemfilter_answers_a_3k_haystack_from_256_tokens(doc, haystacks, depth):
    sample = haystacks.sample(random.Random(f"e2e-{depth}"), 3000, needles=1, depth=depth)
    answer = doc.with_method("gemfilter", **NEEDLE_GEMFILTER).ask(sample.context, sample.question, max_new_tokens=32)
    assert answer.stats.tokens_kept < 400 < 2900 < answer.stats.tokens_in
    assert is_correct(answer.text, sample), (answer.text, sample.value)
    start, end = sample.needle_spans[sample.target]
    assert any(e.start <= start + len("One of") and end - 10 <= e.end for e in answer.evidence[:3])


def test_full_answers_the_pass_key(doc, haystacks):
    sample = haystacks.sample(random.Random("e2e-passkey"), 2000, passkey=True, depth=0.3)
    answer = doc.ask(sample.context, sample.question, max_new_tokens=32)
    assert is_correct(answer.text, sample), answer.text


def test_training_examples_fit_the_window_and_ask_every_needle(doc, haystacks):
    """The training script's examples: whole (no answer cut off by the window), one answer per needle."""
    spec = importlib.util.spec_from_file_location("train_needle_model", ROOT / "scripts" / "train_needle_model.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    rng = random.Random("training-examples")
    tokenizer = doc.tokenizer
    for _ in range(12):
        example = train.make_example(haystacks, tokenizer, rng, train.STAGES[-1])
        assert len(example.ids) <= train.WINDOW
        answers = [tokenizer.decode(example.ids[start:end]) for start, end in example.answers]
        answer_pattern = r"The (?:special magic number for \w+|pass key) is:? (\d{7})\.<\|end\|>"
        values = [re.fullmatch(answer_pattern, a) for a in answers]
        assert all(values), answers
        context = tokenizer.decode(example.ids[example.context_start : example.answers[0][0]])
        needles = train.NEEDLE_PATTERN.findall(context)
        if "pass key" not in context:
            assert sorted(v.group(1) for v in values) == sorted(value for _, value in needles)
            keys = [re.search(r"for (\w+) is", a).group(1) for a in answers]
            assert sorted(keys) == sorted(key for key, _ in needles)  # each answer names its own needle's key
