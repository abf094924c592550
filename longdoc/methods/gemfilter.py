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
from ..quantized import QuantizedCache
from ..scores import causal_window_probs
from .base import Method, Prefill, reread_kept, strongest

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
        "`longdoc tune` measures a better one)"
    )


@dataclass(frozen=True)
class GemFilter(Method):
    """Early layers pick the tokens that matter; the whole model re-reads only those."""

    top_k: int = 1024  # context tokens kept
    filter_layer: int | None = None  # None: known table, else about 0.4 of depth
    pool_kernel: int = 5
    query_tokens: int = 1  # score with the last w queries (summed); the paper uses 1
    prefill_chunk: int = 8192  # tokens per forward chunk, in both passes
    # "logits": the paper's raw q.k summed over heads. "softmax": each head's attention probabilities
    # summed over heads, for models where a few retrieval heads are swamped by other heads' large logits.
    score: str = "logits"
    past_window: bool = False  # run on prompts longer than the trained window anyway (for comparisons)

    name = "gemfilter"
    reusable = True  # layers 0..r over [prefix | document] do not depend on the question
    budget_option = "top_k"

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise LongDocError(f"top_k must be at least 1, got {self.top_k}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise LongDocError(f"pool_kernel must be a positive odd number, got {self.pool_kernel}")
        if self.query_tokens < 1:
            raise LongDocError(f"query_tokens must be at least 1, got {self.query_tokens}")
        if self.filter_layer is not None and self.filter_layer < 0:
            raise LongDocError(f"filter_layer must be 0 or more, got {self.filter_layer}")
        if self.prefill_chunk < 1:
            raise LongDocError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
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

    def reading_layers(self, arch: Arch) -> int:
        """Layers 0..r-1 with keys and values, and layer r with keys only (values of width 0)."""
        return self.resolve_layer(arch)[0] + 1

    @torch.inference_mode()
    def extend(self, arch: Arch, cache: KVCache, input_ids: torch.Tensor, progress: ProgressHook = no_progress) -> None:
        """Append layers 0..r-1's keys and values and layer r's keys of `input_ids` (1, m), after `cache`'s rows."""
        layer, _ = self.resolve_layer(arch)
        start = cache.seq_length()
        hidden = arch.embed(input_ids)
        rows = arch.rotary(hidden, torch.arange(start, start + input_ids.shape[1], device=hidden.device)[None])
        chunks = _chunks(0, input_ids.shape[1], self.prefill_chunk)
        hidden, rows = self._filter_layers(arch, hidden, rows, cache, layer, chunks, True, progress)
        for first, end in chunks:
            keys = arch.keys(layer, hidden[:, first:end], _rows(rows, first, end))
            cache.update(keys, keys[..., :0], layer)

    @torch.inference_mode()
    def prefill(
        self,
        arch: Arch,
        layout,
        progress: ProgressHook = no_progress,
        reading: KVCache | QuantizedCache | None = None,
    ) -> Prefill:
        layer, why = self.resolve_layer(arch)
        n, split = len(layout), layout.reading_len
        arch.check_span(n)
        scores, capped = self.token_scores(arch, layout.input_ids(arch.device), split, layer, reading, progress)
        p, c = layout.prefix_len, layout.context_len
        context_scores = scores[p : p + c].masked_fill(layout.protected_mask(scores.device), float("-inf"))
        kept_context = strongest(context_scores, min(self.top_k, c - len(layout.protected)))
        notes = [why] + ([f"gemfilter: scored with the question's last {capped} queries"] if capped else [])
        prefill = reread_kept(
            arch, layout, kept_context, context_scores[kept_context], self.prefill_chunk, progress, notes
        )
        log.info("gemfilter: %s; kept %d of %d tokens", why, prefill.next_position, n)
        return prefill

    def token_scores(
        self,
        arch: Arch,
        input_ids: torch.Tensor,
        split: int,
        layer: int,
        reading: KVCache | QuantizedCache | None = None,
        progress: ProgressHook = no_progress,
    ) -> tuple[torch.Tensor, int | None]:
        """Pooled selection score of every prompt token at `layer`, (n,) float32; and the query rows if capped.

        Rows [0, split) are the document's part (a reading's, when given) and [split, n) the question's,
        each cut into chunks from its own start. Layer by layer, so without a reading only one layer's keys
        and values, the hidden states and one chunk's activations are alive; no n x n scores are formed.
        With `kv_bits` the document's part is always a (quantized) reading, as a follow-up's is (see `read`).
        """
        n = input_ids.shape[1]
        if reading is None and self.kv_bits is not None:
            reading = self.read(arch, input_ids[:, :split], progress)
        first = split if reading is not None else 0  # the rows computed here
        hidden = arch.embed(input_ids[:, first:])
        rows = arch.rotary(hidden, torch.arange(first, n, device=hidden.device)[None])
        chunks = _chunks(0, split - first, self.prefill_chunk) + _chunks(split - first, n - first, self.prefill_chunk)
        cache = reading if reading is not None else KVCache(arch.num_layers)  # a lease: ours to append to
        # Each layer's keys and values are dropped once the question's rows have passed it (from a fork, only the
        # fork's references): one layer alive, and a reading held in host memory streams in one layer at a time.
        hidden, rows = self._filter_layers(arch, hidden, rows, cache, layer, chunks, False, progress)
        for start, end in chunks:
            keys = arch.keys(layer, hidden[:, start:end], _rows(rows, start, end))
            cache.update(keys, keys[..., :0], layer)
        keys = cache.layer(layer)[0]  # (1, Hkv, n, d): the document's from the reading, the question's just made
        w = min(self.query_tokens, n - split)  # the question's rows: the same with or without a reading
        queries = arch.queries(layer, hidden[:, -w:], _rows(rows, hidden.shape[1] - w, hidden.shape[1]))
        if self.score == "logits":
            batch, heads, _, d = queries.shape
            kv_heads = keys.shape[1]
            # Sum the queries of each GQA group (and the w rows): sum_h q_h . k_g(h) = sum_g (sum_{h in g} q_h) . k_g
            grouped = queries.float().reshape(batch, kv_heads, heads // kv_heads * w, d).sum(2)
            scores = torch.einsum("bgd,bgnd->bn", grouped, keys.float())
        else:
            scores = causal_window_probs(queries, keys).sum((1, 2, 3))
        pooled = F.avg_pool1d(scores[:, None], self.pool_kernel, stride=1, padding=self.pool_kernel // 2)
        return pooled[0, 0], (w if w < self.query_tokens else None)

    def _filter_layers(self, arch, hidden, rows, cache, layer, chunks, keep: bool, progress=no_progress):
        """Layers 0..layer-1 over `hidden` in place, layer by layer, each in `chunks`; keep or free each layer.

        Returns the hidden states and position embeddings on the filter layer's device: on a split model both move
        where the next layer runs, once (not once per chunk and back).
        """
        steps = max(1, layer * len(chunks))
        for i in range(layer + 1):
            device = arch.layer_devices[i]
            hidden, rows = hidden.to(device), tuple(t.to(device) for t in rows)  # no copy where they are already
            if i == layer:
                break
            for j, (start, end) in enumerate(chunks):
                hidden[:, start:end] = arch.forward(
                    hidden[:, start:end], _rows(rows, start, end), cache, layers=range(i, i + 1)
                )
                progress("filter", i * len(chunks) + j + 1, steps)
            if not keep:
                cache.free(i)
        return hidden, rows


def _chunks(start: int, end: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, end)) for s in range(start, end, size)]


def _rows(position_embeddings, start: int, end: int):
    cos, sin = position_embeddings
    return cos[:, start:end], sin[:, start:end]
