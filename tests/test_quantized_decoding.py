"""Graph decoding of a KIVI cache (#20): `StaticQuantizedCache` holds and folds what the eager `QuantizedCache` does,
when it does, so the static step (run here without a graph, as the CPU allows) decodes the eager loop's tokens."""

from __future__ import annotations

import pytest
import torch
from test_core import CONTEXT, QUESTION, load
from test_reading import load as load_reading_engine

from longdoc import Full, GemFilter
from longdoc.cache import KVCache
from longdoc.decode_graph import StaticDecoder, static_capacity, unsupported_reason
from longdoc.generate import step
from longdoc.quantized import GROUP, RESIDUAL, QuantizedCache, quantized
from longdoc.static_quantized import WINDOW, StaticQuantizedCache, quantized_rows

QUANTIZED = [("full", {"kv_bits": 4}), ("full", {"kv_bits": 2}), ("gemfilter", {"top_k": 30, "kv_bits": 4}),
             ("gemfilter", {"top_k": 30, "kv_bits": 2})]  # fmt: skip


def steps_to_fold_twice(length: int) -> int:
    """Decode steps after which a cache of `length` rows has folded two groups of its own decoded rows."""
    tail = length - quantized_rows(length)
    return WINDOW - tail + GROUP + 4


def quantized_cache(length: int, bits: int, head_dim: int, generator: torch.Generator) -> QuantizedCache:
    source = KVCache(2)
    for i in range(2):
        source.update(*(torch.randn(1, 2, length, head_dim, generator=generator) for _ in range(2)), i)
    return QuantizedCache(source, bits)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("length, head_dim", [(50, 16), (307, 96), (319, 16)])
def test_static_cache_returns_the_eager_rows_as_groups_fold(bits, length, head_dim):
    """Fed the same rows, the static cache's update returns the eager cache's rows to the bit at every step (96-wide
    heads: value groups of 32 channels), through several folds, and after a warm-up step that was rewound (and one
    that folded: a prompt of 319 rows folds at its first step)."""
    generator = torch.Generator().manual_seed(length + bits)
    eager = quantized_cache(length, bits, head_dim, generator)
    steps = steps_to_fold_twice(length) + GROUP
    source = quantized_cache(length, bits, head_dim, torch.Generator().manual_seed(length + bits))
    before = source.layers[0].tensors()
    static = StaticQuantizedCache(source, static_capacity(length + steps))
    warm_up = torch.randn(2, 1, 2, 1, head_dim, generator=generator)
    static.begin_step()
    static.update(*warm_up, 0)
    static.reset(length)
    for i in range(steps):
        rows = torch.randn(2, 2, 1, 2, 1, head_dim, generator=generator)
        static.begin_step()
        for layer in range(2):
            want_keys, want_values = eager.update(*rows[layer], layer)
            keys, values = static.update(*rows[layer], layer)
            filled = length + i + 1
            assert keys.shape[-2] == values.shape[-2] == static.capacity
            assert torch.equal(keys[..., :filled, :], want_keys) and torch.equal(values[..., :filled, :], want_values)
        static.slot.add_(1)
        assert static.mask[0, 0, 0, : length + i + 1].eq(0).all() and static.mask[0, 0, 0, length + i + 1 :].lt(0).all()
    assert eager.layers[0].quantized >= quantized_rows(length) + 2 * GROUP
    for layer in range(2):
        assert all(torch.equal(a, b) for a, b in zip(static.layer(layer), eager.layer(layer), strict=True))
    # The prompt's codes are read where the source holds them, and the source is left as it was.
    assert static.layers[0].prompt_parts[0].data_ptr() == source.layers[0].key_codes.data_ptr()
    assert source.layers[0].length == length
    assert all(torch.equal(before[name], part) for name, part in source.layers[0].tensors().items())


def decode_both(doc, eager, static, steps: int, compile: bool = False) -> StaticDecoder:
    """Greedy steps of the eager loop and of the static step side by side: same logits (to float rounding), same
    tokens; the eager cache folds at least two groups of decoded rows on the way."""
    start = eager.cache.seq_length()
    decoder = StaticDecoder(doc.arch, static.cache, static.next_position, steps, capture=False, compile=compile)
    assert isinstance(decoder.cache, StaticQuantizedCache)
    token, position = int(eager.last_logits.argmax(-1)), eager.next_position
    for _ in range(steps):
        want = step(doc.arch, token, position, eager)
        got = decoder(token, position)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert int(got.argmax(-1)) == int(want.argmax(-1))
        token, position = int(want.argmax(-1)), position + 1
    assert eager.cache.layers[0].quantized >= quantized_rows(start) + 2 * GROUP
    return decoder


@pytest.mark.parametrize("method, options", QUANTIZED, ids=lambda v: v if isinstance(v, str) else v["kv_bits"])
def test_static_step_decodes_a_quantized_cache_as_the_eager_loop(tiny_model_dirs, family, method, options):
    doc = load(tiny_model_dirs[family], method, attn=None, **options)
    layout = doc.layout(CONTEXT, QUESTION)
    eager, static = doc.prefill(layout), doc.prefill(layout)
    assert isinstance(static.cache, QuantizedCache) and static.cache.bits == options["kv_bits"]
    decode_both(doc, eager, static, steps_to_fold_twice(static.cache.seq_length()))


@pytest.mark.parametrize("method", [Full(prefill_chunk=37, kv_bits=4), GemFilter(top_k=24, filter_layer=2, kv_bits=2)],
                         ids=lambda m: f"{m.name}-{m.kv_bits}")  # fmt: skip
def test_static_step_decodes_a_follow_up_over_a_quantized_reading_as_the_eager_loop(tiny_model_dirs, method):
    """A question over a stored quantized reading (a lease whose own rows are quantized when handed to decoding)."""
    doc = load_reading_engine(tiny_model_dirs["qwen2"], method)
    reading = doc.read(CONTEXT)
    layout = doc.layout(CONTEXT, QUESTION + " " + CONTEXT[:200])
    eager, static = (method.prefill(doc.arch, layout, reading=reading.cache.lease(doc.arch.device)) for _ in range(2))
    for prefilled in (eager, static):  # as the engine hands a question's cache to decoding
        prefilled.cache = quantized(prefilled.cache, method.kv_bits)
    decode_both(doc, eager, static, steps_to_fold_twice(static.cache.seq_length()))


def test_compiled_step_decodes_a_quantized_cache_as_the_eager_loop_in_one_graph(tiny_model_dirs):
    """torch.compile'd step over the static KIVI cache, folds included: the eager loop's logits, no graph break."""
    from torch._dynamo.utils import counters

    doc = load(tiny_model_dirs["qwen3"], "full", attn=None, kv_bits=4)
    layout = doc.layout(CONTEXT, QUESTION)
    eager, static = doc.prefill(layout), doc.prefill(layout)
    counters.clear()
    decode_both(doc, eager, static, steps_to_fold_twice(static.cache.seq_length()), compile=True)
    assert not counters["graph_break"]


def test_a_quantized_cache_decodes_in_the_graph_but_not_in_prompt_mode(tiny_model_dirs):
    doc = load(tiny_model_dirs["llama"], "full", attn=None, kv_bits=4)
    prefilled = doc.prefill(doc.layout(CONTEXT, QUESTION))
    assert unsupported_reason(doc.arch, prefilled.cache) == "graphs need CUDA, the model is on cpu"
    source = KVCache(doc.arch.num_layers)
    for i in range(doc.arch.num_layers):
        source.update(*prefilled.cache.layer(i), i)
    prompt_mode = QuantizedCache(source, 4, decoding=False)
    reason = unsupported_reason(doc.arch, prompt_mode)
    assert reason is not None and "prompt mode" in reason
    assert RESIDUAL <= prefilled.cache.seq_length() - prefilled.cache.layers[0].quantized < WINDOW
