"""H2O (arXiv 2306.14048), a peer baseline: keep the heavy hitters, the keys that received the most attention.

During the ordinary prefill every key accumulates the softmax probability every later query (of the
KV head's query heads) gave it: the column sums of each layer's n x n attention. They are accumulated
chunk by chunk, a few query rows at a time, so the n x n matrix never exists. Then each KV head of each
layer keeps its `keys_per_head` context keys: the last `recent` ones and the heaviest of the others.
The prefix and suffix stay, at their original positions; decoding continues at n. (H2O also evicts
while decoding, to hold its budget; longdoc compresses the prompt only, as SnapKV does.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import Arch, PerDevice
from ..cache import KVCache
from ..errors import LongDocError
from ..progress import ProgressHook, no_progress
from ..prompt import PromptLayout
from ..scores import grouped_logits
from .base import Method, Prefill, strongest

SCORE_ELEMENTS = 1 << 26  # float32 attention probabilities scored at once (256 MiB): query rows per step


@dataclass(frozen=True)
class H2O(Method):
    """Full prefill, then each KV head keeps the context keys the whole prompt attended to most, plus the recent."""

    keys_per_head: int = 1024  # context keys kept per KV head and layer (SnapKV's budget)
    recent: int = 64  # of them, the last context tokens, always kept
    prefill_chunk: int = 8192  # tokens per forward chunk
    past_window: bool = False  # run on prompts longer than the trained window anyway (for comparisons)

    name = "h2o"
    budget_option = "keys_per_head"

    def __post_init__(self) -> None:
        for field_name in ("keys_per_head", "prefill_chunk"):
            if getattr(self, field_name) < 1:
                raise LongDocError(f"{field_name} must be at least 1, got {getattr(self, field_name)}")
        if not 0 <= self.recent <= self.keys_per_head:
            raise LongDocError(f"recent must be between 0 and keys_per_head ({self.keys_per_head}), got {self.recent}")

    @torch.inference_mode()
    def prefill(self, arch: Arch, layout: PromptLayout, progress: ProgressHook = no_progress, reading=None) -> Prefill:
        """The scores include the question's rows, so the compression is redone for every question."""
        n, p, c = len(layout), layout.prefix_len, layout.context_len
        arch.check_span(n)
        input_ids = layout.input_ids(arch.device)
        positions = torch.arange(n, device=arch.device)[None]
        cache = KVCache(arch.num_layers, capacity=n)
        # The attention each key got, per layer on that layer's device (a split model's layers are on several).
        received = [torch.zeros(arch.num_kv_heads, n, device=device) for device in arch.layer_devices]
        hidden = None
        for start in range(0, n, self.prefill_chunk):
            end = min(start + self.prefill_chunk, n)
            hidden = arch.embed(input_ids[:, start:end])
            position_embeddings = arch.rotary(hidden, positions[:, start:end])
            accumulate, finish = _accumulator(arch, cache, received, start, position_embeddings)
            hidden = arch.forward(hidden, position_embeddings, cache, tap=accumulate)
            finish()
            progress("prefill", end, n)
        logits = arch.head(hidden)

        protected = layout.protected_mask(arch.device)
        recent = torch.zeros(c, dtype=torch.bool, device=arch.device)
        recent[max(0, c - self.recent) :] = True
        k = min(self.keys_per_head, c)
        for i in range(arch.num_layers):
            here = received[i].device
            scores = received[i][:, p : p + c].masked_fill((protected | recent).to(here), float("inf"))  # (Hkv, c)
            chosen = scores.topk(k, dim=-1).indices.sort(-1).values + p
            heads = chosen.shape[0]
            index = torch.cat(
                [
                    torch.arange(p, device=here).expand(heads, p),
                    chosen,
                    torch.arange(p + c, n, device=here).expand(heads, n - p - c),
                ],
                dim=1,
            )
            cache.keep(index, layers=[i])
        # Evidence: the context tokens that received the most attention over layers and heads.
        totals = torch.stack([layer[:, p : p + c].to(arch.device) for layer in received]).sum((0, 1))
        totals = totals.masked_fill(protected, float("-inf"))
        kept_context = strongest(totals, min(self.keys_per_head, layout.compressible))
        return Prefill(
            cache=cache,
            next_position=n,
            last_logits=logits,
            kept_context=kept_context.cpu(),
            context_scores=totals[kept_context].cpu(),
            notes=[
                f"h2o: {k} context keys per KV head and layer ({min(self.recent, c)} recent), by attention received"
            ],
        )


def _accumulator(arch: Arch, cache: KVCache, received: list[torch.Tensor], start: int, position_embeddings):
    """A tap for one chunk's forward and its last step: before layer i, score layer i - 1 (its keys are
    cached by then) and take layer i's queries; after the forward, score the last layer."""
    pending: list[tuple[int, torch.Tensor]] = []
    rows = PerDevice(position_embeddings)  # on a split model: copied to each device once, not once per layer

    def accumulate(i: int, layer_input: torch.Tensor) -> None:
        if pending:
            _add_received(received, *pending.pop(), cache, start)
        pending.append((i, arch.queries(i, layer_input, rows(layer_input.device))))

    def finish() -> None:
        _add_received(received, *pending.pop(), cache, start)

    return accumulate, finish


def _add_received(received: list[torch.Tensor], i: int, queries: torch.Tensor, cache: KVCache, start: int) -> None:
    """Add to received[i] the causal softmax probabilities that the queries at rows start.. gave each key."""
    keys, _ = cache.layer(i)
    n, rows = keys.shape[-2], queries.shape[-2]
    step = max(1, SCORE_ELEMENTS // (queries.shape[1] * n))
    for first in range(0, rows, step):
        last = min(first + step, rows)
        logits = grouped_logits(queries[:, :, first:last], keys)  # (1, Hkv, H/Hkv, w, n)
        at = start + torch.arange(first, last, device=keys.device)
        future = torch.arange(n, device=keys.device)[None] > at[:, None]
        probs = logits.masked_fill(future, float("-inf")).softmax(-1)
        received[i][:, :n] += probs[0].sum((1, 2))
