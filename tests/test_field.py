"""The rest of the field on the same engine: KIVI's cache quantization (kv_bits), H2O and LLMLingua-style lingua."""

from __future__ import annotations

import pytest
import torch
from test_core import CONTEXT, QUESTION, greedy_ids, load
from transformers import AutoModelForCausalLM

from longdoc import LongDocError
from longdoc.cache import KVCache
from longdoc.generate import step
from longdoc.methods import Full, GemFilter, parse_method, split_label
from longdoc.methods import h2o as h2o_module
from longdoc.methods.lingua import _sentences
from longdoc.quantized import GROUP, RESIDUAL, QuantizedCache, QuantizedLayer, quantized


def test_kv_bits_off_is_todays_cache(tiny_model_dirs):
    doc = load(tiny_model_dirs["llama"], "full")
    ids, layout, today = greedy_ids(doc)
    ids_off, _, off = greedy_ids(doc.with_method("full", kv_bits="none"))
    assert type(off.cache) is KVCache and quantized(off.cache, None) is off.cache
    assert torch.equal(off.last_logits, today.last_logits) and ids_off == ids
    for i in range(off.cache.num_layers):
        assert all(torch.equal(a, b) for a, b in zip(off.cache.layer(i), today.cache.layer(i), strict=True))


def _bound_holds(rows: torch.Tensor, original: torch.Tensor, step: torch.Tensor) -> None:
    """|x - x'| <= step / 2 plus the dtype's rounding of x'."""
    eps = torch.finfo(original.dtype).eps
    error = (rows.float() - original.float()).abs()
    assert (error <= step.float() / 2 + original.float().abs() * eps + 1e-6).all(), error.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trip_error_stays_within_the_scheme_bound(bits, dtype):
    """Keys per channel over GROUP tokens, values per token over channel groups, the recent rows exact,
    after a prefill and after decoding appends one row at a time."""
    generator = torch.Generator().manual_seed(bits)
    d = 96  # Phi-3's head width: value groups of 32 channels
    keys = torch.randn(1, 2, 517, d, generator=generator) * torch.linspace(0.1, 20, d)  # outlier channels
    values = torch.randn(1, 2, 517, d, generator=generator)
    more_k, more_v = torch.randn(1, 2, 150, d, generator=generator), torch.randn(1, 2, 150, d, generator=generator)
    keys, values, more_k, more_v = (t.to(dtype) for t in (keys, values, more_k, more_v))
    layer = QuantizedLayer(keys, values, bits)
    for new in range(more_k.shape[-2] + 1):
        if new in (0, more_k.shape[-2]):
            all_k = torch.cat([keys, more_k[..., :new, :]], -2)
            all_v = torch.cat([values, more_v[..., :new, :]], -2)
            n, q = all_k.shape[-2], layer.quantized
            assert layer.length == n and q % GROUP == 0 and RESIDUAL <= n - q < RESIDUAL + GROUP
            got_k, got_v = torch.empty_like(all_k), torch.empty_like(all_v)
            layer.dequantize_into(got_k, got_v)
            assert torch.equal(got_k[..., q:, :], all_k[..., q:, :]) and torch.equal(
                got_v[..., q:, :], all_v[..., q:, :]
            )
            key_step = layer.key_step.repeat_interleave(GROUP, dim=-2)  # per channel, one step per GROUP tokens
            value_step = layer.value_step.repeat_interleave(layer.group, dim=-1)  # per token, one per channel group
            _bound_holds(got_k[..., :q, :], all_k[..., :q, :], key_step)
            _bound_holds(got_v[..., :q, :], all_v[..., :q, :], value_step)
        if new < more_k.shape[-2]:
            layer.append(more_k[..., new : new + 1, :], more_v[..., new : new + 1, :])


def test_cache_bytes_shrink_about_4x_at_4_bits():
    """A 16K-token layer of Llama-3.1-8B's shape in bf16 (8 KV heads of 128)."""
    cache = KVCache(1)
    cache.update(
        torch.randn(1, 8, 16384, 128, dtype=torch.bfloat16), torch.randn(1, 8, 16384, 128, dtype=torch.bfloat16), 0
    )
    ratios = {bits: cache.nbytes() / QuantizedCache(cache, bits).nbytes() for bits in (8, 4, 2)}
    assert ratios[8] > 1.85 and ratios[4] > 3.4 and ratios[2] > 6.0, ratios


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_quantized_decoding_follows_the_full_cache(tiny_model_dirs, family):
    doc = load(tiny_model_dirs[family], "full")
    layout = doc.layout(CONTEXT, QUESTION)
    token = int(doc.prefill(layout).last_logits.argmax())
    reference = step(doc.arch, token, len(layout), doc.prefill(layout))
    for bits, tolerance in ((8, 0.1), (4, 1.0)):
        prefilled = doc.prefill(layout, Full(kv_bits=bits))
        assert isinstance(prefilled.cache, QuantizedCache) and prefilled.cache.layers[0].quantized >= GROUP
        logits = step(doc.arch, token, len(layout), prefilled)
        assert (logits - reference).abs().max() < tolerance
    full, kivi = (
        doc.ask(CONTEXT, QUESTION, max_new_tokens=3),
        doc.with_method("kivi-4").ask(CONTEXT, QUESTION, max_new_tokens=3),
    )
    assert kivi.stats.cache_bytes < full.stats.cache_bytes and kivi.stats.method == "full"


def test_kv_bits_names_and_rows():
    assert parse_method("kivi-4") == Full(kv_bits=4) and parse_method("kivi-2", {"prefill_chunk": "64"}).kv_bits == 2
    assert parse_method("gemfilter", {"kv_bits": "4", "top_k": "8"}) == GemFilter(8, kv_bits=4)
    assert split_label("gemfilter+kv_bits=4") == ("gemfilter", {"kv_bits": "4"})
    with pytest.raises(LongDocError, match="kv_bits must be 8, 4 or 2"):
        parse_method("full", {"kv_bits": "3"})
    with pytest.raises(LongDocError, match="kv_bits is set by the method's name; use 'full'"):
        parse_method("kivi-4", {"kv_bits": "8"})
    with pytest.raises(LongDocError, match="NAME\\+KEY=VALUE"):
        split_label("gemfilter+kv_bits")


def test_h2o_keeping_everything_equals_full(tiny_model_dirs, family):
    full = load(tiny_model_dirs[family], "full")
    ids_full, layout, _ = greedy_ids(full)
    ids, _, prefilled = greedy_ids(full.with_method("h2o", keys_per_head=len(layout), prefill_chunk=100))
    assert prefilled.tokens_kept == len(layout) and ids == ids_full


def test_h2o_keeps_the_keys_a_naive_reference_picks(tiny_model_dirs, monkeypatch):
    """Reference: each key's column sum of the eager softmax weights of the whole prompt, summed over the
    query heads of its KV head; the last `recent` context keys always stay. Chunks of 50 prompt rows and
    a few query rows scored at a time must give the same choice."""
    monkeypatch.setattr(h2o_module, "SCORE_ELEMENTS", 4 * 4 * 400)
    path = tiny_model_dirs["qwen2"]  # GQA: 4 query heads share each of 2 KV heads
    doc = load(path, "h2o", attn="eager", keys_per_head=40, recent=8, prefill_chunk=50)
    layout = doc.layout(CONTEXT, QUESTION)
    prefilled = doc.prefill(layout)
    full_cache = load(path, "full", attn="eager").prefill(layout).cache

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = model(layout.input_ids(), output_attentions=True).attentions
    n, p, c = len(layout), layout.prefix_len, layout.context_len
    kv_heads = model.config.num_key_value_heads
    for layer, weights in enumerate(attentions):
        received = weights[0].sum(1).view(kv_heads, -1, n).sum(1)[:, p : p + c]  # (Hkv, c)
        received[:, c - 8 :] = float("inf")
        for head in range(kv_heads):
            chosen = received[head].topk(40).indices.sort().values + p
            expected = torch.cat([torch.arange(p), chosen, torch.arange(p + c, n)])
            keys_full, values_full = full_cache.layer(layer)
            keys, values = prefilled.cache.layer(layer)
            torch.testing.assert_close(keys[0, head], keys_full[0, head, expected])
            torch.testing.assert_close(values[0, head], values_full[0, head, expected])
    assert prefilled.tokens_kept == n - c + 40 and prefilled.next_position == n


def test_lingua_keeping_everything_equals_full(tiny_model_dirs, family):
    full = load(tiny_model_dirs[family], "full")
    ids_full, layout, _ = greedy_ids(full)
    ids, _, prefilled = greedy_ids(full.with_method("lingua", top_k=len(layout), segment=100))
    assert prefilled.tokens_kept == len(layout) and ids == ids_full


def test_lingua_information_and_choice_match_a_naive_reference(tiny_model_dirs):
    """-log p of each context token after [prefix | suffix | its segment] and after [prefix | its segment],
    from the model's own forward; the kept tokens are the most informative of the best sentences."""
    path = tiny_model_dirs["llama"]
    doc = load(path, "lingua", top_k=30, coarse=2.0, segment=64)
    layout = doc.layout(CONTEXT, QUESTION)
    method = doc.method
    given, alone = method.information(doc.arch, layout)
    model = doc.model
    context = layout.context_ids
    for start in range(0, len(context), 64):
        piece = context[start : start + 64]
        for lead, info in ((layout.prefix_ids + layout.suffix_ids, given), (layout.prefix_ids, alone)):
            with torch.no_grad():
                logprobs = model(torch.tensor([lead + piece])).logits[0].float().log_softmax(-1)
            expected = -logprobs[len(lead) - 1 : -1].gather(-1, torch.tensor(piece)[:, None])[:, 0]
            torch.testing.assert_close(info[start : start + len(piece)], expected, atol=1e-4, rtol=1e-4)
    sentences = _sentences(layout)
    assert (
        sum(end - first for first, end in sentences) == len(context) and len(sentences) == 30
    )  # 5 per repeat, 6 repeats
    gain = alone - given
    ranked = sorted(sentences, key=lambda s: -float(gain[s[0] : s[1]].mean()))
    coarse, used = torch.zeros(len(context), dtype=torch.bool), 0
    for first, end in ranked:
        if used >= 60:
            break
        coarse[first:end], used = True, used + end - first
    expected = given.masked_fill(~coarse, float("-inf")).topk(30).indices.sort().values
    prefilled = doc.prefill(layout)
    assert torch.equal(prefilled.kept_context, expected)
    assert prefilled.next_position == layout.prefix_len + 30 + layout.suffix_len
