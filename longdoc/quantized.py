"""KIVI's KV-cache quantization (arXiv 2402.02750): keys per channel, values per token, recent tokens in full.

Keys have a few outlier channels, so each channel is quantized on its own over a group of GROUP tokens;
values have no such channels and are quantized per token over groups of GROUP channels. Every group
stores its minimum and step in the cache's dtype and its codes packed into bytes (two per byte at 4
bits, four at 2). The last RESIDUAL to RESIDUAL + GROUP - 1 tokens stay in full precision; as decoding
appends, the oldest GROUP of them are quantized together (a key group needs GROUP tokens).

The attention asks one layer at a time (`update`): that layer is dequantized into one scratch buffer
that every layer shares, so full precision is held for one layer, never for the whole cache (one
scratch per device on a model split over several GPUs: each layer's codes stay on its own device).
"""

from __future__ import annotations

import math

import torch

from .cache import KVCache
from .errors import LongDocError

BITS = (8, 4, 2)
GROUP = 64  # tokens per key group; channels per value group (a divisor when the head is not a multiple)
RESIDUAL = 128  # recent tokens always in full precision


def check_bits(bits: int | None) -> None:
    if bits is not None and bits not in BITS:
        raise LongDocError(f"kv_bits must be 8, 4 or 2 (or None for no quantization), got {bits!r}")


def quantize_groups(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max codes of `x` over `dim` (each group's slice): (codes uint8, step, minimum).

    Step and minimum are stored in x's dtype (the step rounded up, so the maximum still fits) and the codes
    computed from the stored values: the round-trip error of every element is at most half its group's
    stored step, plus the dtype's rounding of the result.
    """
    levels = 2**bits - 1
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    minimum = low.to(x.dtype)
    step = ((high.float() - minimum.float()) / levels * (1 + torch.finfo(x.dtype).eps)).to(x.dtype)
    safe = step.float().clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((x.float() - minimum.float()) / safe).round_().clamp_(0, levels).to(torch.uint8)
    return codes, step, minimum


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., d) of `bits` bits each -> (..., d * bits / 8) bytes."""
    per = 8 // bits
    grouped = codes.view(*codes.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & (2**bits - 1)).flatten(-2)


class QuantizedLayer:
    """One layer: quantized rows [0, q) as packed codes, full-precision rows [q, q + tail) after them."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bits: int) -> None:
        self.bits = bits
        self.group = math.gcd(GROUP, values.shape[-1])  # Phi-3's 96-wide heads: groups of 32
        batch, heads, n, d = keys.shape
        self.key_codes = keys.new_empty((batch, heads, 0, d * bits // 8), dtype=torch.uint8)
        self.value_codes = self.key_codes.clone()
        self.key_step = keys.new_empty((batch, heads, 0, d))  # one per key group and channel
        self.key_min = self.key_step.clone()
        self.value_step = keys.new_empty(
            (batch, heads, 0, values.shape[-1] // self.group)
        )  # one per token and value group
        self.value_min = self.value_step.clone()
        self.tail_keys = keys.new_empty((batch, heads, RESIDUAL + GROUP, d))
        self.tail_values = values.new_empty((batch, heads, RESIDUAL + GROUP, values.shape[-1]))
        self.quantized = self.tail = 0
        self.append(keys, values)

    @property
    def length(self) -> int:
        return self.quantized + self.tail

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add rows; every whole GROUP of tail rows older than the last RESIDUAL is quantized."""
        ready = max(0, self.tail + keys.shape[-2] - RESIDUAL) // GROUP * GROUP
        rows_k = torch.cat([self.tail_keys[..., : self.tail, :], keys], -2)
        rows_v = torch.cat([self.tail_values[..., : self.tail, :], values], -2)
        if ready:
            self._quantize(rows_k[..., :ready, :], rows_v[..., :ready, :])
        rest = rows_k.shape[-2] - ready  # below RESIDUAL + GROUP, the tail buffers' size
        self.tail_keys[..., :rest, :] = rows_k[..., ready:, :]
        self.tail_values[..., :rest, :] = rows_v[..., ready:, :]
        self.tail = rest

    def _quantize(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        batch, heads, n, d = keys.shape
        codes, step, minimum = quantize_groups(keys.reshape(batch, heads, n // GROUP, GROUP, d), self.bits, dim=3)
        self.key_codes = torch.cat([self.key_codes, pack(codes.view(batch, heads, n, d), self.bits)], -2)
        self.key_step = torch.cat([self.key_step, step.view(batch, heads, -1, d)], -2)
        self.key_min = torch.cat([self.key_min, minimum.view(batch, heads, -1, d)], -2)
        dv = values.shape[-1]
        codes, step, minimum = quantize_groups(
            values.reshape(batch, heads, n, dv // self.group, self.group), self.bits, 4
        )
        self.value_codes = torch.cat([self.value_codes, pack(codes.view(batch, heads, n, dv), self.bits)], -2)
        self.value_step = torch.cat([self.value_step, step.view(batch, heads, n, -1)], -2)
        self.value_min = torch.cat([self.value_min, minimum.view(batch, heads, n, -1)], -2)
        self.quantized += n

    def dequantize_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the layer's rows, in full precision, into keys[..., :length, :] and values[..., :length, :]."""
        q = self.quantized
        if q:
            batch, heads, _, d = keys.shape
            codes = unpack(self.key_codes, self.bits).view(batch, heads, q // GROUP, GROUP, d).float()
            rows = codes * self.key_step.float()[:, :, :, None] + self.key_min.float()[:, :, :, None]
            keys[..., :q, :] = rows.view(batch, heads, q, d)
            dv = values.shape[-1]
            codes = unpack(self.value_codes, self.bits).view(batch, heads, q, dv // self.group, self.group).float()
            rows = codes * self.value_step.float()[..., None] + self.value_min.float()[..., None]
            values[..., :q, :] = rows.view(batch, heads, q, dv)
        keys[..., q : self.length, :] = self.tail_keys[..., : self.tail, :]
        values[..., q : self.length, :] = self.tail_values[..., : self.tail, :]

    def nbytes(self) -> int:
        parts = (self.key_codes, self.value_codes, self.key_step, self.key_min, self.value_step, self.value_min)
        tail = (self.tail_keys[..., : self.tail, :], self.tail_values[..., : self.tail, :])
        return sum(t.numel() * t.element_size() for t in (*parts, *tail))


class QuantizedCache:
    """A decoding cache of `QuantizedLayer`s with `KVCache`'s `update(keys, values, layer_idx)`.

    `update` appends and returns the whole layer dequantized into a scratch buffer shared by all layers on its
    device; what it returns is valid until the next layer's `update`, which is how the attention uses it.
    """

    def __init__(self, cache: KVCache, bits: int) -> None:
        check_bits(bits)
        self.bits = bits
        self.layers: list[QuantizedLayer | None] = [None] * cache.num_layers
        for i in range(cache.num_layers):
            if cache.keys[i] is not None:
                self.layers[i] = QuantizedLayer(*cache.layer(i), bits)
        self.capacity = 0
        self._scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # one per device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if layer is None:
            layer = self.layers[layer_idx] = QuantizedLayer(key_states, value_states, self.bits)
        else:
            layer.append(key_states, value_states)
        keys, values = self._buffers(key_states, value_states, layer.length)
        layer.dequantize_into(keys, values)
        return keys[..., : layer.length, :], values[..., : layer.length, :]

    def _buffers(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The scratch shared by the layers on this device, grown by a quarter when a layer outgrows it."""
        scratch = self._scratch.get(keys.device)
        if scratch is None or scratch[0].shape[-2] < length or scratch[0].shape[:2] != keys.shape[:2]:
            rows = max(length, length + length // 4)
            scratch = self._scratch[keys.device] = (
                keys.new_empty((*keys.shape[:-2], rows, keys.shape[-1])),
                values.new_empty((*values.shape[:-2], rows, values.shape[-1])),
            )
        return scratch

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values dequantized into new tensors (for inspection, not decoding)."""
        layer = self.layers[layer_idx]
        keys = layer.tail_keys.new_empty((*layer.tail_keys.shape[:-2], layer.length, layer.tail_keys.shape[-1]))
        values = layer.tail_values.new_empty((*keys.shape[:-1], layer.tail_values.shape[-1]))
        layer.dequantize_into(keys, values)
        return keys, values

    def seq_length(self, layer_idx: int = 0) -> int:
        layer = self.layers[layer_idx]
        return layer.length if layer is not None else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length(layer_idx)

    def nbytes(self) -> int:
        """Bytes of the codes, steps, minimums and full-precision tail (not of the one-layer scratch)."""
        return sum(layer.nbytes() for layer in self.layers if layer is not None)


def quantized(cache: KVCache, bits: int | None) -> KVCache | QuantizedCache:
    """The decoding cache for a method's `kv_bits`: `cache` itself when None, else a KIVI-quantized copy."""
    check_bits(bits)
    return cache if bits is None else QuantizedCache(cache, bits)
