"""Graph decoding with and without torch.compile on a random model of a real shape: tokens/s, setup, same tokens.

    PYTHONPATH=. python3 benchmarks/decode_probe.py OUT.json --lengths 1056,131072 --tokens 256

Each length is prefilled once with `full` (random token ids); each variant decodes greedily from a fork of that
cache. The floor is (weights + cache) / the copy bandwidth of the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from longdoc.arch import Arch
from longdoc.attention import NAME as ATTENTION
from longdoc.bench.shapes import random_model
from longdoc.bench.speed import copy_bandwidth, synthetic_layout
from longdoc.decode_graph import StaticDecoder
from longdoc.methods import Full


def decode(arch: Arch, prefilled, tokens: int, compile: bool) -> dict:
    cache = prefilled.cache.fork()
    torch.cuda.synchronize()
    start = time.perf_counter()
    decoder = StaticDecoder(arch, cache, prefilled.next_position, tokens, capture=True, compile=compile)
    torch.cuda.synchronize()
    setup = time.perf_counter() - start
    token = int(prefilled.last_logits.argmax(-1))
    out = [token]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(tokens):
        token = int(decoder(token, prefilled.next_position + i).argmax(-1))
        out.append(token)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del decoder, cache
    torch.cuda.empty_cache()
    return dict(compile=compile, setup_seconds=setup, tokens_per_second=tokens / seconds, tokens=out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--lengths", default="1056,131072")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    device = torch.device("cuda")
    model = random_model(args.shape, device, torch.bfloat16, ATTENTION)
    arch = Arch(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    records = []
    for length in (int(x) for x in args.lengths.split(",")):
        layout = synthetic_layout(length, model.config.vocab_size)
        prefilled = Full().prefill(arch, layout)
        floor = bandwidth / (weights + prefilled.cache.nbytes())
        runs = [decode(arch, prefilled, args.tokens, compile) for compile in (False, True, True)]
        print("graph breaks so far:", dict(torch._dynamo.utils.counters["graph_break"]), flush=True)
        for run in runs:
            run.update(length=length, floor=floor, fraction=run["tokens_per_second"] / floor)
            run["same_tokens_as_graph"] = run["tokens"] == runs[0]["tokens"]
            print({k: v for k, v in run.items() if k != "tokens"}, flush=True)
            records.append(run)
        del prefilled
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(shape=args.shape, bandwidth=bandwidth, weights=weights, records=records), f, indent=1)


if __name__ == "__main__":
    main()
