"""CUDA-only checks (skipped on CPU): the mask-free attention kernel path, HOMER's host-memory parking on a GPU,
graph-captured decoding against the eager loop, and a model split over two GPUs or a GPU and host memory."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from test_core import CONTEXT, QUESTION
from test_multi_device import CASE_IDS, METHOD_CASES, answers
from tiny_models import build_model

from longdoc import LongDoc
from longdoc.attention import (
    chunk_after_cache,
    cudnn_attention_with_lse,
    cudnn_lse_usable,
    efficient_attention_with_lse,
    efficient_lse_usable,
    math_attention_with_lse,
    split_kv_attention,
)
from longdoc.decode_graph import StaticDecoder
from longdoc.generate import GenerationConfig, generate_tokens, step
from longdoc.model import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_doc(path, method, attn=None, **options) -> LongDoc:
    return LongDoc.from_pretrained(
        str(path), method=method, device="cuda", dtype="float32", attn_implementation=attn, **options
    )


@pytest.mark.parametrize("method, options", [("full", {"prefill_chunk": 37}), ("gemfilter", {"top_k": 30})])
def test_mask_free_attention_on_cuda_matches_transformers_sdpa(tiny_model_dirs, family, method, options):
    ours = cuda_doc(tiny_model_dirs[family], method, **options)
    assert ours.arch.attn_implementation == "longdoc_sdpa"
    reference = cuda_doc(tiny_model_dirs[family], method, attn="sdpa", **options)
    a = ours.ask(CONTEXT, QUESTION, max_new_tokens=12)
    b = reference.ask(CONTEXT, QUESTION, max_new_tokens=12)
    assert a.text == b.text


def test_homer_parking_on_cuda_is_exact(tmp_path):
    path = build_model("llama", tmp_path / "deep", num_hidden_layers=8)
    doc = cuda_doc(path, "homer", max_chunk_len=64, warmup_layers=0, offload=False)
    layout = doc.layout(CONTEXT * 3, QUESTION)
    plain = doc.prefill(layout)
    parked = doc.with_method("homer", max_chunk_len=64, warmup_layers=0, offload=True).prefill(layout)
    assert plain.details["chunks"] >= 16
    assert parked.kept_context.tolist() == plain.kept_context.tolist()
    torch.testing.assert_close(parked.last_logits, plain.last_logits, rtol=0, atol=0)


@pytest.mark.parametrize("heads, kv_heads, head_dim, q, kv", [(32, 8, 128, 512, 4096), (4, 2, 16, 37, 300)])
def test_cudnn_join_runs_and_matches_the_math(heads, kv_heads, head_dim, q, kv):
    """bf16 attention shapes take the cuDNN path; the joined output is the exact softmax's, also on cache views."""
    query = torch.randn(1, heads, q, head_dim, device="cuda", dtype=torch.bfloat16)
    buffer = torch.randn(2, 1, kv_heads, kv + 64, head_dim, device="cuda", dtype=torch.bfloat16)
    key, value = buffer[0, :, :, :kv], buffer[1, :, :, :kv]  # strided like KVCache's preallocated rows
    assert cudnn_lse_usable(query, key)
    got = chunk_after_cache(query, key, value, head_dim**-0.5, cudnn_attention_with_lse)
    want = chunk_after_cache(query.double(), key.double(), value.double(), head_dim**-0.5, math_attention_with_lse)
    torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=1e-2)


BF16_CASES = [("full", {"prefill_chunk": 37}), ("gemfilter", {"top_k": 30, "prefill_chunk": 37})]


@pytest.mark.parametrize("method, options", BF16_CASES)
def test_bf16_cuda_attention_is_as_accurate_as_transformers_sdpa(tiny_model_dirs, family, method, options):
    """bf16 on CUDA (the cuDNN-joined path) errs from the float32 result no more than transformers' masked SDPA does."""
    path = str(tiny_model_dirs[family])

    def last_logits(dtype, attn=None):
        doc = LongDoc.from_pretrained(
            path, method=method, device="cuda", dtype=dtype, attn_implementation=attn, **options
        )
        return doc.prefill(doc.layout(CONTEXT, QUESTION)).last_logits.float()

    truth = last_logits("float32", "sdpa")
    ours = (last_logits("bfloat16") - truth).abs().max().item()
    reference = (last_logits("bfloat16", "sdpa") - truth).abs().max().item()
    assert ours <= 2 * reference + 1e-2, (ours, reference)


# Past the tiny models' 2,048-token window on purpose (past_window): these check decoding over a long buffer.
DECODE_METHODS = [("full", {"past_window": True}), ("gemfilter", {"top_k": 30, "past_window": True}),
                  ("homer", {"max_chunk_len": 1024, "warmup_layers": 1}),
                  ("snapkv", {"keys_per_head": 30, "past_window": True})]  # fmt: skip


LONG_CONTEXT = CONTEXT * 8  # 2,197 tokens: a buffer of 2,304 or more, which single_query_attention splits


def decoded(doc: LongDoc, config: GenerationConfig, graph: bool, compile: bool = False) -> tuple[list[int], list[str]]:
    notes: list[str] = []
    prefilled = doc.prefill(doc.layout(LONG_CONTEXT, QUESTION))
    tokens = list(generate_tokens(doc.arch, prefilled, config, (), notes=notes, graph=graph, compile=compile))
    return tokens, notes


@pytest.mark.parametrize("method, options", DECODE_METHODS[:2])
def test_compiled_graph_decoding_equals_the_eager_loop(tiny_model_dirs, method, options):
    """float32 on CUDA: the captured torch.compile'd step gives the eager loop's greedy tokens, with no note."""
    doc = cuda_doc(tiny_model_dirs["llama"], method, **options)
    config = GenerationConfig(max_new_tokens=40)
    compiled, notes = decoded(doc, config, graph=True, compile=True)
    assert notes == [] and compiled == decoded(doc, config, graph=False)[0]


@pytest.mark.parametrize("method, options", DECODE_METHODS)
def test_graph_decoding_equals_the_eager_loop(tiny_model_dirs, family, method, options):
    """float32 on CUDA: the replayed graph gives the eager loop's greedy tokens, and says nothing about falling back."""
    doc = cuda_doc(tiny_model_dirs[family], method, **options)
    config = GenerationConfig(max_new_tokens=40)
    graph_tokens, notes = decoded(doc, config, graph=True)
    eager_tokens, eager_notes = decoded(doc, config, graph=False)
    assert notes == [] and eager_notes == ["decoded eagerly: graph decoding turned off"]
    assert graph_tokens == eager_tokens


# 2-bit caches are left out on the GPU: run on an H200, qwen2 + full + kv_bits=2 parted from the eager loop within
# 220 tokens (the other 14 cases gave the same tokens). The graph's rows differ from the eager loop's by rounding
# (cuBLAS's stacked q|k|v product, Triton's attention against SDPA), and at 2 bits such a difference can move a value
# across a code boundary, which then changes the attention. On the CPU the static and eager paths agree at 2 bits
# (tests/test_quantized_decoding.py).
QUANTIZED_DECODE_METHODS = [("full", {"kv_bits": 4, "past_window": True}),
                            ("gemfilter", {"top_k": 30, "kv_bits": 4, "past_window": True})]  # fmt: skip


@pytest.mark.parametrize("method, options", QUANTIZED_DECODE_METHODS)
def test_graph_decoding_of_a_quantized_cache_equals_the_eager_loop(tiny_model_dirs, family, method, options):
    """float32 on CUDA, KIVI caches (#20): 220 tokens fold two groups or more of decoded rows (the static cache's
    folds in the graph), and the replayed graph gives the eager QuantizedCache loop's greedy tokens."""
    doc = cuda_doc(tiny_model_dirs[family], method, **options)
    config = GenerationConfig(max_new_tokens=220)
    graph_tokens, notes = decoded(doc, config, graph=True)
    assert notes == [] and graph_tokens == decoded(doc, config, graph=False)[0]


def test_compiled_graph_decoding_of_a_quantized_cache_equals_the_eager_loop(tiny_model_dirs):
    doc = cuda_doc(tiny_model_dirs["llama"], "gemfilter", top_k=30, kv_bits=4, past_window=True)
    config = GenerationConfig(max_new_tokens=220)
    compiled, notes = decoded(doc, config, graph=True, compile=True)
    assert notes == [] and compiled == decoded(doc, config, graph=False)[0]


def test_graph_decoding_of_a_quantized_cache_samples_as_the_eager_loop_with_a_seed(tiny_model_dirs):
    doc = cuda_doc(tiny_model_dirs["llama"], "full", kv_bits=2, past_window=True)
    config = GenerationConfig(max_new_tokens=150, temperature=1.0, top_p=0.9, seed=3)
    assert decoded(doc, config, graph=True)[0] == decoded(doc, config, graph=False)[0]


def test_greedy_graph_replays_stop_at_eos_as_the_eager_loop(tiny_model_dirs):
    """Greedy replays run a step ahead of the host; an EOS met on the way ends the answer where the eager loop does."""
    doc = cuda_doc(tiny_model_dirs["llama"], "gemfilter", top_k=30, past_window=True)
    prefilled = doc.prefill(doc.layout(LONG_CONTEXT, QUESTION))
    config = GenerationConfig(max_new_tokens=40)
    eager = list(generate_tokens(doc.arch, prefilled, config, (), graph=False))
    eos = {eager[10]}
    cut = eager[: eager.index(eager[10])]
    for graph in (True, False):
        prefilled = doc.prefill(doc.layout(LONG_CONTEXT, QUESTION))
        assert list(generate_tokens(doc.arch, prefilled, config, eos, graph=graph)) == cut


def test_graph_decoding_samples_as_the_eager_loop_with_a_seed(tiny_model_dirs):
    doc = cuda_doc(tiny_model_dirs["llama"], "gemfilter", top_k=30, past_window=True)
    config = GenerationConfig(max_new_tokens=40, temperature=1.0, top_p=0.9, seed=3)
    assert decoded(doc, config, graph=True)[0] == decoded(doc, config, graph=False)[0]


@pytest.mark.parametrize("method, options", DECODE_METHODS[:2])
def test_bf16_graph_decoding_is_as_accurate_as_the_eager_loop(tiny_model_dirs, family, method, options):
    """bf16: fed the same tokens, the graph's logits err from float32 eager decoding no more than eager bf16's do."""
    path = str(tiny_model_dirs[family])
    exact = cuda_doc(path, method, **options)
    half = LongDoc.from_pretrained(path, method=method, device="cuda", dtype="bfloat16", **options)
    layout = exact.layout(LONG_CONTEXT, QUESTION)
    truth, eager, static = exact.prefill(layout), half.prefill(layout), half.prefill(layout)
    graph = StaticDecoder(half.arch, static.cache, static.next_position, max_steps=30, capture=True)
    token, position = int(truth.last_logits.argmax(-1)), truth.next_position
    for _ in range(30):
        want = step(exact.arch, token, position, truth)
        ours = (graph(token, position) - want).abs().max().item()
        reference = (step(half.arch, token, position, eager) - want).abs().max().item()
        assert ours <= 2 * reference + 1e-2, (ours, reference)
        token, position = int(want.argmax(-1)), position + 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("filled", [1000, 3 * 1280 - 1])
def test_split_kv_kernel_matches_the_math(dtype, filled):
    """Llama-3.1-8B's decode attention shape: the efficient kernel on split views joined equals float64 math."""
    chunk = 1280
    query = torch.randn(1, 8, 4, 128, device="cuda", dtype=dtype)
    key, value = torch.randn(2, 1, 8, 3 * chunk, 128, device="cuda", dtype=dtype)
    mask = torch.zeros(1, 1, 1, 3 * chunk, device="cuda", dtype=dtype)
    mask[..., filled:] = torch.finfo(dtype).min
    assert efficient_lse_usable(query, key)
    got = split_kv_attention(query, key, value, mask, 128**-0.5, chunk, efficient_attention_with_lse)
    want = torch.nn.functional.scaled_dot_product_attention(
        query.double(), key[..., :filled, :].double(), value[..., :filled, :].double(), scale=128**-0.5
    )
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3  # the kernel runs float32 on TF32 tensor cores (2.2e-4 seen)
    torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, length",
    [(32, 8, 128, 32768 + 100), (32, 8, 128, 50), (32, 32, 96, 300), (4, 2, 64, 319)],
)  # fmt: skip
def test_quantized_decode_kernel_matches_the_math(dtype, bits, heads, kv_heads, head_dim, length):
    """The KIVI kernel (#20) reads the prompt's codes, the groups folded while decoding and the ring where they lie
    (Llama-3.1-8B's shape at 32K, a prompt too short for codes, Phi-3's 96-wide heads with value groups of 32, a
    prompt that folds at its first step): at every step through two folds its output is float64 attention over the
    layer dequantized into the scratch buffer (the eager cache's rows), within the plain kernel's tolerance."""
    from longdoc.cache import KVCache
    from longdoc.decode_graph import static_capacity
    from longdoc.flash_decode import triton_usable
    from longdoc.quantized import QuantizedCache
    from longdoc.static_quantized import WINDOW, StaticQuantizedCache

    assert triton_usable()
    source = KVCache(1)
    source.update(*torch.randn(2, 1, kv_heads, length, head_dim, device="cuda", dtype=dtype), 0)
    steps = WINDOW + 100
    static = StaticQuantizedCache(QuantizedCache(source, bits), static_capacity(length + steps))
    assert static.fused
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for _ in range(steps):
        query = torch.randn(1, heads, 1, head_dim, device="cuda", dtype=dtype)
        rows = torch.randn(2, 1, kv_heads, 1, head_dim, device="cuda", dtype=dtype)
        static.begin_step()
        visible = static.slot + 1
        got = static.attend(0, query, *rows, visible, head_dim**-0.5)
        keys, values = static._scratch(static.layers[0])
        static.layers[0].dequantize_into(keys, values, visible, static.offsets)
        n = int(visible)
        want = torch.nn.functional.scaled_dot_product_attention(
            query.double(), keys[..., :n, :].double(), values[..., :n, :].double(), scale=head_dim**-0.5,
            enable_gqa=True,
        )  # fmt: skip
        torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)
        static.slot.add_(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, capacity, visible",
    [(32, 8, 128, 1280, 1), (32, 8, 128, 1280, 1057), (32, 8, 128, 131328, 131073), (40, 10, 128, 2304, 2200),
     (32, 32, 96, 2304, 700), (4, 2, 16, 512, 300)],
)  # fmt: skip
def test_flash_decode_kernel_matches_the_math(dtype, heads, kv_heads, head_dim, capacity, visible):
    """The Triton kernel (Llama-3.1-8B at 1K and 128K, Mistral-Nemo's groups, Phi-3's 96-wide heads, the tiny
    models): float64 attention over the visible slots, and NaN in the slots past them is never read."""
    from longdoc.flash_decode import triton_decode_attention, triton_usable

    assert triton_usable()
    query = torch.randn(1, heads, 1, head_dim, device="cuda", dtype=dtype)
    key, value = torch.randn(2, 1, kv_heads, capacity, head_dim, device="cuda", dtype=dtype)
    key[..., visible:, :], value[..., visible:, :] = torch.nan, torch.nan
    got = triton_decode_attention(query, key, value, torch.tensor([visible], device="cuda"), head_dim**-0.5)
    want = torch.nn.functional.scaled_dot_product_attention(
        query.double(), key[..., :visible, :].double(), value[..., :visible, :].double(), scale=head_dim**-0.5,
        enable_gqa=True,
    )  # fmt: skip
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("method", ["full", "gemfilter"])
def test_follow_ups_on_a_gpu_with_the_reading_on_the_gpu_or_in_host_memory(tiny_model_dirs, method):
    """A follow-up equals the one-shot answer on a GPU too, and a reading held in host memory changes nothing."""
    from test_reading import QUESTIONS

    path = str(tiny_model_dirs["llama"])
    options = {"top_k": 30} if method == "gemfilter" else {}
    on_gpu = LongDoc.from_pretrained(path, method=method, device="cuda", dtype="float32", **options)
    on_host = LongDoc.from_pretrained(
        path, method=method, device="cuda", dtype="float32", readings_on_host=True, **options
    )
    for question in QUESTIONS:
        fresh = LongDoc.from_pretrained(path, method=method, device="cuda", dtype="float32", **options)
        want = fresh.ask(CONTEXT, question, max_new_tokens=12).text
        assert on_gpu.ask(CONTEXT, question, max_new_tokens=12).text == want
        answer = on_host.ask(CONTEXT, question, max_new_tokens=12)
        assert answer.text == want
    assert answer.stats.reading == "reused" and answer.stats.reading_device == "cpu"


# ----- a model split over devices (device_map, issue #22): the single-GPU tokens for every method -----

TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def split_map(tail) -> dict:
    """The tiny model's embedding and layers 0-1 on GPU 0; layers 2-3, the final norm and the head on `tail`."""
    head = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0}
    return head | {name: tail for name in ("model.layers.2", "model.layers.3", "model.norm", "lm_head")}


@functools.cache
def single_gpu(path: str) -> LongDoc:
    return cuda_doc(path, "full")


@functools.cache
def reference(path: str, method: str, options: str) -> tuple[str, list[int]]:
    """The single-GPU answer (graph decoding, whose equality with the eager loop is checked above)."""
    return answers(single_gpu(path), method, json.loads(options), tokens=12)


@functools.cache
def mapped(path: str, tail) -> LongDoc:
    return LongDoc.from_pretrained(path, method="full", device_map=split_map(tail), dtype="float32")


@functools.cache
def gpu_and_host(path: str) -> LongDoc:
    """Layers 2-3, the norm and the head computing on the CPU (moved there, no hooks): two devices, one GPU."""
    model, tokenizer = load_model(path, device="cuda", dtype="float32")
    for module in (model.model.layers[2], model.model.layers[3], model.model.norm, model.lm_head):
        module.to("cpu")
    return LongDoc(model, tokenizer, method="full")


@TWO_GPUS
@pytest.mark.parametrize("method, options", METHOD_CASES, ids=CASE_IDS)
def test_multi_gpu_split_gives_the_single_gpu_tokens(tiny_model_dirs, family, method, options):
    path = str(tiny_model_dirs[family])
    split = mapped(path, 1)
    gpus = [torch.device("cuda", 0)] * 2 + [torch.device("cuda", 1)] * 2
    assert split.arch.layer_devices == gpus and split.arch.head_device == gpus[-1]
    assert answers(split, method, options, tokens=12) == reference(path, method, json.dumps(options))


@pytest.mark.parametrize("method, options", METHOD_CASES, ids=CASE_IDS)
def test_multi_device_gpu_and_host_give_the_single_gpu_tokens(tiny_model_dirs, family, method, options):
    """On one GPU: layers in host memory through a dict device_map (accelerate runs them on the GPU, their weights
    brought in per call), and layers computing on the CPU (the hidden states, positions and cache cross over)."""
    path = str(tiny_model_dirs[family])
    want = reference(path, method, json.dumps(options))
    offloaded = mapped(path, "cpu")
    assert offloaded.arch.offloaded and offloaded.arch.layer_devices == [torch.device("cuda", 0)] * 4
    assert answers(offloaded, method, options, tokens=12) == want
    crossing = gpu_and_host(path)
    assert crossing.arch.split and crossing.arch.layer_devices[2:] == [torch.device("cpu")] * 2
    assert answers(crossing, method, options, tokens=12) == want


def split_models(path: str) -> list[LongDoc]:
    models = [mapped(path, "cpu"), gpu_and_host(path)]
    return models + ([mapped(path, 1)] if torch.cuda.device_count() >= 2 else [])


@pytest.mark.parametrize("method", ["full", "gemfilter"])
def test_multi_device_follow_ups_equal_one_shot_answers_with_readings_on_the_devices_or_the_host(
    tiny_model_dirs, method
):
    from test_reading import QUESTIONS

    path = str(tiny_model_dirs["llama"])
    options = {"top_k": 30} if method == "gemfilter" else {}
    for model in split_models(path):
        for on_host in (False, True):
            doc = LongDoc(model.model, model.tokenizer, method, readings_on_host=on_host, **options)
            reading = doc.read(CONTEXT)
            for question in QUESTIONS[:2]:
                one = single_gpu(path)
                fresh = LongDoc(one.model, one.tokenizer, method, **options)  # its own empty store: a one-shot answer
                answer = reading.ask(question, max_new_tokens=12)
                assert answer.text == fresh.ask(CONTEXT, question, max_new_tokens=12).text
                assert answer.stats.reading == "reused"
            assert answer.stats.reading_device == ("cpu" if on_host else doc.arch.layer_devices[0].type)


def test_multi_device_homer_parks_and_returns_each_layer_to_its_device(tiny_model_dirs):
    path = str(tiny_model_dirs["llama"])
    options = {"max_chunk_len": 64, "warmup_layers": 0, "offload": True}
    want = single_gpu(path).with_method("homer", **options).prefill(single_gpu(path).layout(CONTEXT * 3, QUESTION))
    assert want.details["chunks"] >= 16  # subtrees of 8 leaves are parked
    for model in split_models(path):
        got = model.with_method("homer", **options).prefill(model.layout(CONTEXT * 3, QUESTION))
        assert got.kept_context.tolist() == want.kept_context.tolist()
        assert got.cache.devices() == model.arch.layer_devices


def test_multi_device_decoding_is_eager_and_says_why(tiny_model_dirs):
    path = str(tiny_model_dirs["llama"])
    for model in split_models(path):
        notes = model.ask(CONTEXT, QUESTION, max_new_tokens=4).stats.notes
        eager = [note for note in notes if note.startswith("decoded eagerly")]
        assert eager and ("several devices" in eager[0] or "offloaded to host memory" in eager[0]), notes
