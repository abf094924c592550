"""kv_bits on readings (#20): the stored and saved reading is quantized, and a follow-up still equals the one-shot
answer, because a one-shot answer computes its document part as the same quantized reading."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_reading import CONTEXT, QUESTIONS, STUFF_SYSTEM, load, one_shot
from tiny_models import build_model

from longdoc import Full, GemFilter, LongDoc, LongDocError
from longdoc.cache import KVCache
from longdoc.quantized import GROUP, PARTS, RESIDUAL, QuantizedCache, quantized_bytes

QUANTIZED = [
    Full(prefill_chunk=37, kv_bits=4),
    Full(prefill_chunk=37, kv_bits=2),
    GemFilter(top_k=24, filter_layer=2, prefill_chunk=29, kv_bits=4),
    GemFilter(top_k=24, filter_layer=2, prefill_chunk=29, kv_bits=2),
]


def label(method) -> str:
    return f"{method.name}-{method.kv_bits}"


@pytest.mark.parametrize("method", QUANTIZED, ids=label)
def test_quantized_follow_ups_equal_one_shot_answers(tiny_model_dirs, family, method):
    path = tiny_model_dirs[family]
    doc = load(path, method)
    reading = doc.read(CONTEXT)
    assert isinstance(reading.cache.cache, QuantizedCache) and reading.nbytes == doc.reading_bytes(
        method, reading.tokens
    )
    # The last question is long enough that handing its cache to decoding quantizes some of its own rows.
    for question in (*QUESTIONS[:2], QUESTIONS[1] + " " + CONTEXT[:300]):
        got = reading.ask(question, max_new_tokens=12)
        want = one_shot(path, method, question, max_new_tokens=12)
        assert got.text == want.text
        assert [e.start for e in got.evidence] == [e.start for e in want.evidence]
        assert (got.stats.reading, want.stats.reading) == ("reused", "read")
        assert got.stats.reading_bytes == want.stats.reading_bytes == reading.nbytes
        assert got.stats.cache_bytes == want.stats.cache_bytes
        assert any("the reading is quantized too" in note for note in got.stats.notes)
    # Without the store (a reading too large to keep, or LongDoc.prefill) the method reads the document part itself:
    # the same computation, to the bit.
    layout = doc.layout(CONTEXT, QUESTIONS[0])
    alone = doc.prefill(layout, method)
    leased = method.prefill(doc.arch, layout, reading=reading.cache.lease(doc.arch.device))
    torch.testing.assert_close(alone.last_logits, leased.last_logits, atol=0, rtol=0)


def test_a_question_appends_full_precision_rows_and_decoding_quantizes_as_kivi():
    """A reading's lease with a question's rows, handed to decoding, holds the codes a KIVI cache of the whole prompt
    would: the reading's groups, then the question's rows quantized from their full-precision values."""
    generator = torch.Generator().manual_seed(0)
    reading_rows, question_rows, d = 421, 150, 96
    keys, values = (torch.randn(1, 2, reading_rows + question_rows, d, generator=generator) for _ in range(2))
    whole = KVCache(1)
    whole.update(keys, values, 0)
    head = KVCache(1)
    head.update(keys[..., :reading_rows, :], values[..., :reading_rows, :], 0)
    reading = QuantizedCache(head, 4, decoding=False, free=True)
    assert not head.filled(0) and reading.layers[0].quantized == (reading_rows - RESIDUAL) // GROUP * GROUP
    lease = reading.lease(torch.device("cpu"), room=8)
    got_k, got_v = lease.update(keys[..., reading_rows:, :], values[..., reading_rows:, :], 0)
    want_k, want_v = reading.layer(0)
    assert torch.equal(got_k[..., :reading_rows, :], want_k)  # the reading, dequantized
    assert torch.equal(got_v[..., reading_rows:, :], values[..., reading_rows:, :])  # the question, exact
    assert reading.layers[0].length == reading_rows  # the lease wrote only its own tail
    decoding, kivi = lease.for_decoding(), QuantizedCache(whole, 4)

    def same_parts() -> bool:
        ours, theirs = decoding.layers[0].tensors(), kivi.layers[0].tensors()
        return all(torch.equal(ours[name], theirs[name]) for name in ours)

    assert same_parts()
    for _ in range(70):  # and they stay equal as decoding appends rows and quantizes a group
        row_k, row_v = torch.randn(2, 1, 2, 1, d, generator=generator)
        for cache in (decoding, kivi):
            cache.update(row_k, row_v, 0)
        assert same_parts()
    assert decoding.layers[0].quantized > reading_rows + question_rows - RESIDUAL - GROUP


def test_reading_bytes_shrink_about_4x_at_4_bits(tmp_path):
    """A 4K-token reading of a bf16 model with 128-wide heads, as large models have."""
    path = build_model("llama", tmp_path / "wide", hidden_size=256, num_attention_heads=2, num_key_value_heads=1)
    doc = LongDoc.from_pretrained(str(path), method=Full(past_window=True), device="cpu", dtype="bfloat16")
    text = CONTEXT * 15
    sizes = {bits: doc.read(text, method=Full(past_window=True, kv_bits=bits)).nbytes for bits in (None, 8, 4, 2)}
    tokens = doc.read(text).tokens
    assert tokens > 4000
    ratios = {bits: sizes[None] / sizes[bits] for bits in (8, 4, 2)}
    assert ratios[8] > 1.7 and ratios[4] > 3.0 and ratios[2] > 4.7, ratios
    assert all(sizes[bits] == doc.reading_bytes(Full(kv_bits=bits), tokens) for bits in sizes)
    # Long readings approach KIVI's own ratio: 3.5x at 4 bits for a 32K-token reading of 128-wide bf16 heads.
    assert 32768 * 256 * 2 / quantized_bytes(32768, 128, 128, 4, 2) > 3.5
    gemfilter = GemFilter(filter_layer=1, past_window=True)  # layer 0's keys and values, layer 1's keys
    kept = doc.read(text, method=gemfilter).nbytes
    assert kept / doc.read(text, method=replace(gemfilter, kv_bits=4)).nbytes > 3.0


@pytest.mark.parametrize("method", [QUANTIZED[0], QUANTIZED[3]], ids=label)
def test_saved_quantized_reading_round_trip_and_refusals(tiny_model_dirs, tmp_path, method):
    from safetensors import safe_open

    path = tiny_model_dirs["phi3"]  # 16-wide heads: value groups of 16 channels
    doc = load(path, method)
    reading = doc.read(CONTEXT)
    reading.save(tmp_path / "r")
    with safe_open(str(tmp_path / "r" / "reading.safetensors"), "pt") as saved:
        names = set(saved.keys())
        assert saved.get_tensor("key_codes.0").dtype == torch.uint8 and "keys.0" not in names
    assert {f"{name}.0" for name in (*PARTS, "tail_keys", "tail_values")} <= names
    assert json.loads((tmp_path / "r" / "reading.json").read_text())["kv_bits"] == method.kv_bits
    loaded = load(path, Full()).load_reading(tmp_path / "r", method=method)
    assert loaded.nbytes == reading.nbytes
    for question in QUESTIONS[:2]:
        got = loaded.ask(question, max_new_tokens=10)
        assert got.text == one_shot(path, method, question, max_new_tokens=10).text
        assert got.stats.reading == "reused"
    other = 2 if method.kv_bits == 4 else 4
    for wrong, said in ((replace(method, kv_bits=other), other), (replace(method, kv_bits=None), None)):
        with pytest.raises(LongDocError, match=f"made with kv_bits {method.kv_bits}, not {said}; read the document"):
            doc.load_reading(tmp_path / "r", method=wrong)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "r" / "reading.safetensors"))
    tensors["key_step.1"] = tensors["key_step.1"][..., :1, :].contiguous()  # codes that no longer fit their steps
    save_file(tensors, str(tmp_path / "r" / "reading.safetensors"))
    with pytest.raises(LongDocError, match=r"damaged \(layer 1\)"):
        doc.load_reading(tmp_path / "r", method=method)


def test_unquantized_readings_are_unchanged(tiny_model_dirs, tmp_path):
    """kv_bits=None: a full-precision KVCache whose first lease shares the buffers, saved as keys and values."""
    from safetensors import safe_open

    doc = load(tiny_model_dirs["qwen2"], Full())
    reading = doc.read(CONTEXT)
    cache = reading.cache.cache
    assert type(cache) is KVCache and reading.nbytes == doc.reading_bytes(Full(), reading.tokens)
    lease = reading.cache.lease(doc.arch.device)
    assert type(lease) is KVCache and lease.keys[0] is cache.keys[0]
    reading.cache.release()
    reading.save(tmp_path / "r")
    with safe_open(str(tmp_path / "r" / "reading.safetensors"), "pt") as saved:
        assert set(saved.keys()) == {"ids"} | {f"{p}.{i}" for p in ("keys", "values") for i in range(4)}
    assert json.loads((tmp_path / "r" / "reading.json").read_text())["kv_bits"] is None


def test_interleaved_streams_on_a_quantized_reading(tiny_model_dirs):
    """Leases share the reading's codes and write only their own tails: two questions at once are both exact."""
    path = tiny_model_dirs["qwen3"]
    method = QUANTIZED[1]
    reading = load(path, method).read(CONTEXT)
    a, b = reading.stream(QUESTIONS[0], max_new_tokens=10), reading.stream(QUESTIONS[1], max_new_tokens=10)
    text_a, text_b = "".join(a), "".join(b)
    assert text_a == one_shot(path, method, QUESTIONS[0], max_new_tokens=10).text
    assert text_b == one_shot(path, method, QUESTIONS[1], max_new_tokens=10).text
    moved = reading.cache.cache.to("cpu")  # what the store does to a reading it moves to host memory
    layout = reading.engine.layout(CONTEXT, QUESTIONS[0])
    here = method.prefill(reading.engine.arch, layout, reading=reading.cache.lease(reading.engine.arch.device))
    there = method.prefill(reading.engine.arch, layout, reading=moved.lease(reading.engine.arch.device, 16))
    torch.testing.assert_close(here.last_logits, there.last_logits, atol=0, rtol=0)


def test_a_grown_chat_reads_a_quantized_reading_again(tiny_model_dirs):
    """Extending a quantized reading would attend to dequantized rows, not equal to a fresh reading up to rounding:
    a grown chat is read from the start instead, and equals the one-shot answer."""
    path = tiny_model_dirs["mistral"]
    method = QUANTIZED[2]
    doc = load(path, method)
    turn1 = [("system", STUFF_SYSTEM.format(context=CONTEXT)), ("human", QUESTIONS[0])]
    first = doc.ask_prompt(turn1, max_new_tokens=8)
    turn2 = [*turn1, ("ai", first.text or "I do not know."), ("human", QUESTIONS[1] + " " + CONTEXT[:400])]
    second = doc.ask_prompt(turn2, max_new_tokens=8)
    assert (first.stats.reading, second.stats.reading) == ("read", "read")
    assert second.text == load(path, method).ask_prompt(turn2, max_new_tokens=8).text


def test_every_lease_counts_until_released_and_a_load_out_of_memory_says_so(tiny_model_dirs, tmp_path, monkeypatch):
    """The store leaves a reading in place while any question over it streams, quantized or not; running out of
    memory while loading a saved reading is the library's one-line error, not 'damaged'."""
    import longdoc.api as api

    path = tiny_model_dirs["llama"]
    for method in (Full(), Full(kv_bits=4)):
        doc = load(path, method)
        reading = doc.read(CONTEXT)
        held = reading.cache
        first, second = held.lease("cpu"), held.lease("cpu")
        assert first is not None and second is not None and held.leases == 2
        held.release()
        assert held.in_use
        held.release()
        assert not held.in_use
    reading.save(tmp_path / "r")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(api, "load_saved", out_of_memory)
    with pytest.raises(LongDocError, match="out of GPU memory while loading the saved reading"):
        doc.load_reading(tmp_path / "r", method=Full(kv_bits=4))
