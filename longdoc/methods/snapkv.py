"""SnapKV (arXiv 2404.14469), a peer baseline: full prefill, then each KV head keeps its own top-k keys.

After the ordinary prefill, the last `window` prompt tokens (the observation window) vote in every
layer: their softmax attention over the earlier keys, averaged over the query heads of each KV head
and summed over the window, average-pooled (kernel 5), picks `top_k` context keys per KV head. The
prefix, those keys and the window stay, at their original positions; decoding continues at n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..arch import Arch
from ..cache import KVCache
from ..errors import LongDocError
from ..progress import ProgressHook, no_progress
from ..prompt import PromptLayout
from ..scores import causal_window_probs
from .base import Prefilled, Timer, run_model, strongest


@dataclass(frozen=True)
class SnapKVConfig:
    top_k: int = 1024  # context keys kept per KV head (GemFilter's budget)
    window: int = 32  # observation window: the last prompt tokens, always kept
    pool_kernel: int = 5
    chunk_size: int = 8192

    name = "snapkv"

    def __post_init__(self) -> None:
        for field_name in ("top_k", "window", "pool_kernel", "chunk_size"):
            if getattr(self, field_name) < 1:
                raise LongDocError(f"{field_name} must be at least 1, got {getattr(self, field_name)}")
        if self.pool_kernel % 2 == 0:
            raise LongDocError(f"pool_kernel must be odd, got {self.pool_kernel}")

    @torch.inference_mode()
    def prefill(self, arch: Arch, layout: PromptLayout, progress: ProgressHook = no_progress) -> Prefilled:
        n, p = len(layout), layout.prefix_len
        arch.check_span(n)
        w = min(self.window, n - p)
        input_ids = layout.input_ids(arch.device)
        positions = torch.arange(n, device=arch.device)[None]
        with Timer(arch.device) as timer:
            cache = KVCache(arch.num_layers)
            if n - w:
                run_model(arch, input_ids[:, : n - w], positions[:, : n - w], cache, self.chunk_size, progress)
            # The window runs last so its queries can be taken at every layer.
            hidden = arch.embed(input_ids[:, n - w :])
            position_embeddings = arch.rotary(hidden, positions[:, n - w :])
            mask = arch.attention_mask(w, n, hidden.dtype, hidden.device)
            votes = torch.zeros(n - w - p, device=arch.device)
            selections = []
            for i in range(arch.num_layers):
                queries = arch.queries(i, hidden, position_embeddings)
                hidden = arch.run_layer(i, hidden, position_embeddings, cache, mask)
                keys, values = cache.layer(i)
                # The window's attention summed over its rows, averaged over each KV head's query heads.
                head_scores = causal_window_probs(queries, keys).sum(3).mean(2)[..., p : n - w]  # (1, Hkv, n - w - p)
                pooled = F.avg_pool1d(head_scores[0], self.pool_kernel, stride=1, padding=self.pool_kernel // 2)
                k = min(self.top_k, pooled.shape[-1])
                chosen = pooled.topk(k, dim=-1).indices.sort(-1).values + p  # (kv_heads, k)
                votes += pooled.sum(0)
                index = torch.cat(
                    [
                        torch.arange(p, device=arch.device).expand(chosen.shape[0], p),
                        chosen,
                        torch.arange(n - w, n, device=arch.device).expand(chosen.shape[0], w),
                    ],
                    dim=1,
                )
                selections.append(index)
                progress("snapkv", i + 1, arch.num_layers)
            logits = arch.logits(arch.final_norm(hidden[:, -1:]))[:, -1]
            for i, index in enumerate(selections):
                keys, values = cache.layer(i)
                gather = index[None, :, :, None].expand(1, -1, -1, keys.shape[-1])
                cache.set_layer(i, keys.gather(2, gather), values.gather(2, gather))
        # Evidence: the context tokens with the most votes over layers and heads.
        context_votes = votes[: layout.context_len]
        kept_context = strongest(context_votes, self.top_k)
        m = cache.seq_length()
        return Prefilled(
            cache=cache,
            next_position=n,
            last_logits=logits,
            tokens_in=n,
            tokens_kept=m,
            kept_context=kept_context.cpu(),
            context_scores=context_votes[kept_context].cpu(),
            notes=[f"snapkv: {self.top_k} keys per KV head + {w}-token window, per layer"],
            prefill_seconds=timer.seconds,
            peak_memory_bytes=timer.peak_bytes,
        )
