"""A model spread over several devices (device_map, issue #22), checked on CPU.

This machine has one device that computes, so the checks are of three kinds. (1) The meta device stands in
for a second device: a tensor there holds no values, and mixing it with a CPU tensor raises as mixing two
GPUs does, so a model whose last layers and head are on meta shows that every tensor a pass makes or moves
for a layer is on that layer's device (as far as a method runs without reading values back from those layers).
(2) accelerate's own dispatch with layers offloaded (weights on disk, meta tensors in the module, computed on
CPU by hooks) shows that longdoc finds where a layer runs from its hook and reads offloaded weights through
it, and that every method then gives the plain model's tokens. (3) A dict device_map loads through
`from_pretrained`'s one path and every method gives the same tokens. The same tokens across two GPUs, and
across a GPU and host memory, are checked in test_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_core import CONTEXT, QUESTION
from torch import nn

from longdoc import LongDoc, LongDocError
from longdoc.arch import Arch, PerDevice, as_device, module_device
from longdoc.cache import HostBackedCache, KVCache
from longdoc.decode_graph import unsupported_reason
from longdoc.generate import step
from longdoc.methods import Full, GemFilter
from longdoc.model import check_device_map, load_model
from longdoc.progress import no_progress
from longdoc.quantized import QuantizedCache, quantized
from longdoc.reading import ROOM, ReadingCache, ReadingStore

CPU, META = torch.device("cpu"), torch.device("meta")

# Every method, with budgets small enough to drop tokens from the test prompt (shared with test_gpu.py).
METHOD_CASES = [
    ("full", {}),
    ("gemfilter", {"top_k": 30}),
    ("homer", {"max_chunk_len": 64, "warmup_layers": 1}),
    ("snapkv", {"keys_per_head": 30}),
    ("streaming", {"top_k": 30}),
    ("rag", {"top_k": 30}),
    ("h2o", {"keys_per_head": 30, "recent": 8}),
    ("lingua", {"top_k": 30}),
    ("full", {"kv_bits": 4}),
]
CASE_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in options.items())}" for name, options in METHOD_CASES]


def answers(doc: LongDoc, name: str, options: dict, tokens: int = 8) -> tuple[str, list[int]]:
    """The greedy answer and its evidence starts: what a split model must reproduce."""
    if name == "rag":
        pytest.importorskip("bm25s")
    answer = doc.with_method(name, **options).ask(CONTEXT, QUESTION, max_new_tokens=tokens)
    return answer.text, [e.start for e in answer.evidence]


def full_map(model, **devices) -> dict[str, str | int]:
    """A device_map naming every module of a tiny model: `devices` by module name, the rest on "cpu"."""
    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
    names += [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    return {name: devices.get(name, "cpu") for name in names}


# ----- where a module runs -----


def test_module_device_is_the_hooks_execution_device_else_the_weights():
    linear = nn.Linear(2, 2)
    assert module_device(linear) == CPU
    assert module_device(nn.Linear(2, 2, device="meta")) == META
    assert module_device(nn.ReLU()) == CPU  # no weights: the host
    assert as_device(1) == torch.device("cuda", 1) and as_device("cuda:1") == torch.device("cuda", 1)

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    weights = dict(linear.state_dict())
    hook = AlignDevicesHook(execution_device="cpu", offload=True, weights_map=weights, skip_keys="past_key_values")
    add_hook_to_module(linear, hook)  # offloaded: the module's own weights are meta tensors now
    assert linear.weight.device == META and module_device(linear) == CPU


def tail_on_meta(path, method="full", **options) -> LongDoc:
    """The tiny model with layers 2-3, the final norm and the head on the meta device (a stand-in second device)."""
    model, tokenizer = load_model(str(path), device="cpu", dtype="float32")
    for module in (model.model.layers[2], model.model.layers[3], model.model.norm, model.lm_head):
        module.to("meta")
    return LongDoc(model, tokenizer, method=method, **options)


class Recorder(nn.Module):
    """A stand-in decoder layer that records the devices (and identities) of what it is given."""

    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    def forward(self, hidden, attention_mask=None, position_embeddings=None, past_key_values=None, use_cache=False):
        self.calls.append((hidden.device, position_embeddings, attention_mask))
        return hidden * 1


def test_forward_moves_hidden_states_at_each_device_and_position_embeddings_once_per_device(tiny_model_dirs):
    doc = tail_on_meta(tiny_model_dirs["llama"])
    arch = doc.arch
    assert arch.layer_devices == [CPU, CPU, META, META] and arch.devices == [CPU, META] and arch.split
    assert (arch.input_device, arch.norm_device, arch.head_device) == (CPU, META, META)
    assert arch.placement() == "cpu (layers 0-1), meta (layers 2-3)"
    calls, tapped = [], []
    arch.layers = nn.ModuleList([Recorder(calls) for _ in range(4)])  # our Arch's view, not the model's classes
    hidden = torch.randn(1, 5, 64)
    rows = (torch.randn(1, 5, 16), torch.randn(1, 5, 16))
    mask = torch.zeros(1, 1, 5, 5)
    out = arch.forward(hidden, rows, mask=mask, tap=lambda i, x: tapped.append(x.device))
    assert out.device == META and tapped == [CPU, CPU, META, META]
    assert [device for device, _, _ in calls] == [CPU, CPU, META, META]
    for device, (cos, sin), layer_mask in calls:
        assert cos.device == sin.device == layer_mask.device == device
    assert calls[0][1][0] is rows[0] and calls[0][2] is mask  # on the first device: not copied at all
    assert calls[2][1][0] is calls[3][1][0] and calls[2][2] is calls[3][2]  # copied once for meta, not per layer


def test_per_device_copies_once_per_device():
    rows = PerDevice((torch.ones(2),))
    assert rows(CPU)[0] is rows.tensors[0]
    assert rows(META) is rows(META) and rows(META)[0].device == META


@pytest.mark.parametrize(
    "method, options",
    [
        ("full", {}),
        ("gemfilter", {"top_k": 30, "filter_layer": 1}),
        ("streaming", {"top_k": 30}),
        ("rag", {"top_k": 30}),
    ],
)
def test_each_layers_cache_and_the_logits_are_made_on_that_layers_device(tiny_model_dirs, method, options):
    """Runs as far as a method goes without reading values from the meta layers (the kept rows come from CPU)."""
    if method == "rag":
        pytest.importorskip("bm25s")
    doc = tail_on_meta(tiny_model_dirs["llama"], method, **options)
    prefill = doc.prefill(doc.layout(CONTEXT, QUESTION))
    assert prefill.cache.devices() == [CPU, CPU, META, META]
    assert prefill.last_logits.device == META  # the head's device
    assert prefill.kept_context is None or prefill.kept_context.device == CPU


def test_quantized_decoding_and_graph_fallback_on_a_split_model(tiny_model_dirs):
    doc = tail_on_meta(tiny_model_dirs["llama"])
    prefill = doc.prefill(doc.layout(CONTEXT, QUESTION))
    packed = quantized(prefill.cache, 4)
    prefill.cache = packed
    assert step(doc.arch, 5, prefill.next_position, prefill).device == META
    assert [layer.key_codes.device for layer in packed.layers] == [CPU, CPU, META, META]
    assert set(packed._scratch) == {CPU, META}  # one dequantization scratch per device
    reason = unsupported_reason(doc.arch, KVCache(4))
    assert reason == "the model's layers run on several devices (cpu (layers 0-1), meta (layers 2-3))"


@pytest.mark.parametrize("method", [Full(prefill_chunk=37), GemFilter(top_k=24, filter_layer=1)], ids=["full", "gem"])
def test_readings_are_kept_and_leased_on_each_layers_device(tiny_model_dirs, method):
    doc = tail_on_meta(tiny_model_dirs["llama"], method)
    assert set(doc.store.device_bytes) == {"cpu", "meta"}  # a budget per device
    reading = doc.read(CONTEXT)
    held = reading.cache.cache.devices()
    assert held == ([CPU, CPU, META, META] if isinstance(method, Full) else [CPU, CPU, None, None])
    by_device = reading.cache.nbytes_by_device()
    assert doc.store.used("meta") == by_device.get("meta", 0) and doc.store.used("cpu") == by_device["cpu"]
    assert doc.reading_bytes_by_device(method, reading.tokens) == by_device
    layout = doc.layout(CONTEXT, QUESTION)
    prefill, stats, release = doc._prefill(layout, method, no_progress)
    release()
    assert stats.reading == "reused" and prefill.cache.devices()[:2] == [CPU, CPU]
    lease = reading.cache.lease(doc.arch.layer_devices)
    assert lease.keys[0] is reading.cache.cache.keys[0]  # on its devices already: shared, not copied
    reading.cache.release()


def test_quantized_readings_are_kept_and_leased_on_each_layers_device(tiny_model_dirs):
    method = Full(prefill_chunk=37, kv_bits=4)
    doc = tail_on_meta(tiny_model_dirs["llama"], method)
    reading = doc.read(CONTEXT * 3)  # long enough for whole quantized groups
    held = reading.cache.cache
    assert held.devices() == [CPU, CPU, META, META]
    assert [layer.key_codes.device for layer in held.layers] == [CPU, CPU, META, META]
    assert doc.reading_bytes_by_device(method, reading.tokens) == reading.cache.nbytes_by_device()
    lease = reading.cache.lease(doc.arch.layer_devices)
    assert lease.devices() == [CPU, CPU, META, META] and lease.nbytes() == held.nbytes()
    host = KVCache(4)
    for i in range(4):
        host.update(torch.randn(1, 2, 300, 8), torch.randn(1, 2, 300, 8), i)
    in_host = QuantizedCache(host, 4, decoding=False)  # a quantized reading held in host memory
    leased = in_host.lease([CPU, CPU, META, META], ROOM)
    assert (
        leased.devices() == [CPU, CPU, META, META]
        and leased.nbytes_by_device()["meta"] == 2 * in_host.layers[0].nbytes()
    )
    assert (
        leased.update(torch.randn(1, 2, 1, 8, device=META), torch.randn(1, 2, 1, 8, device=META), 3)[0].device == META
    )
    assert in_host.to([CPU, CPU, META, META]).devices() == [CPU, CPU, META, META]


def test_caches_move_and_stream_to_a_device_per_layer():
    cache = KVCache(4)
    for i in range(4):
        cache.update(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), i)
    moved = cache.to([CPU, CPU, META, META], room=3)
    assert moved.devices() == [CPU, CPU, META, META] and moved.keys[3].shape[-2] == 9
    assert moved.nbytes_by_device() == {"cpu": 2 * 2 * 96 * 4, "meta": 2 * 2 * 96 * 4}
    streamed = HostBackedCache(cache, [CPU, META, CPU, META], ROOM)
    assert [streamed.layer(i)[0].device for i in range(4)] == [CPU, META, CPU, META]
    with pytest.raises(ValueError, match="3 devices given for 4 layers"):
        cache.to([CPU, CPU, CPU])
    held = ReadingCache(Full(), [1, 2, 3], cache)  # a reading in host memory, asked from a split model
    assert isinstance(held.lease([CPU, CPU, META, META]), HostBackedCache)


def test_the_store_keeps_a_budget_per_device():
    cache = KVCache(2)
    cache.update(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), 0)
    cache.update(torch.randn(1, 2, 4, 8, device="meta"), torch.randn(1, 2, 4, 8, device="meta"), 1)
    layer = 2 * 2 * 4 * 8 * 4
    store = ReadingStore({"cpu": 10 * layer, "meta": 10 * layer}, host_bytes=0)
    store.add(ReadingCache(Full(), [1, 2, 3, 4], cache))
    assert (store.used("cpu"), store.used("meta"), store.used("device"), store.used("host")) == (
        layer,
        layer,
        2 * layer,
        0,
    )
    assert store.fits({"cpu": layer, "meta": 10 * layer}) and not store.fits({"cpu": layer, "meta": 11 * layer})
    tight = ReadingStore({"cpu": layer, "meta": layer // 2}, host_bytes=0)
    tight.add(ReadingCache(Full(), [1, 2, 3, 4], cache))
    assert not tight.entries  # over one device's budget, and host memory (a device here) has no room: dropped
    legacy = ReadingStore(10 * layer, 0, "cpu")  # one number: that budget on the one device type
    assert legacy.device_bytes == {"cpu": 10 * layer}


# ----- accelerate's dispatch: layers offloaded, computed where their hook says -----


def offloaded_model(path, folder, layers=(1, 2)):
    """The tiny model dispatched by accelerate as from_pretrained does, `layers` offloaded to disk (run on CPU)."""
    from accelerate import dispatch_model

    model, tokenizer = load_model(str(path), device="cpu", dtype="float32")
    device_map = full_map(model, **{f"model.layers.{i}": "disk" for i in layers})
    dispatch_model(model, device_map=device_map, offload_dir=str(folder), skip_keys=model._skip_keys_device_placement)
    return model, tokenizer


@pytest.mark.parametrize("method, options", METHOD_CASES, ids=CASE_IDS)
def test_offloaded_layers_give_the_single_device_tokens(tiny_model_dirs, tmp_path, method, options):
    """Phi-3's fused qkv rows are read from offloaded weights (GemFilter and SnapKV score at layers 1 and 2)."""
    path = tiny_model_dirs["phi3"]
    model, tokenizer = offloaded_model(path, tmp_path)
    split = LongDoc(model, tokenizer, method="full")
    assert model.model.layers[1].self_attn.qkv_proj.weight.device == META  # the weights are elsewhere
    assert split.arch.layer_devices == [CPU] * 4 and split.arch.offloaded and not split.arch.split
    plain = LongDoc.from_pretrained(str(path), method="full", device="cpu", dtype="float32")
    scored = {"filter_layer": 2} if method == "gemfilter" else {}
    assert answers(split, method, {**options, **scored}) == answers(plain, method, {**options, **scored})


def test_offloaded_model_follow_ups_equal_one_shot_answers(tiny_model_dirs, tmp_path):
    model, tokenizer = offloaded_model(tiny_model_dirs["llama"], tmp_path)
    split = LongDoc(model, tokenizer, method=GemFilter(top_k=24, filter_layer=2))
    plain = LongDoc.from_pretrained(str(tiny_model_dirs["llama"]), method=GemFilter(top_k=24, filter_layer=2))
    reading = split.read(CONTEXT)
    for question in (QUESTION, "Who is Ishmael?"):
        answer = reading.ask(question, max_new_tokens=8)
        assert answer.stats.reading == "reused"
        assert answer.text == plain.ask(CONTEXT, question, max_new_tokens=8).text
    assert "offloaded to host memory" in unsupported_reason(split.arch, reading.cache.cache)


def test_a_dispatch_that_would_move_the_cache_is_refused(tiny_model_dirs, tmp_path):
    from accelerate import dispatch_model

    model, tokenizer = load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32")
    dispatch_model(model, device_map=full_map(model, **{"model.layers.1": "disk"}), offload_dir=str(tmp_path))
    with pytest.raises(LongDocError, match='without skip_keys="past_key_values"'):
        LongDoc(model, tokenizer)


# ----- device_map through from_pretrained -----


@pytest.mark.parametrize("method, options", METHOD_CASES, ids=CASE_IDS)
def test_a_dict_device_map_gives_the_same_tokens(tiny_model_dirs, method, options):
    path = str(tiny_model_dirs["qwen3"])
    plain = LongDoc.from_pretrained(path, method="full", device="cpu", dtype="float32")
    model, _ = load_model(path, device="cpu")
    mapped = LongDoc.from_pretrained(path, method="full", device_map=full_map(model), dtype="float32")
    assert mapped.arch.layer_devices == [CPU] * 4
    assert answers(mapped, method, options) == answers(plain, method, options)


def test_device_map_auto_on_a_cpu_machine_and_its_refusals(tiny_model_dirs):
    path = str(tiny_model_dirs["llama"])
    auto = LongDoc.from_pretrained(path, method="full", device_map="auto", dtype="float32")
    assert auto.arch.devices == [CPU]
    refusals = [
        ("balanced", {}, 'device_map takes "auto", a dict'),
        ({"model.layers.0": "cpu"}, {}, "device_map places no device for lm_head, model.embed_tokens"),
        ({"": "disk"}, {}, "longdoc does not offload to disk"),
        ({"": 0}, {}, "device_map puts '' on a device that cannot be used: device 'cuda:0' was asked for"),
        ({"": "cpu"}, {"device": "cpu"}, "give device or device_map, not both"),
    ]
    for device_map, extra, message in refusals:
        with pytest.raises(LongDocError, match=message.replace("(", r"\(")):
            LongDoc.from_pretrained(path, method="full", device_map=device_map, **extra)


def test_device_map_values_are_written_as_accelerate_takes_them():
    assert check_device_map({"": "cpu", "lm_head": torch.device("cpu")}) == {"": "cpu", "lm_head": "cpu"}
    assert check_device_map(None) is None and check_device_map("auto") == "auto"
    with pytest.raises(LongDocError, match="GPU numbers start at 0"):
        check_device_map({"": -1})
    with pytest.raises(LongDocError, match="keys are module names"):
        check_device_map({0: "cpu"})


def test_arch_of_an_unsplit_model_reads_one_device(tiny_model_dirs):
    model, _ = load_model(str(tiny_model_dirs["llama"]), device="cpu")
    arch = Arch(model)
    assert arch.devices == [CPU] and not arch.split and not arch.offloaded and arch.device == CPU


def test_integrations_pass_a_device_map_through():
    from longdoc.integrations.common import LoadOptions

    model = str(Path(__file__).resolve().parents[1] / "examples" / "models" / "needle-tiny")
    assert LoadOptions(model, device_map={"": "cpu"}).placement() == ("auto", {"": "cpu"})
    assert LoadOptions(model, device_map="auto").placement() == ("auto", "auto")
    assert LoadOptions(model, device_map="cpu").placement() == ("cpu", None)  # one device: the HF wrappers' way
    same = LoadOptions(model, device_map={"lm_head": "cpu", "": "cpu"}), LoadOptions(model, device_map={"": "cpu"})
    assert (
        same[0].key() != same[1].key()
        and same[0].key() == LoadOptions(model, device_map=dict(same[0].device_map)).key()
    )
    with pytest.raises(LongDocError, match="device_map='balanced' is not supported"):
        LoadOptions(model, device_map="balanced").placement()
