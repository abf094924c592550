"""Where a graph-decoded token's time goes, on a GPU: tokens/s and a kernel table per attention path and compile.

    PYTHONPATH=. python3 benchmarks/decode_profile.py OUT [--lengths 1056,131072] [--steps 128] [--kv-bits 4]

For each cache length (random keys and values, Llama-3.1-8B shape, random bf16 weights) and each variant --
attention through the Triton flash-decoding kernel (`triton`) or PyTorch's masked split-KV path (`masked`), the
step plain or torch.compile'd -- it prints decode tokens/s as `generate_tokens` sees it (a host sync per token),
the GPU time per replay without host syncs, the bandwidth floor of the same run, and writes the profiler's kernel
table of a few replays to OUT/profiles.txt. Before timing it checks the two attention paths give the same logits.
It also times each of the model's matrix shapes as one cuBLAS GEMV in a graph (the weights' share of the floor).
With `--kv-bits` the cache is KIVI's (`QuantizedCache`, #20): its table shows what the per-step fold costs beside
the attention kernel.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import longdoc.flash_decode as flash_decode
import longdoc.static_quantized as static_quantized
from longdoc.arch import Arch
from longdoc.attention import NAME as ATTENTION
from longdoc.bench.shapes import random_model
from longdoc.bench.speed import copy_bandwidth
from longdoc.cache import KVCache
from longdoc.decode_graph import StaticDecoder
from longdoc.quantized import QuantizedCache


def random_cache(arch: Arch, length: int, kv_bits: int | None = None) -> KVCache | QuantizedCache:
    cache = KVCache(arch.num_layers)
    shape = (1, arch.num_kv_heads, length, arch.head_dim)
    for i in range(arch.num_layers):
        keys = torch.randn(shape, device=arch.device, dtype=arch.dtype)
        cache.update(keys, torch.randn_like(keys), i)
    return cache if kv_bits is None else QuantizedCache(cache, kv_bits, free=True)


def graph_seconds(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """GPU time of one replay, replays back to back (no host sync between them)."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000 / replays


def run_variant(
    arch: Arch, cache: KVCache | QuantizedCache, length: int, path: str, compile: bool, steps: int, out: Path
) -> dict:
    use_path(path)
    started = time.perf_counter()
    decoder = StaticDecoder(arch, cache, length, max_steps=steps + 32, capture=True, compile=compile)
    setup = time.perf_counter() - started
    token, times = 1, []
    for i in range(steps):
        logits = decoder(token, length + i)
        token = int(logits.argmax(-1))  # the host sync generate_tokens makes per token
        times.append(time.perf_counter())
    per_token = (times[-1] - times[0]) / (len(times) - 1)
    replay = graph_seconds(decoder.graph, 10)  # the static cache's slot runs on: the mask/visible stays valid
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            decoder.graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sum(e.count for e in events) / 3
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
    with (out / "profiles.txt").open("a") as f:
        f.write(f"\n## {length} keys, {path} attention, compile={compile}, kv_bits={getattr(cache, 'bits', None)}\n")
        f.write(f"{table}\n")
    return dict(
        length=length,
        path=path,
        compile=compile,
        tokens_per_second=1 / per_token,
        replay_seconds=replay,
        kernels_per_step=kernels,
        setup_seconds=setup,
    )


def same_logits(arch: Arch, cache: KVCache | QuantizedCache, length: int) -> float:
    """Max |logits| difference between the two attention paths over 8 eager static steps (bf16)."""
    got = {}
    for path in ("masked", "triton"):
        use_path(path)
        decoder = StaticDecoder(arch, cache, length, max_steps=8, capture=False)
        got[path] = torch.stack([decoder(1 + i, length + i) for i in range(8)])
        del decoder
        torch.cuda.empty_cache()
    scale = got["masked"].abs().max().item()
    return (got["masked"] - got["triton"]).abs().max().item() / scale


def gemv_table(arch: Arch, bandwidth: float) -> list[dict]:
    """Each distinct weight shape as one GEMV (x @ W.T, one row), 32 in a graph: seconds and share of bandwidth."""
    rows = []
    shapes = {tuple(p.shape) for n, p in arch.model.named_parameters() if p.dim() == 2 and "embed" not in n}
    config = arch.config  # and the fused shapes a step could use: q|k|v and gate|up as one matrix each
    shapes |= {(arch.head_dim * (arch.num_heads + 2 * arch.num_kv_heads), config.hidden_size)}
    shapes |= {(2 * config.intermediate_size, config.hidden_size)}
    for out_dim, in_dim in sorted(shapes):
        weights = [torch.randn(out_dim, in_dim, device=arch.device, dtype=arch.dtype) for _ in range(4)]
        x = torch.randn(1, in_dim, device=arch.device, dtype=arch.dtype)
        for w in weights:  # warm-up: cuBLAS picks its kernel outside the capture
            torch.nn.functional.linear(x, w)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(8):
                for w in weights:
                    torch.nn.functional.linear(x, w)
        seconds = graph_seconds(graph, 5) / 32
        nbytes = out_dim * in_dim * 2
        rows.append(
            dict(shape=[out_dim, in_dim], microseconds=seconds * 1e6, of_bandwidth=nbytes / seconds / bandwidth)
        )
        del weights, graph
    return rows


TRITON_USABLE = flash_decode.triton_usable


def use_path(path: str) -> None:
    """The probe's switch between the two attention paths (a KIVI cache's `masked` is its scratch path)."""
    usable = (lambda: False) if path == "masked" else TRITON_USABLE  # noqa: E731
    flash_decode.triton_usable = static_quantized.triton_usable = usable


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--lengths", default="1056,131072")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--paths", default="masked,triton", help="attention paths to time")
    parser.add_argument("--steps-kind", default="plain,compiled", help="plain and/or compiled steps")
    parser.add_argument("--kv-bits", type=int, default=None, help="a KIVI cache of 8, 4 or 2 bits (#20)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    model = random_model("llama-3.1-8b", device, torch.bfloat16, ATTENTION)
    arch = Arch(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    report = dict(
        weight_bytes=weights, bandwidth=bandwidth, kv_bits=args.kv_bits, gemv=gemv_table(arch, bandwidth), runs=[]
    )
    for row in report["gemv"]:
        print(f"gemv {row['shape']}: {row['microseconds']:.1f} us, {row['of_bandwidth']:.0%} of the copy bandwidth")
    for length in [int(n) for n in args.lengths.split(",")]:
        cache = random_cache(arch, length, args.kv_bits)
        cache_bytes = cache.nbytes()
        floor = bandwidth / (weights + cache_bytes)
        report.setdefault("agreement", {})[length] = same_logits(arch, cache, length)
        print(f"{length}: relative logit difference masked vs triton {report['agreement'][length]:.2e}")
        for compile in [kind == "compiled" for kind in args.steps_kind.split(",")]:
            for path in args.paths.split(","):
                row = run_variant(arch, cache, length, path, compile, args.steps, args.out)
                row.update(floor_tokens_per_second=floor, fraction_of_floor=row["tokens_per_second"] / floor)
                report["runs"].append(row)
                print(
                    f"{length:>7} {path:>6} compile={compile!s:<5} {row['tokens_per_second']:6.1f} tok/s "
                    f"({row['fraction_of_floor']:.0%} of {floor:.0f}), replay {row['replay_seconds'] * 1e3:.2f} ms, "
                    f"{row['kernels_per_step']:.0f} kernels, setup {row['setup_seconds']:.1f} s",
                    flush=True,
                )
                torch.cuda.empty_cache()
        del cache
        torch.cuda.empty_cache()
    (args.out / "decode-profile.json").write_text(json.dumps(report, indent=1))
    print(
        json.dumps(
            {r["path"] + str(r["compile"]) + str(r["length"]): round(r["tokens_per_second"], 1) for r in report["runs"]}
        )
    )


if __name__ == "__main__":
    main()
