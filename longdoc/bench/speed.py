"""Time to first token, decode speed and peak GPU memory of every method on a random model of a real shape.

Decoding is bounded by memory bandwidth: each token reads every weight and the whole cache once. The floor
reported beside it, (weight bytes + cache bytes) / bandwidth, uses a device-to-device copy measured in the
same run.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..arch import Arch
from ..attention import NAME as ATTENTION
from ..errors import LongDocError
from ..generate import GenerationConfig, generate_tokens
from ..measure import Measure
from ..methods import parse_method, split_label
from ..progress import ProgressHook, no_progress
from ..prompt import PromptLayout
from ..quantized import quantized
from .shapes import random_model

PREFIX, SUFFIX = 8, 24  # template tokens around the context, as a chat prompt has


def synthetic_layout(tokens: int, vocab: int, seed: int = 0) -> PromptLayout:
    """Random token ids in the prefix | context | suffix shape; speed does not depend on the text."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (tokens,), generator=generator).tolist()
    context = ids[PREFIX : tokens - SUFFIX]
    return PromptLayout(
        prefix_ids=ids[:PREFIX],
        context_ids=context,
        suffix_ids=ids[tokens - SUFFIX :],
        context_offsets=[(i, i + 1) for i in range(len(context))],
        context_text=" " * len(context),
    )


def speed_records(
    shape: str,
    lengths: list[int],
    methods: dict[str, dict],
    runs: int = 3,
    decode_tokens: int = 32,
    device: str = "cuda",
    progress: ProgressHook = no_progress,
    reference: bool = False,
    graph: bool = True,
    compile: bool = False,
) -> tuple[list[dict], dict]:
    """One record per (length, method): medians of `runs` timed runs after one warm-up; OOM is recorded.

    With `reference`, each length also gets a "transformers" record: a plain forward and `model.generate`.
    `graph=False` decodes with the eager loop instead of the CUDA graph; `compile` captures the compiled step
    (its compilation falls in the warm-up run).
    """
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = random_model(shape, dev, dtype, ATTENTION)
    arch = Arch(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(dev) if dev.type == "cuda" else None
    info = dict(
        shape=shape,
        device=_device_name(dev),
        dtype=str(dtype).removeprefix("torch."),
        weight_bytes=weights,
        copy_bandwidth_bytes_per_second=bandwidth,
    )
    records = []
    total, done = len(lengths) * len(methods), 0
    for length in lengths:
        layout = synthetic_layout(length, model.config.vocab_size)
        for name, options in methods.items():
            method = parse_method(split_label(name)[0], options)
            record = dict(method=name, length=length, options=options)
            try:
                samples = [_one_run(arch, method, layout, decode_tokens, graph, compile) for _ in range(runs + 1)][1:]
            except torch.OutOfMemoryError:
                record.update(oom=True)
            except LongDocError as exc:  # this method cannot run this length (e.g. too few layers for the chunks)
                record.update(oom=False, error=str(exc))
            else:
                record.update(
                    oom=False,
                    tokens_kept=samples[0]["kept"],
                    cache_bytes=samples[0]["cache_bytes"],
                    ttft_seconds=statistics.median(s["ttft"] for s in samples),
                    decode_tokens_per_second=statistics.median(s["decode_tps"] for s in samples),
                    decode_setup_seconds=statistics.median(s["decode_setup"] for s in samples),
                    decode_notes=samples[0]["notes"],
                    peak_bytes_over_weights=max(s["peak"] or 0 for s in samples) if dev.type == "cuda" else None,
                    runs=runs,
                )
            add_floor(record, weights, bandwidth)
            records.append(record)
            _free(dev)
            done += 1
            progress("speed", done, total)
        if reference:
            records.append(add_floor(_transformers_reference(model, layout, runs, decode_tokens), weights, bandwidth))
            _free(dev)
    return records, info


@torch.inference_mode()
def _transformers_reference(model, layout: PromptLayout, runs: int, decode_tokens: int) -> dict:
    """The yardstick: one plain `model(...)` forward with transformers' SDPA, and `model.generate`'s decode speed."""
    device = next(model.parameters()).device
    ids = layout.input_ids(device)
    record = dict(method="transformers", length=ids.shape[1], options={"attn_implementation": "sdpa"})
    model.set_attn_implementation("sdpa")
    try:
        times, peaks = [], []
        for i in range(runs + 1):
            _free(device)
            with Measure(device) as timer:
                model(ids, use_cache=True, logits_to_keep=1)
            if i:
                times.append(timer.seconds)
                peaks.append(timer.peak_bytes or 0)
        generate = {}
        for new in (1, decode_tokens + 1):
            _free(device)
            _sync(device)
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)  # fmt: skip
            _sync(device)
            generate[new] = time.perf_counter() - start
        record.update(
            oom=False,
            tokens_kept=ids.shape[1],
            cache_bytes=length_bytes(model.config, ids.shape[1], next(model.parameters()).element_size()),
            ttft_seconds=statistics.median(times),
            decode_tokens_per_second=decode_tokens / max(1e-9, generate[decode_tokens + 1] - generate[1]),
            peak_bytes_over_weights=max(peaks) if device.type == "cuda" else None,
            runs=runs,
        )
    except torch.OutOfMemoryError:
        record.update(oom=True)
    finally:
        model.set_attn_implementation(ATTENTION)
    return record


def _one_run(arch: Arch, method, layout: PromptLayout, decode_tokens: int, graph: bool, compile: bool) -> dict:
    """Prefill, then decode `decode_tokens` (at least 3) greedy tokens, timing each as it is yielded.

    Tokens/s counts from the second token on: the first comes from the prefill's logits, and the step
    that makes the second also sets up the decoder (copying the cache into the static buffers and
    capturing the graph), reported apart as `decode_setup_seconds`.
    """
    _free(arch.device)
    with Measure(arch.device) as measure:
        prefilled = method.prefill(arch, layout)
        prefilled.cache = quantized(prefilled.cache, method.kv_bits)
    notes: list[str] = []
    config = GenerationConfig(max_new_tokens=max(3, decode_tokens))
    times = []
    _sync(arch.device)
    for _ in generate_tokens(arch, prefilled, config, eos_ids=(), notes=notes, graph=graph, compile=compile):
        _sync(arch.device)
        times.append(time.perf_counter())
    per_token = (times[-1] - times[1]) / (len(times) - 2)
    return dict(
        kept=prefilled.tokens_kept,
        cache_bytes=prefilled.cache.nbytes(),
        ttft=measure.seconds,
        decode_tps=1 / per_token,
        decode_setup=times[1] - times[0] - per_token,
        notes=notes,
        peak=measure.peak_bytes,
    )


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 20) -> float:
    """Device memory bandwidth in bytes/s: the median of device-to-device copies, counting bytes read plus written."""
    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    seconds = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        seconds.append(begin.elapsed_time(end) / 1000)
    del source, target
    _free(device)
    return 2 * nbytes / statistics.median(seconds)


def length_bytes(config, tokens: int, element_size: int) -> int:
    """Bytes of keys and values for `tokens` positions in every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * element_size


def add_floor(record: dict, weight_bytes: int, bandwidth: float | None) -> dict:
    """The decode floor: every weight and the whole cache read once per token at the measured bandwidth."""
    if bandwidth and "cache_bytes" in record:
        floor = bandwidth / (weight_bytes + record["cache_bytes"])
        record.update(floor_tokens_per_second=floor, fraction_of_floor=record["decode_tokens_per_second"] / floor)
    return record


def reading_records(
    shape: str,
    lengths: list[int],
    methods: dict[str, dict],
    questions: int = 5,
    device: str = "cuda",
    folder: str | None = None,
    progress: ProgressHook = no_progress,
) -> tuple[list[dict], dict]:
    """Read once, ask `questions` times: the first question's TTFT (the reading included), the follow-ups' median
    TTFT, the reading's bytes, and the time to save it to and load it from `folder` (a temporary one by default)."""
    import tempfile
    from pathlib import Path

    from ..reading import ROOM, ReadingCache, load, save

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = random_model(shape, dev, dtype, ATTENTION)
    arch = Arch(model)
    info = dict(shape=shape, device=_device_name(dev), dtype=str(dtype).removeprefix("torch."))
    records, total, done = [], len(lengths) * len(methods), 0
    for length in lengths:
        layouts = [synthetic_layout(length, model.config.vocab_size, seed=0)]
        head = layouts[0].token_ids()[: layouts[0].reading_len]
        for q in range(1, questions + 1):  # same document, another question of the same length
            other = synthetic_layout(length, model.config.vocab_size, seed=q)
            layouts.append(PromptLayout(head[: PREFIX], head[PREFIX:], other.suffix_ids, layouts[0].context_offsets,
                                        layouts[0].context_text))  # fmt: skip
        for name, options in methods.items():
            method = parse_method(split_label(name)[0], options)
            record = dict(method=name, length=length, options=options, questions=questions)
            if not method.reusable:
                record.update(error=f"{name} recomputes per question")
                records.append(record)
                continue
            try:
                _free(dev)
                with Measure(dev) as first:
                    cache = method.read(arch, torch.tensor([head], device=dev), capacity=len(head) + ROOM)
                    method.prefill(arch, layouts[0], reading=cache.fork())
                follow, from_host = [], []
                for layout in layouts[1:]:
                    with Measure(dev) as measure:
                        method.prefill(arch, layout, reading=cache.fork())
                    follow.append(measure.seconds)
                if dev.type == "cuda":  # the same questions with the reading in pinned host memory, streamed in
                    held = ReadingCache(method, head, cache)
                    held.to("cpu")
                    for layout in layouts[1:]:
                        with Measure(dev) as measure:
                            method.prefill(arch, layout, reading=held.lease(dev))
                        held.release()
                        from_host.append(measure.seconds)
                    del held
                with tempfile.TemporaryDirectory(dir=folder) as tmp:
                    reading = ReadingCache(method, head, cache)
                    start = time.perf_counter()
                    save(reading, Path(tmp), {"shape": shape})
                    saved = time.perf_counter() - start
                    del reading, cache
                    _free(dev)
                    start = time.perf_counter()
                    loaded = load(Path(tmp), {"shape": shape}, method, arch.num_layers, dev)
                    _sync(dev)
                    loaded_seconds = time.perf_counter() - start
                record.update(
                    oom=False,
                    first_ttft_seconds=first.seconds,
                    follow_up_ttft_seconds=statistics.median(follow),
                    follow_up_from_host_ttft_seconds=statistics.median(from_host) if from_host else None,
                    reading_bytes=loaded.nbytes,
                    save_seconds=saved,
                    load_seconds=loaded_seconds,
                    peak_bytes_over_weights=first.peak_bytes,
                )
                del loaded
            except torch.OutOfMemoryError:
                record.update(oom=True)
            records.append(record)
            _free(dev)
            done += 1
            progress("reading", done, total)
    return records, info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
