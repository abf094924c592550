"""Decoding as one captured CUDA graph per token, over a static-capacity cache.

The eager loop launches some 20 kernels per layer from Python for every token, and for an 8B model the
GPU spends most of each step waiting on the host (60 tokens/s on an H200 against a 267 tokens/s
bandwidth floor, issue #18). Here one whole step -- embedding, every decoder layer, final norm and
head -- is captured once and replayed per token. A graph needs fixed shapes and addresses, so the
cache is a fixed-capacity buffer per layer: the new token's keys and values are written at a slot
held in a device tensor, and attention is told how many slots are filled (`visible_keys`, a device tensor:
longdoc_sdpa's flash-decoding kernel reads no others) or, for the other attention implementations, hides the
rest with an additive mask. The token, its position and the slot are device tensors updated in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache

import torch

from .arch import Arch
from .attention import NAME as ATTENTION
from .attention import decode_chunk
from .cache import KVCache, StaticSlots
from .quantized import QuantizedCache
from .static_quantized import StaticQuantizedCache, layout_reason

# Attention implementations that take an additive (1, 1, 1, kv) mask with one query: longdoc's own
# (single_query_attention), transformers' SDPA and its eager softmax. flash-attn reads a mask as padding.
MASKED_ATTENTION = (ATTENTION, "sdpa", "eager")


def static_capacity(needed: int, coarse: bool = False) -> int:
    """`needed` slots rounded up so that single-query attention splits the buffer into equal chunks.

    `coarse` (a compiled step, which is compiled again for every new capacity) rounds up further, to a quarter
    of the power of two below `needed`: at most 25 % more slots, four capacities per doubling of the length, so
    follow-up questions on one reading reuse the compiled step.
    """
    if coarse:
        needed = max(needed, 1024)
        quarter = 1 << (needed.bit_length() - 3)
        needed = -(-needed // quarter) * quarter
    chunk = decode_chunk(needed)
    return -(-needed // chunk) * chunk


class StaticCache(StaticSlots):
    """Fixed-capacity keys/values per layer, written at a device-tensor slot; the layers attend to its filled slots.

    Answers the decoder layers' `update(keys, values, layer_idx)` as `KVCache` does, but returns the whole
    buffer; `mask` (1, 1, 1, capacity) is 0 on the filled slots and the dtype's minimum elsewhere.
    """

    def __init__(self, source: KVCache, capacity: int) -> None:
        length = source.seq_length()
        keys, values = source.layer(0)
        self.length = length
        self.capacity = capacity
        shape = (keys.shape[0], keys.shape[1], capacity, keys.shape[3])
        self.keys, self.values = [], []
        for i in range(source.num_layers):
            layer_keys, layer_values = source.layer(i)
            self.keys.append(_buffer_with(layer_keys, shape))
            self.values.append(_buffer_with(layer_values, shape))
        self.slot = torch.tensor([length], device=keys.device)
        self.mask = torch.full((1, 1, 1, capacity), torch.finfo(keys.dtype).min, dtype=keys.dtype, device=keys.device)
        self.mask[..., :length] = 0

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write one token's (batch, kv_heads, 1, head_dim) states at `slot`; return the layer's whole buffers."""
        self.keys[layer_idx].index_copy_(2, self.slot, key_states)
        self.values[layer_idx].index_copy_(2, self.slot, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


def _buffer_with(filled: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    buffer = torch.zeros(shape, dtype=filled.dtype, device=filled.device)  # zeros: masked slots never hold NaN
    buffer[..., : filled.shape[-2], :] = filled
    return buffer


def unsupported_reason(arch: Arch, cache: KVCache | QuantizedCache) -> str | None:
    """Why graph decoding cannot run on this model and cache, or None when it can."""
    if arch.split:  # a graph is captured on one device's stream; the eager loop crosses devices as it goes
        return f"the model's layers run on several devices ({arch.placement()})"
    if arch.offloaded:  # the weights a capture saw would be freed after it, and read again at every replay
        return "some weights are offloaded to host memory and brought in at each step, which a graph cannot capture"
    if arch.attn_implementation not in MASKED_ATTENTION:
        return f"attention '{arch.attn_implementation}' takes no length mask"
    lengths = {cache.seq_length(i) for i in range(cache.num_layers)}
    if len(lengths) != 1 or not all(cache.filled(i) for i in range(cache.num_layers)):
        return f"the cache's layers hold different lengths ({sorted(lengths)})"
    if isinstance(cache, QuantizedCache) and (reason := layout_reason(cache)) is not None:
        return reason
    if arch.device.type != "cuda":
        return f"graphs need CUDA, the model is on {arch.device.type}"
    return None


def decode_step(arch: Arch, cache: StaticCache, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Feed `input_ids` at `position_ids` into `cache`'s next slot; advance both; the next (1, vocab) logits."""
    hidden = arch.embed(input_ids)
    position_embeddings = arch.rotary(hidden, position_ids)
    cache.begin_step()
    visible = cache.slot + 1
    logits = arch.head(arch.forward(hidden, position_embeddings, cache, mask=cache.mask, visible_keys=visible))
    cache.slot.add_(1)
    position_ids.add_(1)
    return logits


@lru_cache
def compiled_step() -> Callable:
    """`decode_step` through torch.compile, made once per process and compiled once per cache capacity.

    The captured eager step is some 40 kernels a layer, most of them small elementwise ones (norms, rotary,
    SiLU, residual adds) whose launch gaps cost more than the weights' read on a GPU; Inductor fuses them into
    a few per layer, and the graph then replays those. Compiling takes about half a minute for an 8B model
    (H200), so it is asked for (`compile_decode`), not the default.
    """
    return torch.compile(decode_step, dynamic=False)


COMPILED_CAPACITIES: set[int] = set()  # cache capacities the compiled step has been compiled for, in this process


def compile_refusal(capacity: int) -> str | None:
    """Why the compiled step cannot serve a cache of `capacity` slots, or None when it can.

    torch.compile compiles the step again for each capacity, up to its `recompile_limit` (8), and past that runs
    it uncompiled without a word; here that case replays the plain graph instead, and says so.
    """
    limit = torch._dynamo.config.recompile_limit
    if capacity in COMPILED_CAPACITIES or len(COMPILED_CAPACITIES) < limit:
        return None
    return f"compile_decode: {limit} cache sizes are compiled already in this process (torch's recompile_limit)"


class StaticDecoder:
    """One decode step over a `StaticCache` (a `StaticQuantizedCache` for a KIVI cache): feed a token, get the next
    (1, vocab) float32 logits.

    With `capture` (CUDA) the step is recorded once as a CUDA graph and replayed; without it the same
    tensor code runs eagerly (CPU tests, and the check that the two agree). With `compile` the step is
    `compiled_step()`: the same tensor code with its elementwise kernels fused, unless `compile_refusal` says why
    not (`refused`); then it is the plain step.
    """

    def __init__(
        self,
        arch: Arch,
        cache: KVCache | QuantizedCache,
        next_position: int,
        max_steps: int,
        capture: bool,
        compile: bool = False,
    ) -> None:
        self.arch = arch
        arch.fused_layers()  # stack the projections (or see that they are stale) here, outside any trace or capture
        self.filled = cache.seq_length()
        capacity = static_capacity(self.filled + max_steps, coarse=compile)
        self.refused = compile_refusal(capacity) if compile else None
        if self.refused is not None:
            compile, capacity = False, static_capacity(self.filled + max_steps)
        if compile:
            COMPILED_CAPACITIES.add(capacity)
        self.step_function = compiled_step() if compile else decode_step
        static = StaticQuantizedCache if isinstance(cache, QuantizedCache) else StaticCache
        self.cache = static(cache, capacity)
        device = arch.device
        self.next_position = next_position
        self.input_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position_ids = torch.tensor([[next_position]], device=device)
        self.steps = 0
        self.max_steps = max_steps
        self.graph = None
        if capture:
            self._capture()

    @torch.inference_mode()
    def _step(self) -> torch.Tensor:
        """One step; it ends by writing its greedy token into `input_ids`, so `greedy` replays need no host input."""
        logits = self.step_function(self.arch, self.cache, self.input_ids, self.position_ids)
        self.input_ids.copy_(logits.argmax(-1, keepdim=True))
        return logits

    @torch.inference_mode()
    def _capture(self) -> None:
        if self.step_function is not decode_step:  # one eager step first: one-time kernel checks stay untraced
            decode_step(self.arch, self.cache, self.input_ids, self.position_ids)
            self._rewind()
        # Warm up on a side stream (as torch.cuda.graphs asks): one-time probes, cuBLAS handles and the
        # allocator's pool are set up outside the capture. The warm-up writes slot `filled`; reset after.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        self._rewind()

    def _rewind(self) -> None:
        self.cache.reset(self.filled)
        self.position_ids.fill_(self.next_position)

    def _check(self, position: int, steps: int) -> None:
        if position != self.next_position + self.steps or self.steps + steps > self.max_steps:
            raise ValueError(f"step {self.steps} at position {position}: not the next position, or past capacity")

    @torch.inference_mode()
    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Feed `token` at `position` (the next one in order); return the next (1, vocab) float32 logits."""
        self._check(position, 1)
        self.input_ids.fill_(token)
        self.steps += 1
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits

    @torch.inference_mode()
    def greedy(self, token: int, position: int, count: int) -> Iterator[int]:
        """The `count` greedy tokens after `token` fed at `position`, from graph replays kept one ahead of the host.

        Each replay feeds itself the token the previous one chose (`_step`), so the next replay is queued before
        the host reads the last token back: the GPU never waits for the host's per-token work (the sync, the
        caller's streaming). A caller that stops early (EOS) leaves at most one step computed for nothing.
        """
        if self.graph is None:
            raise ValueError("greedy replays need a captured graph (capture=True)")
        self._check(position, count)
        self.input_ids.fill_(token)
        host = [torch.empty(1, dtype=torch.long, pin_memory=True) for _ in range(2)]
        done = [torch.cuda.Event(), torch.cuda.Event()]

        def launch(i: int) -> None:
            self.graph.replay()
            host[i % 2].copy_(self.input_ids.view(1), non_blocking=True)
            done[i % 2].record()
            self.steps += 1

        launch(0)
        for i in range(count):
            if i + 1 < count:
                launch(i + 1)
            done[i % 2].synchronize()
            yield int(host[i % 2])
