"""The static-capacity cache and decode step that CUDA graphs capture, checked on the CPU without a graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_core import CONTEXT, QUESTION, load

from longdoc.attention import decode_attention, decode_chunk, math_masked_attention_with_lse, split_kv_attention
from longdoc.cache import KVCache
from longdoc.decode_graph import StaticCache, StaticDecoder, static_capacity, unsupported_reason
from longdoc.generate import GenerationConfig, generate_tokens, step

METHODS = [("full", {}), ("gemfilter", {"top_k": 30}), ("homer", {"max_chunk_len": 300, "warmup_layers": 1}),
           ("snapkv", {"top_k": 30})]  # fmt: skip


def filled_cache(lengths: list[int], kv_heads: int = 2, head_dim: int = 4) -> KVCache:
    cache = KVCache(len(lengths))
    for i, length in enumerate(lengths):
        cache.update(torch.randn(1, kv_heads, length, head_dim), torch.randn(1, kv_heads, length, head_dim), i)
    return cache


def test_static_cache_writes_at_the_slot_and_masks_the_unwritten_slots():
    source = filled_cache([5, 5])
    cache = StaticCache(source, capacity=8)
    minimum = torch.finfo(torch.float32).min
    for i in range(2):
        torch.testing.assert_close(cache.keys[i][..., :5, :], source.layer(i)[0], rtol=0, atol=0)
        assert cache.keys[i].shape[-2] == 8 and not cache.keys[i][..., 5:, :].any()
    assert cache.mask[0, 0, 0].tolist() == [0] * 5 + [minimum] * 3

    new_keys, new_values = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    cache.begin_step()
    keys, values = cache.update(new_keys, new_values, 1)
    assert keys.shape[-2] == 8 and keys.data_ptr() == cache.keys[1].data_ptr()
    torch.testing.assert_close(keys[..., 5:6, :], new_keys, rtol=0, atol=0)
    torch.testing.assert_close(values[..., 5:6, :], new_values, rtol=0, atol=0)
    assert cache.mask[0, 0, 0].tolist() == [0] * 6 + [minimum] * 2

    cache.reset(5)
    assert cache.slot.tolist() == [5] and cache.mask[0, 0, 0].tolist() == [0] * 5 + [minimum] * 3


@pytest.mark.parametrize("needed", [1, 300, 1312, 4097, 8448, 33024, 131328])
def test_static_capacity_splits_into_equal_chunks(needed):
    capacity = static_capacity(needed)
    chunk = decode_chunk(capacity)
    assert needed <= capacity < needed + chunk
    assert capacity % chunk == 0 and capacity // chunk <= 128


def test_coarse_capacities_are_few_and_at_most_a_quarter_larger():
    """A compiled step is compiled per capacity: follow-ups of one reading must land on the same one."""
    needs = range(1000, 140_000, 97)
    capacities = [static_capacity(n, coarse=True) for n in needs]
    for needed, capacity in zip(needs, capacities, strict=True):
        chunk = decode_chunk(capacity)
        assert needed <= capacity <= max(1024, needed * 1.25) + chunk and capacity % chunk == 0
    assert len(set(capacities)) <= 4 * 8 + 1  # four per doubling from 1K to 128K
    assert static_capacity(4000, coarse=True) == static_capacity(4090, coarse=True)


def test_past_torchs_recompile_limit_the_compiled_step_is_refused_not_silently_uncompiled(monkeypatch):
    import longdoc.decode_graph as decode_graph

    monkeypatch.setattr(decode_graph, "COMPILED_CAPACITIES", {1024 * (i + 1) for i in range(8)})
    assert decode_graph.compile_refusal(2048) is None  # compiled already: reused
    assert "8 cache sizes are compiled already" in decode_graph.compile_refusal(1536)
    monkeypatch.setattr(decode_graph, "COMPILED_CAPACITIES", set())
    assert decode_graph.compile_refusal(1536) is None


@pytest.mark.parametrize("filled", [1, 256 + 7, 3 * 256])
def test_split_kv_join_equals_one_masked_softmax(filled):
    """Pieces joined by log-sum-exps equal one softmax over the buffer, also with whole pieces masked."""
    query = torch.randn(1, 2, 3, 16, dtype=torch.float64)
    key, value = torch.randn(2, 1, 2, 3 * 256, 16, dtype=torch.float64)
    mask = torch.zeros(1, 1, 1, 3 * 256, dtype=torch.float64)
    mask[..., filled:] = torch.finfo(torch.float64).min
    got = split_kv_attention(query, key, value, mask, 0.25, 256, math_masked_attention_with_lse)
    want = F.scaled_dot_product_attention(query, key[..., :filled, :], value[..., :filled, :], scale=0.25)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("visible", [1, 77, 300])
def test_decode_attention_reads_only_the_visible_slots(visible):
    """The op graph decoding calls: attention over the first `visible` slots, whatever finite values the others
    hold (the static buffers start as zeros; the CUDA kernel does not read them at all)."""
    query = torch.randn(1, 6, 1, 16, dtype=torch.float64)
    key, value = torch.randn(2, 1, 2, 300, 16, dtype=torch.float64)
    poisoned_key, poisoned_value = key.clone(), value.clone()
    poisoned_key[..., visible:, :], poisoned_value[..., visible:, :] = 1e6, -1e6
    got = decode_attention(query, poisoned_key, poisoned_value, torch.tensor([visible]), 0.25)
    want = F.scaled_dot_product_attention(
        query, key[..., :visible, :], value[..., :visible, :], scale=0.25, enable_gqa=True
    )
    torch.testing.assert_close(got, want)


def test_the_decode_step_tells_attention_how_many_slots_it_sees(tiny_model_dirs, monkeypatch):
    """Every layer's attention in a static step gets `visible_keys` = the slot being fed + 1."""
    import longdoc.attention as attention
    import longdoc.cache as cache

    seen = []
    real = attention.decode_attention

    def spy(query, key, value, visible, scale):
        seen.append((int(visible), key.shape[2]))
        return real(query, key, value, visible, scale)

    monkeypatch.setattr(attention, "decode_attention", spy)  # the model's own layers' path (causal_sdpa)
    monkeypatch.setattr(cache, "decode_attention", spy)  # Arch.decode_layer's, through StaticSlots.attend
    doc = load(tiny_model_dirs["llama"], "full", attn=None)
    prefilled = doc.prefill(doc.layout(CONTEXT, QUESTION))
    length = prefilled.cache.seq_length()
    decoder = StaticDecoder(doc.arch, prefilled.cache, prefilled.next_position, max_steps=3, capture=False)
    for i in range(2):
        decoder(5, prefilled.next_position + i)
    capacity = decoder.cache.capacity
    assert seen == [(length + 1, capacity)] * doc.arch.num_layers + [(length + 2, capacity)] * doc.arch.num_layers


def storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a model's parameters (views of one storage count once)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def test_fused_projections_share_the_models_storage_and_change_no_prefill(tiny_model_dirs, family):
    """Stacking q|k|v and gate|up re-points the model's weights at rows of one matrix: no second copy of the
    weights, and the model's own layers (every prefill) compute exactly as before."""
    doc = load(tiny_model_dirs[family], "full", attn=None)
    layout = doc.layout(CONTEXT, QUESTION)
    before = doc.prefill(layout).last_logits
    total = storage_bytes(doc.model)
    fused = doc.arch.fused_layers()
    assert fused is not None and len(fused) == doc.arch.num_layers
    attn, mlp = doc.arch.layers[0].self_attn, doc.arch.layers[0].mlp
    first_input = attn.qkv_proj if family == "phi3" else attn.q_proj
    first_hidden = mlp.gate_up_proj if family == "phi3" else mlp.gate_proj
    assert first_input.weight.data_ptr() == fused[0].qkv.data_ptr()
    assert first_hidden.weight.data_ptr() == fused[0].gate_up.data_ptr()
    assert storage_bytes(doc.model) == total
    assert torch.equal(doc.prefill(layout).last_logits, before)


def test_fused_projections_follow_weights_replaced_after_they_were_stacked(tiny_model_dirs):
    """A model cast after its projections were stacked decodes from its new weights, not the stale stack."""
    doc = load(tiny_model_dirs["llama"], "full", attn=None)
    doc.arch.fused_layers()
    doc.model.to(torch.float64)
    fused = doc.arch.fused_layers()
    assert fused[0].qkv.dtype == torch.float64
    assert fused[0].qkv.data_ptr() == doc.arch.layers[0].self_attn.q_proj.weight.data_ptr()


def test_decoding_keeps_the_models_own_layers_under_another_attention_implementation(tiny_model_dirs):
    doc = load(tiny_model_dirs["llama"], "full", attn="sdpa")
    assert doc.arch.fused_layers() is None


@pytest.mark.parametrize("method, options", METHODS)
def test_static_step_decodes_as_the_eager_loop(tiny_model_dirs, family, method, options):
    """The tensor code a graph captures, run eagerly: same logits at every step, same greedy tokens."""
    doc = load(tiny_model_dirs[family], method, attn=None, **options)
    layout = doc.layout(CONTEXT, QUESTION)
    eager, static = doc.prefill(layout), doc.prefill(layout)
    decoder = StaticDecoder(doc.arch, static.cache, static.next_position, max_steps=12, capture=False)
    assert decoder.cache.capacity == static_capacity(static.cache.seq_length() + 12)
    token, position = int(eager.last_logits.argmax(-1)), eager.next_position
    for _ in range(12):
        want = step(doc.arch, token, position, eager)
        got = decoder(token, position)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        token, position = int(want.argmax(-1)), position + 1
    with pytest.raises(ValueError, match="past capacity"):
        decoder(token, position)


@pytest.mark.parametrize("split", [False, True])
def test_compiled_step_decodes_as_the_eager_loop_in_one_graph(tiny_model_dirs, monkeypatch, split):
    """torch.compile'd step (what `compile_decode` captures): the eager loop's logits, with no graph break.

    `split` takes the GPU's split-KV attention path on the CPU (the math stands in for the CUDA kernel).
    """
    from torch._dynamo.utils import counters

    import longdoc.attention as attention

    if split:
        monkeypatch.setattr(attention, "efficient_lse_usable", lambda query, key: True)
        monkeypatch.setattr(attention, "efficient_attention_with_lse", math_masked_attention_with_lse)
    doc = load(tiny_model_dirs["qwen3"], "gemfilter", attn=None, top_k=30)
    layout = doc.layout(CONTEXT, QUESTION)
    eager, static = doc.prefill(layout), doc.prefill(layout)
    counters.clear()
    decoder = StaticDecoder(doc.arch, static.cache, static.next_position, max_steps=6, capture=False, compile=True)
    assert decoder.cache.capacity == static_capacity(static.cache.seq_length() + 6, coarse=True)
    token, position = int(eager.last_logits.argmax(-1)), eager.next_position
    for _ in range(6):
        want = step(doc.arch, token, position, eager)
        torch.testing.assert_close(decoder(token, position), want, atol=1e-4, rtol=1e-4)
        token, position = int(want.argmax(-1)), position + 1
    assert not counters["graph_break"]


def test_decoding_on_the_cpu_stays_eager_and_adds_no_note(tiny_model_dirs):
    doc = load(tiny_model_dirs["llama"], "full", attn=None)
    prefilled = doc.prefill(doc.layout(CONTEXT, QUESTION))
    assert unsupported_reason(doc.arch, prefilled.cache) == "graphs need CUDA, the model is on cpu"
    notes: list[str] = []
    tokens = list(generate_tokens(doc.arch, prefilled, GenerationConfig(max_new_tokens=4), (), notes=notes))
    assert len(tokens) == 4 and notes == []


def test_reasons_for_decoding_eagerly(tiny_model_dirs):
    doc = load(tiny_model_dirs["llama"], "full", attn=None)
    uneven = filled_cache([5, 4, 5, 5])
    assert unsupported_reason(doc.arch, uneven) == "the cache's layers hold different lengths ([4, 5])"
    doc.arch.attn_implementation = "flash_attention_2"
    assert unsupported_reason(doc.arch, filled_cache([5] * 4)) == "attention 'flash_attention_2' takes no length mask"
