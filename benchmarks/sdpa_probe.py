"""Which SDPA kernel serves a chunk of queries after a long cache (bottom-right causal), and how fast.

    python benchmarks/sdpa_probe.py [--q 8192] [--kv 131072]

Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head dim 128), bf16, on CUDA.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from longdoc.attention import chunk_after_cache, cudnn_attention_with_lse


def timed(fn, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--q", type=int, default=8192)
    parser.add_argument("--kv", type=int, default=131072)
    args = parser.parse_args()
    q = torch.randn(1, 32, args.q, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, args.kv, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k_rep, v_rep = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    bias = causal_lower_right(args.q, args.kv)
    cases = {
        "lower_right+gqa (longdoc_sdpa)": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, enable_gqa=True
        ),
        "lower_right, repeated kv": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=bias),
        "no mask, repeated kv (upper bound)": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep),
        "no mask + gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    }
    # What longdoc_sdpa runs on CUDA: cached keys + own causal square through cuDNN, joined by lse.
    joined_label = "cached + own, cuDNN joined (longdoc_sdpa)"

    def joined():
        return chunk_after_cache(q, k, v, 128**-0.5, cudnn_attention_with_lse)

    results = {}
    for name, fn in cases.items():
        for backend in (None, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            label = f"{name} [{backend.name if backend else 'auto'}]"
            try:
                if backend is None:
                    seconds = timed(fn)
                else:
                    with sdpa_kernel([backend]):
                        seconds = timed(fn)
                results[label] = round(seconds * 1000, 2)
            except RuntimeError as exc:
                results[label] = f"unavailable: {str(exc).splitlines()[0][:80]}"
            print(f"{label}: {results[label]}", flush=True)
    results[joined_label] = round(timed(joined) * 1000, 2)
    print(f"{joined_label}: {results[joined_label]}", flush=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True).float()
    got = joined().float()
    results["joined vs lower_right max abs diff"] = (got - want).abs().max().item()
    print(json.dumps(dict(q=args.q, kv=args.kv, torch=torch.__version__, ms=results), indent=1))


if __name__ == "__main__":
    main()
