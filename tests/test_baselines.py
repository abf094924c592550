"""Peer baselines (snapkv, streaming, rag): each against a naive reference, and equal to full keeping everything."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_core import CONTEXT, QUESTION, greedy_ids, load
from transformers import AutoModelForCausalLM

from longdoc.bench.needle import Haystacks, load_books

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "books"
NEEDLE_MODEL = Path(__file__).resolve().parents[1] / "examples" / "models" / "needle-tiny"


@pytest.mark.parametrize("method", ["snapkv", "streaming", "rag"])
def test_keeping_everything_equals_full(tiny_model_dirs, family, method):
    full = load(tiny_model_dirs[family], "full")
    ids_full, layout, _ = greedy_ids(full)
    ids, _, prefilled = greedy_ids(full.with_method(method, top_k=len(layout)))
    assert prefilled.tokens_kept == len(layout)
    assert ids == ids_full


def test_snapkv_keeps_the_keys_a_naive_reference_picks(tiny_model_dirs):
    """Reference: eager softmax weights of the whole prompt, per layer, as SnapKV's paper describes."""
    path = tiny_model_dirs["qwen2"]  # GQA: 4 query heads share each of 2 KV heads
    doc = load(path, "snapkv", attn="eager", top_k=40, window=8)
    layout = doc.layout(CONTEXT, QUESTION)
    prefilled = doc.prefill(layout)
    full = load(path, "full", attn="eager")
    full_cache = full.prefill(layout).cache

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = model(layout.input_ids(), output_attentions=True).attentions
    n, p, w = len(layout), layout.prefix_len, 8
    kv_heads = model.config.num_key_value_heads
    for layer, weights in enumerate(attentions):
        votes = weights[0, :, n - w :, :].sum(1)  # (heads, n): the window's attention, summed over its rows
        votes = votes.view(kv_heads, -1, n).mean(1)[:, : n - w]  # mean over each KV head's query heads
        pooled = F.avg_pool1d(votes, 5, stride=1, padding=2)[:, p:]  # pooled first, then the prefix cut (kvpress)
        for head in range(kv_heads):
            chosen = pooled[head].topk(40).indices.sort().values + p
            expected = torch.cat([torch.arange(p), chosen, torch.arange(n - w, n)])
            keys_full, values_full = full_cache.layer(layer)
            keys, values = prefilled.cache.layer(layer)
            torch.testing.assert_close(keys[0, head], keys_full[0, head, expected])
            torch.testing.assert_close(values[0, head], values_full[0, head, expected])
    assert prefilled.tokens_kept == p + 40 + w
    assert prefilled.next_position == n


def test_streaming_keeps_sinks_and_the_recent_window(tiny_model_dirs):
    doc = load(tiny_model_dirs["llama"], "streaming", top_k=30)
    layout = doc.layout(CONTEXT, QUESTION)
    prefilled = doc.prefill(layout)
    full_cache = doc.with_method("full").prefill(layout).cache
    n, p, c = len(layout), layout.prefix_len, layout.context_len
    sinks = max(0, 4 - p)
    expected = torch.cat([torch.arange(p + sinks), torch.arange(p + c - 30, n)])
    for layer in range(doc.arch.num_layers):
        torch.testing.assert_close(prefilled.cache.layer(layer)[0], full_cache.layer(layer)[0][:, :, expected])
    assert prefilled.kept_context.tolist() == list(range(sinks)) + list(range(c - 30, c))
    assert prefilled.next_position == n


@pytest.mark.skipif(not BOOKS.is_dir(), reason="needs ../shared/corpus/books beside the checkout")
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_rag_keeps_the_passage_that_holds_the_needle(depth):
    from longdoc import LongDoc

    doc = LongDoc.from_pretrained(str(NEEDLE_MODEL), method="rag", device="cpu", top_k=256)
    sample = Haystacks(load_books(BOOKS, held_out=True), doc.tokenizer).sample(
        random.Random(f"rag-{depth}"), 3000, needles=4, depth=depth
    )
    layout = doc.layout(sample.context, sample.question)
    prefilled = doc.prefill(layout)
    start, end = sample.needle_spans[sample.target]
    needle_tokens = [i for i, (a, b) in enumerate(layout.context_offsets) if a >= start and b <= end]
    kept = set(prefilled.kept_context.tolist())
    value_tokens = [i for i in needle_tokens if layout.context_text[layout.context_offsets[i][0]].isdigit()]
    assert set(value_tokens) <= kept  # the asked value survives (a passage may cut the sentence's start)
    assert prefilled.tokens_kept <= layout.prefix_len + 256 + layout.suffix_len
