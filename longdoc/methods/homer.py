"""HOMER (arXiv 2404.10308): hierarchical context merging with token reduction.

The context is split into a power-of-two number of chunks, each run as [prefix | slice | suffix].
Early layers process chunks independently; at scheduled layers adjacent chunks merge pairwise,
each first pruned to half its context by the last token's attention logits, so a merged chunk
still fits one chunk. The merge tree is evaluated depth first, so at most about log2(chunks) + 1
chunk states are alive, and memory grows with log(n). Pruning also drops the same tokens from
the chunk's lower layers (propagative refinement), so the root ends with an ordinary KV cache
that holds the same tokens in every layer, and decoding runs on it unchanged.

Any length on any depth: a tree with more levels than the layers after warm-up spreads its levels
over those layers, and a level without a layer of its own merges at the layer of the level below,
pruning by that layer's scores (layer_schedule). Budgets pass down the tree as in the reference:
half a chunk per child, a lone left child unpruned, and a short last chunk kept whole with its left
sibling keeping the rest (_Run.budgets).

Positions follow the reference: every chunk's context starts at position len(prefix); the
suffix sits at len(prefix) + chunk_len in every chunk; merged position ids are concatenated,
never renumbered, so no position exceeds max_chunk_len. Decoding continues at the last one + 1.

Positional calibration: when a `longdoc calibrate` file is found (next to the model, or given), the
mean score at each layer and distance is subtracted before pruning; the notes say whether it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..arch import Arch
from ..cache import Devices, KVCache
from ..calibration import find as find_calibration
from ..calibration import load as load_calibration
from ..errors import LongDocError
from ..progress import ProgressHook, no_progress
from ..prompt import PromptLayout
from ..scores import last_token_logits
from .base import Method, Prefill, keep_index, strongest

DEFAULT_CHUNK_CAP = 4096
OFFLOAD_MIN_LEAVES = 8
AUTO_OFFLOAD_CHUNKS = 32
WARMUP_FRACTION = 0.375  # the reference's 12 warm-up layers of 32


@dataclass
class ChunkState:
    """One chunk (or merged chunk) between layers: hidden states, positions and its own KV cache."""

    hidden: torch.Tensor  # (1, len, d) entering the next layer
    positions: torch.Tensor  # (1, len) RoPE positions
    cache: KVCache  # keys/values of the layers this chunk has run
    prefix_len: int
    suffix_len: int
    context_index: torch.Tensor  # original context-token index of each context row
    context_scores: torch.Tensor | None = None  # last reduction score of each context row

    @property
    def context_len(self) -> int:
        return self.hidden.shape[1] - self.prefix_len - self.suffix_len

    def to(self, device: torch.device | str, cache_devices: Devices | None = None) -> ChunkState:
        """The same state with its hidden states on `device` and its cached layers on `cache_devices` (one for
        all, or one per layer: where a split model's layers run; default `device`). Positions stay where they are
        (a few bytes a row)."""
        return ChunkState(
            hidden=self.hidden.to(device),
            positions=self.positions,
            cache=self.cache.to(device if cache_devices is None else cache_devices),
            prefix_len=self.prefix_len,
            suffix_len=self.suffix_len,
            context_index=self.context_index,
            context_scores=self.context_scores,
        )

    def keep(self, rows: torch.Tensor, scores: torch.Tensor) -> None:
        """Keep these context rows (ascending) and the whole prefix and suffix, in every layer run so far."""
        index = keep_index(self.prefix_len, self.context_len, self.hidden.shape[1], rows)
        self.hidden = self.hidden[:, index.to(self.hidden.device)]  # on a split model, the last layer's device
        self.positions = self.positions[:, index.to(self.positions.device)]
        self.cache.keep(index)  # each layer on its own device
        self.context_index = self.context_index[rows.to(self.context_index.device)]
        self.context_scores = scores[rows.to(scores.device)].cpu()


def layer_schedule(num_layers: int, warmup: int, height: int) -> list[range]:
    """Layers run at each tree level (0 = leaves ... height = root).

    M = L - warmup layers are shared out: lpc = M // (height + 1) per level, the leftover to the
    leaves, which also run the warm-up layers (the reference's rule). When the tree has more levels
    than M (a long input on a shallow model), the levels are spread over the M layers instead: a
    level that gets no layer of its own merges at the layer where the level below ended and prunes
    by that layer's scores, so several levels merge at one layer. Leaves and root always run a layer.
    """
    shared = num_layers - warmup
    per_level = shared // (height + 1)
    if per_level >= 1:
        first = warmup + (shared - per_level * (height + 1)) + per_level
        return [range(0, first)] + [range(first + i * per_level, first + (i + 1) * per_level) for i in range(height)]
    starts = [max(warmup + (i * shared) // (height + 1), 1) for i in range(1, height + 1)]
    if starts[-1] >= num_layers:
        raise LongDocError(f"a {num_layers}-layer model has no layer left to merge {2**height} chunks at")
    bounds = [0, *starts, num_layers]
    return [range(bounds[i], bounds[i + 1]) for i in range(height + 1)]


def default_chunk_len(arch: Arch) -> int:
    """Half the trained window, as the reference, capped at DEFAULT_CHUNK_CAP (the cap when the window is unknown)."""
    window = arch.trained_window
    return min(window // 2, DEFAULT_CHUNK_CAP) if window else DEFAULT_CHUNK_CAP


@dataclass(frozen=True)
class Homer(Method):
    """Hierarchical chunk merging with token reduction: reads past the trained window in log(n) memory."""

    max_chunk_len: int | None = None  # tokens per chunk incl. prefix and suffix; default min(window/2, 4096)
    target_len: int | None = None  # tokens the root keeps; default max_chunk_len
    warmup_layers: int | None = None  # default round(0.375 * layers), the reference's 12 of 32
    # Positional calibration: a file from `longdoc calibrate`; None looks for longdoc-calibration.safetensors
    # in the model's folder; "off" never calibrates.
    calibration: str | None = None
    # Park a finished left subtree of at least OFFLOAD_MIN_LEAVES leaves in host memory while its sibling
    # subtree runs. None: on CUDA beyond AUTO_OFFLOAD_CHUNKS chunks. Measured (H200, Llama-3.1-8B shape):
    # 1M tokens 2.29 -> 1.01 GiB for 20.2 -> 22.4 s; at 128K 1.91 -> 1.20 GiB costs 3.3 -> 4.0 s, so not by default.
    offload: bool | None = None

    name = "homer"
    reads_past_window = True

    def __post_init__(self) -> None:
        for field_name in ("max_chunk_len", "target_len"):
            value = getattr(self, field_name)
            if value is not None and value < 1:
                raise LongDocError(f"{field_name} must be at least 1, got {value}")
        if self.warmup_layers is not None and self.warmup_layers < 0:
            raise LongDocError(f"warmup_layers must be 0 or more, got {self.warmup_layers}")

    def resolve(self, arch: Arch, layout: PromptLayout) -> tuple[int, int, int]:
        """(max_chunk_len, target_len, warmup) for this model and prompt, checked."""
        window = arch.trained_window  # 0 when the config does not say
        chunk = self.max_chunk_len or default_chunk_len(arch)
        target = self.target_len or chunk
        warmup = self.warmup_layers if self.warmup_layers is not None else round(WARMUP_FRACTION * arch.num_layers)
        fixed = layout.prefix_len + layout.suffix_len
        if chunk <= fixed + 1:
            raise LongDocError(
                f"max_chunk_len {chunk} leaves no room for context: the prefix and question take {fixed} tokens; "
                "raise max_chunk_len or ask a shorter question"
            )
        if target <= fixed:
            raise LongDocError(f"target_len {target} must exceed the prefix and question ({fixed} tokens)")
        if warmup >= arch.num_layers:
            raise LongDocError(f"warmup_layers {warmup} must be below the model's {arch.num_layers} layers")
        if window and chunk > window:
            raise LongDocError(f"max_chunk_len {chunk} exceeds the model's {window}-token window")
        return chunk, target, warmup

    def prefill(self, arch: Arch, layout: PromptLayout, progress: ProgressHook = no_progress, reading=None) -> Prefill:
        """The merge tree depends on the question (every chunk carries it), so nothing is reused from a reading."""
        chunk_len_max, target, warmup = self.resolve(arch, layout)
        p, c, s = layout.prefix_len, layout.context_len, layout.suffix_len
        eff = chunk_len_max - p - s
        num_chunks = 2 ** math.ceil(math.log2(math.ceil(c / eff)))
        chunk_len = math.ceil(c / num_chunks)
        height = int(math.log2(num_chunks))
        schedule = layer_schedule(arch.num_layers, warmup, height)
        arch.check_span(chunk_len_max)
        calibration = None if self.calibration == "off" else find_calibration(arch, self.calibration)
        bias = load_calibration(calibration, arch.num_layers).to(arch.device) if calibration else None
        auto = arch.device.type == "cuda" and num_chunks > AUTO_OFFLOAD_CHUNKS
        offload = self.offload if self.offload is not None else auto
        run = _Run(arch, layout, schedule, chunk_len, num_chunks, eff, progress, bias, offload)
        root = run.subtree(0, num_chunks, level=height, keep=target - p - s)
        shared_levels = [i for i, block in enumerate(schedule) if not block]
        logits = arch.head(root.hidden)
        return Prefill(
            cache=root.cache,
            next_position=int(root.positions[0, -1]) + 1,
            last_logits=logits,
            kept_context=root.context_index.cpu(),
            context_scores=root.context_scores,
            notes=[
                f"homer: {num_chunks} chunks of {chunk_len} context tokens, {height} merge levels, "
                f"merges at layers {[b.start for b in schedule[1:]]}"
                + (", finished subtrees parked in host memory" if run.offload else ""),
                *(
                    [
                        f"homer: {height + 1} tree levels but {arch.num_layers - warmup} layers after {warmup} "
                        f"warm-up layers: levels {shared_levels} merge at the layer of the level below and "
                        "prune by its scores"
                    ]
                    if shared_levels
                    else []
                ),
                f"homer: calibrated with {calibration}"
                if calibration
                else "homer: uncalibrated (no calibration file; `longdoc calibrate MODEL` makes one)",
            ],
            details=dict(
                chunks=num_chunks,
                chunk_context_len=chunk_len,
                schedule=[(b.start, b.stop) for b in schedule],
                max_alive_states=run.max_alive,
                positions=root.positions[0].tolist(),
            ),
        )


class _Run:
    """One HOMER prefill: builds leaves, runs blocks, prunes and merges, depth first."""

    def __init__(self, arch, layout, schedule, chunk_len, num_chunks, eff, progress, bias, offload):
        self.arch, self.layout, self.schedule = arch, layout, schedule
        self.bias = bias  # (layers, distances) mean score to subtract, or None
        self.offload = offload  # park finished left subtrees of OFFLOAD_MIN_LEAVES+ leaves in host memory
        self.chunk_len, self.num_chunks = chunk_len, num_chunks
        self.eff = eff  # context tokens one chunk holds: max_chunk_len - prefix - suffix
        self.progress = progress
        self.alive = self.max_alive = self.leaves_done = 0
        self.ids = layout.input_ids(arch.device)[0]
        self.protected = layout.protected_mask(arch.device)

    def leaf_len(self, index: int) -> int:
        """Context tokens of leaf `index` (0 past the last real chunk)."""
        return max(0, min((index + 1) * self.chunk_len, self.layout.context_len) - index * self.chunk_len)

    def budgets(self, mid: int) -> tuple[int, int]:
        """Context tokens the left and right children of a merge keep, so the merged chunk holds one chunk.

        Half each, as the reference; with no right child the left passes through unpruned. The reference's
        rule for a short last chunk: when the right subtree starts with a chunk shorter than a half, it keeps
        all of it and the left keeps the rest of the chunk (without it, at max_chunk_len 4096 about 4.9 % of
        context lengths lose up to 510 tokens of the budget).
        """
        right_first = self.leaf_len(mid)
        if right_first == 0:
            return self.eff, 0
        if right_first < self.eff // 2:
            return self.eff - right_first, right_first
        return self.eff // 2, self.eff // 2

    @torch.inference_mode()
    def subtree(self, lo: int, hi: int, level: int, keep: int) -> ChunkState | None:
        """The state of leaves [lo, hi) after their whole subtree, reduced to `keep` context tokens for its parent."""
        if hi - lo == 1:
            state = self.leaf(lo)
        else:
            mid = (lo + hi) // 2
            left_keep, right_keep = self.budgets(mid)
            left = self.subtree(lo, mid, level - 1, left_keep)
            parked = self.offload and left is not None and mid - lo >= OFFLOAD_MIN_LEAVES
            if parked:  # back later to where it was: the hidden states' device and each layer's own
                home = (left.hidden.device, [d or "cpu" for d in left.cache.devices()])
                left = left.to("cpu")
            right = self.subtree(mid, hi, level - 1, right_keep) if right_keep else None
            if parked:
                left = left.to(*home)
            state = merge(left, right) if right is not None else left
            self.alive -= 1 if right is not None else 0
        if state is None:
            return None
        self.run_block(state, self.schedule[level], keep=keep)
        return state

    def leaf(self, index: int) -> ChunkState | None:
        layout, device = self.layout, self.arch.device
        p, c, s = layout.prefix_len, layout.context_len, layout.suffix_len
        start, end = index * self.chunk_len, min((index + 1) * self.chunk_len, c)
        if start >= end:
            return None  # fewer real chunks than the power of two: the sibling passes through
        ids = torch.cat([self.ids[:p], self.ids[p + start : p + end], self.ids[p + c :]])
        positions = torch.arange(p + (end - start) + s, device=device)
        if self.num_chunks > 1:
            positions[-s:] = torch.arange(s, device=device) + p + self.chunk_len
        self.alive += 1
        self.max_alive = max(self.max_alive, self.alive)
        return ChunkState(
            hidden=self.arch.embed(ids[None]),
            positions=positions[None],
            cache=KVCache(self.arch.num_layers),
            prefix_len=p,
            suffix_len=s,
            context_index=torch.arange(start, end),
        )

    def run_block(self, state: ChunkState, layers: range, keep: int) -> None:
        """Run `layers` over the chunk, then keep the `keep` context tokens its last token attends to most.

        No layers (a level that shares its layer with the level below): keep by the scores that layer gave.
        """
        arch = self.arch
        protected = self.protected[state.context_index.to(self.protected.device)]
        if not layers:
            scores = state.context_scores.to(protected.device)
            state.keep(strongest(scores.masked_fill(protected, float("inf")), keep), scores)
            return
        position_embeddings = arch.rotary(state.hidden, state.positions)
        # [prefix | context] then the suffix, as full's prefill splits a prompt (prompt.py: reading_len), so one
        # chunk equals full bit for bit. The suffix's inputs to the block's last layer give the scoring query.
        inputs = {}
        split = state.hidden.shape[1] - state.suffix_len
        cos, sin = position_embeddings
        head = arch.forward(state.hidden[:, :split], (cos[:, :split], sin[:, :split]), state.cache, layers)
        tail = arch.forward(
            state.hidden[:, split:],
            (cos[:, split:], sin[:, split:]),
            state.cache,
            layers,
            tap=lambda i, hidden: inputs.update(last=hidden),
        )
        state.hidden = torch.cat([head, tail], dim=1)
        layer_input = inputs["last"]
        if layers.start == 0:
            self.leaves_done += 1
            self.progress("homer", self.leaves_done, self.num_chunks)
        scores = self.scores(state, layers[-1], layer_input, position_embeddings)  # on that layer's device
        context_scores = scores[state.prefix_len : state.prefix_len + state.context_len]
        protected = protected.to(scores.device)
        state.keep(strongest(context_scores.masked_fill(protected, float("inf")), keep), context_scores)

    def scores(self, state: ChunkState, layer: int, layer_input, position_embeddings) -> torch.Tensor:
        """Max over heads of the last token's attention logit q.k/sqrt(d) to every token, (n,) float32.

        With a calibration, the mean score at that layer and distance (from the last position) is subtracted.
        """
        cos, sin = position_embeddings
        query = self.arch.queries(layer, layer_input[:, -1:], (cos[:, -1:], sin[:, -1:]))  # (1, H, 1, d)
        keys, _ = state.cache.layer(layer)  # (1, Hkv, n, d), as the attention saw them
        scores = last_token_logits(query, keys)
        if self.bias is not None:
            distance = (state.positions[0, -1] - state.positions[0]).clamp(0, self.bias.shape[1] - 1)
            scores = scores - self.bias[layer, distance].to(scores.device)
        return scores


def merge(left: ChunkState, right: ChunkState) -> ChunkState:
    """[mean prefix | left context | right context | mean suffix], for hidden states and every cached layer."""
    p, s = left.prefix_len, left.suffix_len

    def join(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
        a_ctx = a.narrow(dim, p, a.shape[dim] - p - s)
        b_ctx = b.narrow(dim, p, b.shape[dim] - p - s)
        prefix = (a.narrow(dim, 0, p) + b.narrow(dim, 0, p)) / 2
        suffix = (a.narrow(dim, a.shape[dim] - s, s) + b.narrow(dim, b.shape[dim] - s, s)) / 2
        return torch.cat([prefix, a_ctx, b_ctx, suffix], dim)

    cache = KVCache(left.cache.num_layers)
    for i in range(cache.num_layers):
        if not left.cache.filled(i):
            continue
        lk, lv = left.cache.layer(i)
        rk, rv = right.cache.layer(i)
        cache.set_layer(i, join(lk, rk, 2), join(lv, rv, 2))
        for child in (left, right):  # free each child layer once joined: peak is one layer, not a whole copy
            child.cache.free(i)
        del lk, lv, rk, rv
    positions = torch.cat(
        [
            left.positions[:, :p],
            left.positions[:, p : p + left.context_len],
            right.positions[:, p : p + right.context_len],
            right.positions[:, right.positions.shape[1] - s :],
        ],
        1,
    )
    scores = None
    if left.context_scores is not None and right.context_scores is not None:
        scores = torch.cat([left.context_scores, right.context_scores])
    return ChunkState(
        hidden=join(left.hidden, right.hidden, 1),
        positions=positions,
        cache=cache,
        prefix_len=p,
        suffix_len=s,
        context_index=torch.cat([left.context_index, right.context_index]),
        context_scores=scores,
    )
