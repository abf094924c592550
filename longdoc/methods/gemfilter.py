"""GemFilter (arXiv 2409.17422): early layers pick the tokens that matter; the model re-reads only those.

Pass 1 runs layers 0..r-1 over the whole prompt with no cache. At layer r the last token's query
(after RoPE) is dotted with every key: raw logits, no softmax or 1/sqrt(d), keys shared across a
GQA group, summed over all query heads, smoothed by a 1-D average pool (kernel 5). The top_k
context tokens, in their original order, plus the whole prefix and suffix, are then prefilled
through the full model with fresh positions 0..m-1, and decoding continues at position m.

Differences from the reference code, on purpose: the prefix (BOS / attention sink, system prompt)
and the suffix (question, assistant header) are always kept, and `top_k` counts context tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..arch import Arch
from ..cache import KVCache
from ..errors import LongDocError
from ..progress import ProgressHook, no_progress
from ..prompt import PromptLayout
from ..scores import causal_window_probs
from .base import Prefilled, Timer, reread_kept, strongest

log = logging.getLogger(__name__)

# Filter layers reported by the GemFilter paper (0-based), matched against the model's name or path.
KNOWN_FILTER_LAYERS = {
    "llama-3.1-8b": 13,
    "mistral-nemo": 19,
    "phi-3.5-mini": 19,
}
DEFAULT_DEPTH_FRACTION = 0.4
SCORES = ("logits", "softmax")


def default_filter_layer(arch: Arch) -> tuple[int, str]:
    """The paper's layer for a known model, else about 0.4 of the depth; returns (layer, why)."""
    name = str(getattr(arch.config, "_name_or_path", "")).lower()
    for key, layer in KNOWN_FILTER_LAYERS.items():
        if key in name and layer < arch.num_layers:
            return layer, f"filter layer {layer} (the GemFilter paper's choice for {key})"
    layer = min(arch.num_layers - 1, round(DEFAULT_DEPTH_FRACTION * arch.num_layers))
    return layer, (
        f"filter layer {layer} of {arch.num_layers} (no known value for this model: about 0.4 of depth; "
        "`longdoc bench layers` finds a better one)"
    )


@dataclass(frozen=True)
class GemFilterConfig:
    top_k: int = 1024  # context tokens kept
    filter_layer: int | None = None  # None: known table, else about 0.4 of depth
    pool_kernel: int = 5
    query_tokens: int = 1  # score with the last w queries (summed); the paper uses 1
    chunk_size: int = 8192  # sequence chunk of the second (full-model) pass
    # "logits": the paper's raw q.k summed over heads. "softmax": each head's attention probabilities
    # summed over heads, for models where a few retrieval heads are swamped by other heads' large logits.
    score: str = "logits"

    name = "gemfilter"

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise LongDocError(f"top_k must be at least 1, got {self.top_k}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise LongDocError(f"pool_kernel must be a positive odd number, got {self.pool_kernel}")
        if self.query_tokens < 1:
            raise LongDocError(f"query_tokens must be at least 1, got {self.query_tokens}")
        if self.filter_layer is not None and self.filter_layer < 0:
            raise LongDocError(f"filter_layer must be 0 or more, got {self.filter_layer}")
        if self.chunk_size < 1:
            raise LongDocError(f"chunk_size must be at least 1, got {self.chunk_size}")
        if self.score not in SCORES:
            raise LongDocError(f"score must be one of {', '.join(SCORES)}, got '{self.score}'")

    def resolve_layer(self, arch: Arch) -> tuple[int, str]:
        if self.filter_layer is None:
            return default_filter_layer(arch)
        if self.filter_layer >= arch.num_layers:
            raise LongDocError(
                f"filter_layer {self.filter_layer} is out of range: this model has {arch.num_layers} layers "
                f"(0..{arch.num_layers - 1})"
            )
        return self.filter_layer, f"filter layer {self.filter_layer} (as configured)"

    def prefill(self, arch: Arch, layout: PromptLayout, progress: ProgressHook = no_progress) -> Prefilled:
        layer, why = self.resolve_layer(arch)
        n = len(layout)
        arch.check_span(n)
        with Timer(arch.device) as timer:
            scores = self.token_scores(arch, layout.input_ids(arch.device), layer, progress)
            p, c = layout.prefix_len, layout.context_len
            context_scores = scores[p : p + c]
            kept_context = strongest(context_scores, self.top_k)
            cache, m, logits = reread_kept(arch, layout, kept_context, self.chunk_size, progress)
        log.info("gemfilter: %s; kept %d of %d tokens", why, m, n)
        return Prefilled(
            cache=cache,
            next_position=m,
            last_logits=logits,
            tokens_in=n,
            tokens_kept=m,
            kept_context=kept_context.cpu(),
            context_scores=context_scores[kept_context].cpu(),
            notes=[why],
            prefill_seconds=timer.seconds,
            peak_memory_bytes=timer.peak_bytes,
        )

    @torch.inference_mode()
    def token_scores(
        self, arch: Arch, input_ids: torch.Tensor, layer: int, progress: ProgressHook = no_progress
    ) -> torch.Tensor:
        """Pooled selection score of every prompt token at `layer`, (n,) float32.

        Layer by layer, each in sequence chunks: only the hidden states, one layer's keys and values
        and one chunk's activations are alive, and no n x n scores are ever formed.
        """
        n = input_ids.shape[1]
        hidden = arch.embed(input_ids)
        cos, sin = arch.rotary(hidden, torch.arange(n, device=hidden.device)[None])
        chunks = [(start, min(start + self.chunk_size, n)) for start in range(0, n, self.chunk_size)]
        for i in range(layer):
            cache = KVCache(arch.num_layers)  # this layer's keys and values only, dropped after it
            for start, end in chunks:
                mask = arch.attention_mask(end - start, end, hidden.dtype, hidden.device)
                rows = (cos[:, start:end], sin[:, start:end])
                hidden[:, start:end] = arch.run_layer(i, hidden[:, start:end], rows, cache, mask)
            del cache
            progress("filter", i + 1, layer + 1)
        w = min(self.query_tokens, n)
        queries = arch.queries(layer, hidden[:, n - w :], (cos[:, n - w :], sin[:, n - w :]))
        keys = torch.cat(
            [arch.keys(layer, hidden[:, start:end], (cos[:, start:end], sin[:, start:end])) for start, end in chunks],
            dim=2,
        )
        if self.score == "logits":
            batch, heads, _, d = queries.shape
            kv_heads = keys.shape[1]
            # Sum the queries of each GQA group (and the w rows): sum_h q_h . k_g(h) = sum_g (sum_{h in g} q_h) . k_g
            grouped = queries.float().view(batch, kv_heads, heads // kv_heads * w, d).sum(2)
            scores = torch.einsum("bgd,bgnd->bn", grouped, keys.float())
        else:
            scores = causal_window_probs(queries, keys).sum((1, 2, 3))
        pooled = F.avg_pool1d(scores[:, None], self.pool_kernel, stride=1, padding=self.pool_kernel // 2)
        progress("filter", layer + 1, layer + 1)
        return pooled[0, 0]
