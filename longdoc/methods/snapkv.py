"""SnapKV (arXiv 2404.14469), a peer baseline: full prefill, then each KV head keeps its own top-k keys.

After the ordinary prefill, the last `window` prompt tokens (the observation window) vote in every
layer: their softmax attention over the earlier keys, averaged over the query heads of each KV head
and summed over the window, average-pooled (kernel 5) over every earlier row, picks `top_k` context
keys per KV head. The prefix, those keys and the window stay, at their original positions; decoding continues at n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..arch import Arch, PerDevice
from ..cache import KVCache
from ..errors import LongDocError
from ..progress import ProgressHook, no_progress
from ..prompt import PromptLayout
from ..scores import causal_window_probs
from .base import Method, Prefill, run_model, strongest


@dataclass(frozen=True)
class SnapKV(Method):
    """Full prefill, then each KV head of each layer keeps the keys the question's last tokens attend to most."""

    keys_per_head: int = 1024  # context keys kept per KV head and layer (GemFilter's top_k, per head)
    window: int = 32  # observation window: the last prompt tokens, always kept
    pool_kernel: int = 5
    prefill_chunk: int = 8192  # tokens per forward chunk
    past_window: bool = False  # run on prompts longer than the trained window anyway (for comparisons)

    name = "snapkv"
    budget_option = "keys_per_head"

    def __post_init__(self) -> None:
        for field_name in ("keys_per_head", "window", "pool_kernel", "prefill_chunk"):
            if getattr(self, field_name) < 1:
                raise LongDocError(f"{field_name} must be at least 1, got {getattr(self, field_name)}")
        if self.pool_kernel % 2 == 0:
            raise LongDocError(f"pool_kernel must be odd, got {self.pool_kernel}")

    @torch.inference_mode()
    def prefill(self, arch: Arch, layout: PromptLayout, progress: ProgressHook = no_progress, reading=None) -> Prefill:
        """The window's vote depends on the question, so the compression is redone for every question."""
        n, p = len(layout), layout.prefix_len
        arch.check_span(n)
        w = min(self.window, n - p)
        input_ids = layout.input_ids(arch.device)
        positions = torch.arange(n, device=arch.device)[None]
        cache = KVCache(arch.num_layers)
        if n - w:
            run_model(arch, input_ids[:, : n - w], positions[:, : n - w], cache, self.prefill_chunk, progress)
        # The window runs last so its queries can be taken at every layer.
        hidden = arch.embed(input_ids[:, n - w :])
        position_embeddings = arch.rotary(hidden, positions[:, n - w :])
        scored = n - w - p  # rows that vote can choose: after the prefix, before the window
        protected = torch.zeros(scored, dtype=torch.bool, device=arch.device)
        protected[: min(scored, layout.context_len)] = layout.protected_mask(arch.device)[:scored]
        votes = torch.zeros(scored, device=arch.device)
        selections = []

        rows = PerDevice(position_embeddings)  # on a split model: copied to each device once, not once per layer

        def vote(i: int, layer_input: torch.Tensor) -> None:
            """Before layer i: remember its window queries; after it (at the next call) score its keys."""
            selections.append(arch.queries(i, layer_input, rows(layer_input.device)))

        hidden = arch.forward(hidden, position_embeddings, cache, tap=vote)
        for i, queries in enumerate(selections):
            keys, _ = cache.layer(i)
            # The window's attention summed over its rows, averaged over each KV head's query heads.
            head_scores = causal_window_probs(queries, keys).sum(3).mean(2)[..., : n - w]  # (1, Hkv, n - w)
            # Pooled over every row before the window, then the prefix cut away, as SnapKV's and kvpress's
            # references do: the first and last context rows average with their true neighbours, not zeros.
            pooled = F.avg_pool1d(head_scores[0], self.pool_kernel, stride=1, padding=self.pool_kernel // 2)[:, p:]
            votes += pooled.sum(0).to(votes.device)  # on a split model layer i's scores are on its own device
            k = min(self.keys_per_head, pooled.shape[-1])
            here = pooled.device
            chosen = pooled.masked_fill(protected.to(here), float("inf")).topk(k, dim=-1).indices.sort(-1).values + p
            index = torch.cat(
                [
                    torch.arange(p, device=here).expand(chosen.shape[0], p),
                    chosen,
                    torch.arange(n - w, n, device=here).expand(chosen.shape[0], w),
                ],
                dim=1,
            )
            cache.keep(index, layers=[i])
            progress("snapkv", i + 1, arch.num_layers)
        logits = arch.head(hidden)
        # Evidence: the context tokens with the most votes over layers and heads.
        context_votes = votes[: layout.context_len].masked_fill(protected[: layout.context_len], float("-inf"))
        kept_context = strongest(context_votes, min(self.keys_per_head, layout.compressible))
        return Prefill(
            cache=cache,
            next_position=n,
            last_logits=logits,
            kept_context=kept_context.cpu(),
            context_scores=context_votes[kept_context].cpu(),
            notes=[f"snapkv: {self.keys_per_head} keys per KV head + {w}-token window, per layer"],
        )
