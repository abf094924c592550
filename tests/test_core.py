"""Core engine: full and GemFilter prefill, decoding and the public API on every supported family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AutoModelForCausalLM

from longdoc import LongDoc, LongDocError
from longdoc.attention import chunk_after_cache, math_attention_with_lse
from longdoc.generate import GenerationConfig, generate_tokens, step

CONTEXT = (
    "It was the best of times, it was the worst of times. The pass key is 4815162. Remember it. "
    "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about. "
) * 6
QUESTION = "What is the pass key?"
GREEDY_20 = GenerationConfig(max_new_tokens=20)


def load(path, method="gemfilter", attn="sdpa", **options) -> LongDoc:
    return LongDoc.from_pretrained(str(path), method=method, device="cpu", attn_implementation=attn, **options)


def greedy_ids(doc: LongDoc, config=GREEDY_20) -> tuple[list[int], object, object]:
    layout = doc.layout(CONTEXT, QUESTION)
    prefilled = doc.prefill(layout)
    return list(generate_tokens(doc.arch, prefilled, config, eos_ids=())), layout, prefilled


def test_gemfilter_keeping_everything_equals_full_and_generate(tiny_model_dirs, family):
    path = tiny_model_dirs[family]
    full = load(path, "full")
    ids_full, layout, _ = greedy_ids(full)
    gem = full.with_method("gemfilter", top_k=len(layout))
    ids_gem, _, prefilled = greedy_ids(gem)
    assert prefilled.tokens_kept == len(layout)
    assert ids_gem == ids_full

    reference = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    prompt = layout.input_ids()
    out = reference.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
    )
    assert out[0, prompt.shape[1] :].tolist() == ids_full


def test_selection_matches_naive_attention_reference(tiny_model_dirs, family):
    """Our scores come from q.k; the naive reference from the eager softmax weights of the same layer.

    Summed over heads, log-weights equal the raw logits over sqrt(d) minus a constant per head, and an
    average pool shifts a constant by the same amount wherever its window lies inside the prompt, so the
    context ranking must be identical.
    """
    path = tiny_model_dirs[family]
    top_k, layer = 12, 2
    gem = load(path, "gemfilter", top_k=top_k, filter_layer=layer)
    layout = gem.layout(CONTEXT, QUESTION)
    prefilled = gem.prefill(layout)

    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = eager(layout.input_ids(), output_attentions=True)
    weights = out.attentions[layer][0, :, -1, :].double()  # (heads, n): last query row
    scaling = eager.model.layers[layer].self_attn.scaling
    summed = (weights.log() / scaling).sum(0)
    pooled = F.avg_pool1d(summed[None, None], 5, stride=1, padding=2)[0, 0]
    p, c = layout.prefix_len, layout.context_len
    assert p >= 2 and layout.suffix_len >= 2  # the pool windows of every context token lie inside the prompt
    reference = pooled[p : p + c].topk(top_k).indices.sort().values
    assert prefilled.kept_context.tolist() == reference.tolist()
    assert prefilled.tokens_kept == p + top_k + layout.suffix_len


def test_decoding_after_selection_matches_direct_forward(tiny_model_dirs, family):
    path = tiny_model_dirs[family]
    gem = load(path, "gemfilter", top_k=16)
    layout = gem.layout(CONTEXT, QUESTION)
    prefilled = gem.prefill(layout)
    p, c = layout.prefix_len, layout.context_len
    kept = torch.cat([torch.arange(p), p + prefilled.kept_context, torch.arange(p + c, len(layout))])
    ids = layout.input_ids()[:, kept]
    assert prefilled.next_position == ids.shape[1]

    model = gem.model
    logits, position = prefilled.last_logits, prefilled.next_position
    for _ in range(5):
        with torch.no_grad():
            direct = model(ids).logits[:, -1].float()
        torch.testing.assert_close(logits, direct, atol=1e-4, rtol=1e-4)
        token = int(direct.argmax(-1))
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
        logits = step(gem.arch, token, position, prefilled)
        position += 1


def test_chunked_full_prefill_matches_one_pass(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    one = load(path, "full")
    layout = one.layout(CONTEXT, QUESTION)
    whole = one.prefill(layout)
    chunked = one.with_method("full", prefill_chunk=37).prefill(layout)
    torch.testing.assert_close(whole.last_logits, chunked.last_logits, atol=1e-4, rtol=1e-4)
    eager_chunked = load(path, "full", attn="eager", prefill_chunk=37).prefill(layout)
    torch.testing.assert_close(whole.last_logits, eager_chunked.last_logits, atol=1e-4, rtol=1e-4)


def test_ask_stream_and_evidence(tiny_model_dirs):
    doc = load(tiny_model_dirs["qwen3"], "gemfilter", top_k=10)
    answer = doc.ask(CONTEXT, QUESTION, max_new_tokens=12)
    streamed = "".join(doc.stream(CONTEXT, QUESTION, max_new_tokens=12))
    assert streamed == answer.text
    assert answer.stats.tokens_kept < answer.stats.tokens_in
    assert answer.stats.tokens_out == 12 or answer.text
    assert answer.evidence and sum(e.tokens for e in answer.evidence) == 10
    scores = [e.score for e in answer.evidence]
    assert scores == sorted(scores, reverse=True)
    for e in answer.evidence:
        assert " ".join(CONTEXT[e.start : e.end].split()).startswith(e.quote.rstrip("\u2026"))


def test_stop_strings_and_seeded_sampling(tiny_model_dirs):
    doc = load(tiny_model_dirs["llama"], "full")
    free = doc.ask(CONTEXT, QUESTION, max_new_tokens=20).text
    assert len(free) > 4
    stop = free[2:4]
    stopped = doc.ask(CONTEXT, QUESTION, max_new_tokens=20, stop=[stop]).text
    assert stopped == free[: free.index(stop)]
    a = doc.ask(CONTEXT, QUESTION, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7).text
    b = doc.ask(CONTEXT, QUESTION, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7).text
    assert a == b


@pytest.mark.parametrize(
    "context, question, options, message",
    [
        (CONTEXT, "", {}, "question is empty"),
        (CONTEXT, QUESTION, {"top_k": 0}, "top_k must be at least 1"),
        (CONTEXT, QUESTION, {"filter_layer": 4}, "filter_layer 4 is out of range"),
    ],
)
def test_bad_input_errors(tiny_model_dirs, context, question, options, message):
    with pytest.raises(LongDocError, match=message):
        doc = load(tiny_model_dirs["llama"], "gemfilter", **options)
        doc.ask(context, question, max_new_tokens=2)


@pytest.mark.parametrize("method", ["gemfilter", "homer", "snapkv", "streaming", "rag"])
def test_no_context_is_a_plain_chat_turn(tiny_model_dirs, method):
    full = load(tiny_model_dirs["llama"], "full")
    expected = full.ask("", QUESTION, max_new_tokens=8)
    answer = full.with_method(method).ask("  \n", QUESTION, max_new_tokens=8)
    assert answer.text == expected.text and answer.stats.tokens_in == expected.stats.tokens_in
    assert answer.evidence == []


def test_bad_generation_and_method_options(tiny_model_dirs):
    doc = load(tiny_model_dirs["llama"], "gemfilter")
    with pytest.raises(LongDocError, match="max_new_tokens must be at least 1"):
        doc.ask(CONTEXT, QUESTION, max_new_tokens=0)
    with pytest.raises(LongDocError, match="unknown generation option"):
        doc.ask(CONTEXT, QUESTION, beams=3)
    with pytest.raises(LongDocError, match="has no option"):
        doc.with_method("gemfilter", topk=3)
    with pytest.raises(LongDocError, match="unknown method"):
        doc.with_method("magic")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(LongDocError, match="model type 'gpt2' is not supported; longdoc supports Llama"):
        LongDoc.from_pretrained(str(tmp_path), device="cpu")


def test_missing_model_names_the_id_and_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LongDocError, match="'nobody/no-such-model'.*local folder"):
        LongDoc.from_pretrained("nobody/no-such-model", device="cpu")


def test_sliding_window_longer_than_input_is_refused(tmp_path):
    from tiny_models import build_model

    path = build_model("mistral", tmp_path / "m", sliding_window=64)
    doc = load(path, "full")
    with pytest.raises(LongDocError, match="sliding-window attention"):
        doc.ask(CONTEXT, QUESTION, max_new_tokens=2)


MASK_FREE_CASES = [
    ("full", {"prefill_chunk": 37}),
    ("gemfilter", {"top_k": 30}),
    ("homer", {"max_chunk_len": 200, "warmup_layers": 0}),
    ("snapkv", {"top_k": 30}),
]


@pytest.mark.parametrize("method, options", MASK_FREE_CASES)
def test_mask_free_attention_matches_transformers_sdpa(tiny_model_dirs, family, method, options):
    """longdoc_sdpa (the default) against transformers' own SDPA with explicit masks: same tokens, same logits."""
    path = tiny_model_dirs[family]
    ours = load(path, method, attn=None, **options)
    assert ours.arch.attn_implementation == "longdoc_sdpa"
    reference = load(path, method, attn="sdpa", **options)
    ids, _, prefilled = greedy_ids(ours)
    ids_ref, _, prefilled_ref = greedy_ids(reference)
    assert ids == ids_ref
    torch.testing.assert_close(prefilled.last_logits, prefilled_ref.last_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads, kv_heads, q, kv", [(8, 2, 16, 50), (4, 4, 1, 9), (6, 3, 33, 34), (4, 1, 64, 640)])
def test_chunk_after_cache_join_equals_bottom_right_causal_attention(heads, kv_heads, q, kv):
    """Cached keys unmasked + own keys causal, joined by log-sum-exp == one bottom-right causal softmax."""
    gen = torch.Generator().manual_seed(q * kv)
    query = torch.randn(1, heads, q, 32, generator=gen, dtype=torch.float64)
    key = torch.randn(1, kv_heads, kv, 32, generator=gen, dtype=torch.float64)
    value = torch.randn(1, kv_heads, kv, 32, generator=gen, dtype=torch.float64)
    want = F.scaled_dot_product_attention(
        query, key, value, attn_mask=causal_lower_right(q, kv), enable_gqa=heads != kv_heads
    )
    got = chunk_after_cache(query, key, value, 32**-0.5, math_attention_with_lse)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_chunked_filter_pass_changes_nothing(tiny_model_dirs, family):
    """GemFilter's layer-by-layer, chunk-by-chunk filter pass selects what one whole pass selects."""
    whole = load(tiny_model_dirs[family], "gemfilter", attn=None, top_k=30)
    chunked = whole.with_method("gemfilter", top_k=30, prefill_chunk=17)
    layout = whole.layout(CONTEXT, QUESTION)
    a, b = whole.prefill(layout), chunked.prefill(layout)
    assert a.kept_context.tolist() == b.kept_context.tolist()
    torch.testing.assert_close(a.last_logits, b.last_logits, atol=1e-4, rtol=1e-4)
