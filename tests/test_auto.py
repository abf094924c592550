"""method="auto", the default: gemfilter (or the profile's choice) within the trained window, homer past it."""

from __future__ import annotations

import pytest
from test_core import CONTEXT, QUESTION, load

from longdoc import Auto, GemFilter, Homer, LongDoc, LongDocError, parse_method


def test_auto_is_the_default_and_reads_with_gemfilter_within_the_window(tiny_model_dirs):
    doc = load(tiny_model_dirs["llama"], "auto", top_k=64)
    assert isinstance(LongDoc.from_pretrained(str(tiny_model_dirs["llama"]), device="cpu").method, Auto)  # the default
    answer = doc.ask(CONTEXT, QUESTION, max_new_tokens=8)
    assert answer.stats.method == "gemfilter"
    assert any(
        note.startswith("auto: gemfilter") and "fit the model's 2048-token window" for note in answer.stats.notes
    )
    plain = doc.with_method("gemfilter", top_k=64).ask(CONTEXT, QUESTION, max_new_tokens=8)
    assert answer.text == plain.text and answer.stats.tokens_kept == plain.stats.tokens_kept
    assert answer.evidence  # gemfilter's evidence


def test_auto_reads_past_the_window_with_homer(tiny_model_dirs):
    doc = load(tiny_model_dirs["llama"], "auto", max_chunk_len=512)
    long = CONTEXT * 12
    layout = doc.layout(long, QUESTION)
    assert len(layout) > doc.arch.trained_window
    answer = doc.ask(long, QUESTION, max_new_tokens=4)
    assert answer.stats.method == "homer"
    assert any(note.startswith("auto: homer") and "exceed" in note for note in answer.stats.notes)
    assert answer.stats.tokens_kept <= 512


def test_a_reading_of_an_auto_prompt_that_fits_is_gemfilters(tiny_model_dirs):
    doc = load(tiny_model_dirs["llama"], "auto", top_k=64)
    reading = doc.read(CONTEXT)
    assert isinstance(reading.method, GemFilter) and reading.tokens > 0
    answer = reading.ask(QUESTION, max_new_tokens=8)
    assert answer.stats.reading == "reused" and answer.stats.method == "gemfilter"
    assert any(note.startswith("auto: gemfilter") for note in answer.stats.notes)  # the CLI asks through readings
    assert answer.text == doc.ask(CONTEXT, QUESTION, max_new_tokens=8).text


def test_methods_that_cannot_read_past_the_window_name_auto_and_homer(tiny_model_dirs):
    doc = load(tiny_model_dirs["llama"], "full")
    with pytest.raises(LongDocError, match="use method 'auto' \\(homer past the window\\) or method 'homer'"):
        doc.ask(CONTEXT * 12, QUESTION, max_new_tokens=2)


def test_auto_options_go_to_the_methods_it_picks():
    auto = parse_method("auto", {"top_k": "64", "max_chunk_len": "300", "gemfilter.score": "softmax"})
    assert auto.within == GemFilter(top_k=64, score="softmax") and auto.beyond == Homer(max_chunk_len=300)
    assert parse_method("auto", {"within": "full"}).within.name == "full"
    with pytest.raises(LongDocError, match="method 'auto' has no option keys: neither gemfilter nor homer has it"):
        parse_method("auto", {"keys": "3"})
    with pytest.raises(LongDocError, match="cannot read past the trained window"):
        parse_method("auto", {"beyond": "full"})


@pytest.mark.parametrize("method", ["auto", "full", "gemfilter", "homer", "snapkv", "streaming", "rag"])
def test_every_method_gives_evidence_or_says_why_none(tiny_model_dirs, method):
    options = {"max_chunk_len": 300} if method == "homer" else {}
    answer = load(tiny_model_dirs["llama"], method, **options).ask(CONTEXT, QUESTION, max_new_tokens=2)
    assert answer.evidence or any("no evidence" in note for note in answer.stats.notes)
    if method == "full":
        assert not answer.evidence and "full: no evidence spans, it keeps every token" in answer.stats.notes
