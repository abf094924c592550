"""A KIVI cache of fixed addresses for graph decoding: `QuantizedCache`'s codes, tail and scratch, written in place.

A captured graph replays the same kernels on the same buffers at every token, so no buffer may grow or be replaced
and nothing may be decided on the host. Every layer reads the prompt's codes where the eager cache holds them
(shared, never written), keeps buffers for all the groups the answer can fold in (room fixed by the capacity), and
its full-precision tail as a ring of RESIDUAL + GROUP rows where the row of position p lives at p mod RESIDUAL +
GROUP; one scratch holds the layer the attention reads. All of it is addressed from one device tensor,
`slot` (the position being fed), because KIVI's layout is a function of the length alone: after L rows,
quantized_rows(L) = (L - RESIDUAL) // GROUP * GROUP of them (at least 0) are codes and the rest are the tail
(`QuantizedLayer` keeps exactly that, from a prompt's cache or a reading's lease handed to decoding:
`layout_reason` checks it).

Folding: at the start of every step (`begin_step`) every layer's tail's oldest GROUP rows, positions
[quantized_rows(slot), + GROUP), are quantized into the group after its codes. Until the tail reaches RESIDUAL +
GROUP rows that group is past the codes in use and is written again at the next step; at the step where the eager
cache folds (`QuantizedLayer.settle`), quantized_rows(slot + 1) moves past the group, whose rows were all written
before this step (by earlier steps or from the prompt: slot - quantized_rows(slot) >= RESIDUAL > GROUP, and the
ring holds slot - WINDOW .. slot - 1), and its codes are the eager cache's to the bit (the same
`quantize_keys` / `quantize_values` on the same rows). Because no row of the step itself is needed, all layers
fold in one pass over buffers stacked layer first: folding layer by layer was some 56 small kernels a layer, 1,800
of the 3,195 a step replayed for the Llama-3.1-8B shape, and a 4-bit cache of 1,056 keys decoded at 88 tokens/s,
145 with the one fold (H200, `benchmarks/decode_profile.py --kv-bits 4`; a bf16 cache: 154-156). The ring needs no
shift, so a step that is run and rewound (a graph's warm-up) leaves nothing behind that the next step reads.

Attention (`attend`): on CUDA flash_decode's kernel reads the codes where they lie and dequantizes each tile in
registers. Dequantizing the whole layer into a scratch buffer at every token first (the eager cache's way, and
still the path on CPU and through the model's own attention modules) made a 4-bit cache decode at 45 tokens/s at
8K and 7 at 128K on an H200 (Llama-3.1-8B shape, plain graph), against 151 and 95 for a bf16 cache; the kernel
gave 86 and 52, and with the one fold for all layers 136 and 66 (`benchmarks/results/decode-kivi-h200/`).
"""

from __future__ import annotations

import torch

from .cache import StaticSlots
from .flash_decode import triton_quantized_decode_attention, triton_usable
from .quantized import (
    GROUP,
    PARTS,
    RESIDUAL,
    QuantizedCache,
    QuantizedLayer,
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
)

WINDOW = RESIDUAL + GROUP  # tail rows: a group folds when the tail reaches this


def quantized_rows(length: int) -> int:
    """Rows KIVI holds as codes in a layer of `length` rows (the rest, RESIDUAL to WINDOW - 1 of them, in full)."""
    return max(0, length - RESIDUAL) // GROUP * GROUP


def layout_reason(cache: QuantizedCache) -> str | None:
    """Why `cache` does not have KIVI's decoding layout (every layer the same length, quantized as it appends)."""
    if not cache.decoding:
        return "a quantized cache in prompt mode (not handed to decoding) keeps its new rows in full precision"
    if any(layer is None or layer.quantized != quantized_rows(layer.length) for layer in cache.layers):
        return "the quantized cache's layers do not all hold KIVI's groups for their length"
    return None


class StaticQuantizedCache(StaticSlots):
    """Fixed-capacity KIVI codes and tails per layer, written at a device-tensor slot (`StaticCache`'s counterpart).

    `begin_step` folds every layer's oldest tail group (where the eager `QuantizedCache` would fold, the module's
    docstring); `attend(layer_idx, query, keys, values, visible, scale)` appends one token's rows and returns the
    query's attention over the first `visible` positions; `update` appends the same way and returns the layer
    dequantized into the scratch, `capacity` rows (for the model's own attention modules); `slot` and `mask` are
    `StaticSlots`'. Rewinding the slot (`reset`, after a graph's warm-up step) needs no undoing of the ring or codes.
    """

    def __init__(self, source: QuantizedCache, capacity: int) -> None:
        layers: list[QuantizedLayer] = source.layers  # all there: handed to decoding (`layout_reason`)
        first_layer = layers[0]
        device = first_layer.tail_keys.device
        if any(layer.tail_keys.device != device for layer in layers):
            raise ValueError("a static KIVI cache holds its layers on one device")
        self.bits, self.capacity, self.length = source.bits, capacity, first_layer.length
        self.group = first_layer.group
        self.prompt_rows = first_layer.quantized  # every layer's: quantized_rows(length) (`layout_reason`)
        self.groups = quantized_rows(capacity) // GROUP + 1  # the folds the answer can reach, and the next one
        # The groups folded while decoding and the rings, one tensor per part with the layers first (one fold for all).
        folded_rows = (self.groups - self.prompt_rows // GROUP) * GROUP
        self.folded = tuple(
            _zeros(getattr(first_layer, name), rows, len(layers))
            for name, rows in zip(PARTS, _part_rows(folded_rows), strict=True)
        )
        self.tails = tuple(_zeros(getattr(first_layer, name), WINDOW, len(layers)) for name in TAILS)
        self.layers = [
            StaticLayer(layer, tuple(part[i] for part in self.folded), tuple(tail[i] for tail in self.tails))
            for i, layer in enumerate(layers)
        ]
        self.scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # made on first use
        self.fused = device.type == "cuda" and triton_usable()  # decided here: a compiled step traces `attend`
        self.offsets = torch.arange(WINDOW, device=device)  # rows of a group, and of the whole tail
        self.slot = torch.tensor([self.length], device=device)
        self.mask = first_layer.tail_keys.new_empty((1, 1, 1, capacity))
        self.reset(self.length)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def begin_step(self) -> None:
        """`StaticSlots.begin_step`; then every layer's tail's oldest GROUP rows, positions [quantized_rows(slot),
        + GROUP), are quantized into the group after the codes in use, all layers at once."""
        super().begin_step()
        start = (self.slot - RESIDUAL).clamp_min(0) // GROUP * GROUP  # quantized_rows(slot), on the device
        group_rows = self.offsets[:GROUP]
        ring = start % WINDOW + group_rows  # a whole group never wraps: WINDOW is a multiple of GROUP
        rows = start - self.prompt_rows + group_rows  # in the buffers of the groups folded while decoding
        key_codes, key_step, key_min, value_codes, value_step, value_min = (p.flatten(0, 1) for p in self.folded)
        tail_keys, tail_values = (tail.flatten(0, 1) for tail in self.tails)  # (layers x batch, heads, WINDOW, d)
        codes, step, minimum = quantize_keys(tail_keys.index_select(2, ring), self.bits)
        key_codes.index_copy_(2, rows, codes)
        key_step.index_copy_(2, rows[:1] // GROUP, step)
        key_min.index_copy_(2, rows[:1] // GROUP, minimum)
        codes, step, minimum = quantize_values(tail_values.index_select(2, ring), self.bits, self.group)
        value_codes.index_copy_(2, rows, codes)
        value_step.index_copy_(2, rows, step)
        value_min.index_copy_(2, rows, minimum)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write one token's (batch, kv_heads, 1, head_dim) states at `slot`; return the layer's `capacity` rows."""
        layer = self._append(layer_idx, key_states, value_states)
        keys, values = self._scratch(layer)
        layer.dequantize_into(keys, values, self.slot + 1, self.offsets)
        return keys[..., : self.capacity, :], values[..., : self.capacity, :]

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        visible: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """`StaticSlots.attend`; on CUDA the codes are read where they lie (flash_decode's KIVI kernel), elsewhere the
        layer is dequantized into the scratch (`update`) first."""
        if not self.fused:
            return super().attend(layer_idx, query, key_states, value_states, visible, scale)
        layer = self._append(layer_idx, key_states, value_states)
        parts = [*layer.prompt_parts, *layer.folded, layer.tail_keys, layer.tail_values]
        return quantized_decode_attention(query, parts, visible, scale, self.bits, self.capacity)

    def _append(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> StaticLayer:
        layer = self.layers[layer_idx]
        layer.write_tail(self.slot, key_states, value_states)
        return layer

    def _scratch(self, layer: StaticLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """The full-precision buffers every layer's attention reads in turn (all layers are on one device)."""
        if self.scratch is None:
            self.scratch = layer.scratch(self.groups * GROUP + WINDOW)
        return self.scratch

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's filled rows dequantized into new tensors (for inspection, not decoding)."""
        length = int(self.slot)
        layer = self.layers[layer_idx]
        keys, values = layer.scratch(self.groups * GROUP + WINDOW)
        layer.dequantize_into(keys, values, self.slot, self.offsets)
        return keys[..., :length, :], values[..., :length, :]


class StaticLayer:
    """One layer: the prompt's codes (the source's own tensors, never written), its slices of the cache's buffers for
    the groups that decoding can fold in (in PARTS' order) and of its rings (the tail, WINDOW rows)."""

    def __init__(
        self, source: QuantizedLayer, folded: tuple[torch.Tensor, ...], tails: tuple[torch.Tensor, ...]
    ) -> None:
        self.bits, self.prompt_rows = source.bits, source.quantized
        # shared, as a lease shares a reading's (contiguous already: made by torch.cat, a copy or a safetensors load)
        self.prompt_parts = tuple(getattr(source, name).contiguous() for name in PARTS)
        self.folded = folded
        self.tail_keys, self.tail_values = tails
        ring = (source.quantized + torch.arange(source.tail, device=source.tail_keys.device)) % WINDOW
        self.tail_keys.index_copy_(2, ring, source.tail_keys[..., : source.tail, :])
        self.tail_values.index_copy_(2, ring, source.tail_values[..., : source.tail, :])

    def scratch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed full-precision keys and values of `rows` rows, as this layer's attention reads them."""
        return _zeros(self.tail_keys, rows), _zeros(self.tail_values, rows)

    def write_tail(self, slot: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        ring = slot % WINDOW
        self.tail_keys.index_copy_(2, ring, keys)
        self.tail_values.index_copy_(2, ring, values)

    def dequantize_into(
        self, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, window_rows: torch.Tensor
    ) -> None:
        """Rows [0, length) in full precision into keys and values: the prompt's codes, every group buffer (those past
        the codes in use are finite and get overwritten or masked), then the ring's WINDOW rows from position
        quantized_rows(length)."""
        if self.prompt_rows:
            _dequantize_rows(keys, values, 0, self.prompt_parts, self.bits)
        _dequantize_rows(keys, values, self.prompt_rows, self.folded, self.bits)
        tail = (length - RESIDUAL).clamp_min(0) // GROUP * GROUP + window_rows
        keys.index_copy_(2, tail, self.tail_keys.index_select(2, tail % WINDOW))
        values.index_copy_(2, tail, self.tail_values.index_select(2, tail % WINDOW))


@torch.library.custom_op("longdoc::quantized_decode_attention", mutates_args=())
def quantized_decode_attention(
    query: torch.Tensor, parts: list[torch.Tensor], visible: torch.Tensor, scale: float, bits: int, capacity: int
) -> torch.Tensor:
    """flash_decode's KIVI kernel over one layer's `parts` (the prompt's six, the folded six, the ring's keys and
    values); a custom op, so that torch.compile calls it as one opaque step as it does `decode_attention`."""
    prompt, folded, (tail_keys, tail_values) = tuple(parts[:6]), tuple(parts[6:12]), parts[12:]
    return triton_quantized_decode_attention(
        query, prompt, folded, tail_keys, tail_values, visible, scale, bits, capacity
    )


@quantized_decode_attention.register_fake
def _(query, parts, visible, scale, bits, capacity):
    return torch.empty_like(query)


def _dequantize_rows(
    keys: torch.Tensor, values: torch.Tensor, start: int, parts: tuple[torch.Tensor, ...], bits: int
) -> None:
    """Codes, steps and minimums in `PARTS`' order, dequantized into keys and values from row `start` on."""
    key_codes, key_step, key_min, value_codes, value_step, value_min = parts
    end = start + key_codes.shape[-2]
    keys[..., start:end, :] = dequantize_keys(key_codes, key_step, key_min, bits)
    values[..., start:end, :] = dequantize_values(value_codes, value_step, value_min, bits)


TAILS = ("tail_keys", "tail_values")  # a layer's full-precision rows


def _part_rows(rows: int) -> tuple[int, ...]:
    """Rows of each of PARTS for `rows` quantized rows: key steps and minimums are one row per group of tokens."""
    return rows, rows // GROUP, rows // GROUP, rows, rows, rows


def _zeros(like: torch.Tensor, rows: int, *leading: int) -> torch.Tensor:
    """Zeros (unused rows never hold NaN) of like's dtype and shape but `rows` rows (dim -2), after `leading` dims."""
    return like.new_zeros((*leading, *like.shape[:-2], rows, like.shape[-1]))
