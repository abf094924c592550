"""KIVI's KV-cache quantization (arXiv 2402.02750): keys per channel, values per token, recent tokens in full.

Keys have a few outlier channels, so each channel is quantized on its own over a group of GROUP tokens;
values have no such channels and are quantized per token over groups of GROUP channels. Every group
stores its minimum and step in the cache's dtype and its codes packed into bytes (two per byte at 4
bits, four at 2). The last RESIDUAL to RESIDUAL + GROUP - 1 tokens stay in full precision; as decoding
appends, the oldest GROUP of them are quantized together (a key group needs GROUP tokens).

The attention asks one layer at a time (`update`): that layer is dequantized into one scratch buffer
that every layer shares, so full precision is held for one layer, never for the whole cache (one
scratch per device on a model split over several GPUs: each layer's codes stay on its own device). Graph decoding
holds the same codes at fixed addresses (static_quantized.py), through the same quantize and dequantize functions,
and on CUDA attends to them with no scratch at all (flash_decode's KIVI kernel dequantizes each tile as it reads it).

A reading (#11) is quantized the same way when its method has `kv_bits`: the store and saved readings
hold the codes. A question over it runs in prompt mode (`decoding=False`): its own rows are appended
in full precision and attend to the dequantized reading; handing the cache to decoding (`for_decoding`)
then quantizes every whole group older than the recent window, as if the whole prompt had been
quantized at once. A one-shot answer computes its document part as a reading too (methods/base.py's
`read`), so a follow-up equals it token for token.
"""

from __future__ import annotations

import copy
import math

import torch

from .cache import Devices, KVCache, per_layer
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


def quantize_keys(keys: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, heads, n, d) keys, n a multiple of GROUP, per channel over each GROUP of tokens: (packed codes
    (..., n, d * bits / 8), step and minimum (..., n / GROUP, d))."""
    batch, heads, n, d = keys.shape
    codes, step, minimum = quantize_groups(keys.reshape(batch, heads, n // GROUP, GROUP, d), bits, dim=3)
    return pack(codes.view(batch, heads, n, d), bits), step.view(batch, heads, -1, d), minimum.view(batch, heads, -1, d)


def quantize_values(values: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, heads, n, dv) values per token over groups of `group` channels: (packed codes (..., n, dv * bits / 8),
    step and minimum (..., n, dv / group))."""
    batch, heads, n, dv = values.shape
    codes, step, minimum = quantize_groups(values.reshape(batch, heads, n, dv // group, group), bits, 4)
    return (
        pack(codes.view(batch, heads, n, dv), bits),
        step.view(batch, heads, n, -1),
        minimum.view(batch, heads, n, -1),
    )


def dequantize_keys(codes: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor, bits: int) -> torch.Tensor:
    """`quantize_keys`'s parts back to float32 rows (batch, heads, n, d)."""
    batch, heads, groups, d = step.shape
    unpacked = unpack(codes, bits).view(batch, heads, groups, GROUP, d).float()
    rows = unpacked * step.float()[:, :, :, None] + minimum.float()[:, :, :, None]
    return rows.view(batch, heads, groups * GROUP, d)


def dequantize_values(codes: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor, bits: int) -> torch.Tensor:
    """`quantize_values`'s parts back to float32 rows (batch, heads, n, dv)."""
    batch, heads, n, groups = step.shape
    unpacked = unpack(codes, bits).view(batch, heads, n, groups, -1)
    rows = unpacked.float() * step.float()[..., None] + minimum.float()[..., None]
    return rows.view(batch, heads, n, -1)


PARTS = ("key_codes", "key_step", "key_min", "value_codes", "value_step", "value_min")  # the quantized rows


class QuantizedLayer:
    """One layer: quantized rows [0, quantized) as packed codes, full-precision rows after them (the tail).

    The quantized parts are only ever replaced (torch.cat), never written in place, so copies of a layer
    (leases of a reading) share them; each copy writes only its own tail. Values of width 0 (GemFilter's
    filter layer keeps keys only) have no value codes.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bits: int) -> None:
        """Quantize every whole GROUP of rows older than the last RESIDUAL; keep the rest in full precision."""
        self.bits = bits
        batch, heads, n, d = keys.shape
        dv = values.shape[-1]
        self.group = math.gcd(GROUP, dv) if dv else GROUP  # Phi-3's 96-wide heads: value groups of 32
        self.key_codes = keys.new_empty((batch, heads, 0, d * bits // 8), dtype=torch.uint8)
        self.value_codes = keys.new_empty((batch, heads, 0, dv * bits // 8), dtype=torch.uint8)
        self.key_step = keys.new_empty((batch, heads, 0, d))  # one per key group and channel
        self.key_min = self.key_step.clone()
        self.value_step = keys.new_empty((batch, heads, 0, dv // self.group))  # one per token and value group
        self.value_min = self.value_step.clone()
        self.tail_keys = keys.new_empty((batch, heads, RESIDUAL + GROUP, d))
        self.tail_values = values.new_empty((batch, heads, RESIDUAL + GROUP, dv))
        self.quantized = self.tail = 0
        ready = max(0, n - RESIDUAL) // GROUP * GROUP
        if ready:
            self._quantize(keys[..., :ready, :], values[..., :ready, :])
        self.hold(keys[..., ready:, :], values[..., ready:, :])

    @property
    def length(self) -> int:
        return self.quantized + self.tail

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add decoded rows; every whole GROUP of tail rows older than the last RESIDUAL is quantized (KIVI)."""
        self.hold(keys, values)
        self.settle()

    def hold(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add rows to the full-precision tail, growing it by a quarter when full (a question's rows on a reading)."""
        end = self.tail + keys.shape[-2]
        if end > self.tail_keys.shape[-2]:
            rows = end + end // 4
            self.tail_keys = _with_rows(self.tail_keys[..., : self.tail, :], rows, self.tail_keys.device)
            self.tail_values = _with_rows(self.tail_values[..., : self.tail, :], rows, self.tail_values.device)
        self.tail_keys[..., self.tail : end, :] = keys
        self.tail_values[..., self.tail : end, :] = values
        self.tail = end

    def settle(self) -> None:
        """Quantize every whole GROUP of tail rows older than the last RESIDUAL; the rest moves to the tail's start."""
        ready = max(0, self.tail - RESIDUAL) // GROUP * GROUP
        if not ready:
            return
        self._quantize(self.tail_keys[..., :ready, :], self.tail_values[..., :ready, :])
        rest = self.tail - ready
        self.tail_keys[..., :rest, :] = self.tail_keys[..., ready : self.tail, :].clone()  # the ranges may overlap
        self.tail_values[..., :rest, :] = self.tail_values[..., ready : self.tail, :].clone()
        self.tail = rest

    def _quantize(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        batch, heads, n, _ = keys.shape
        codes, step, minimum = quantize_keys(keys, self.bits)
        self.key_codes = torch.cat([self.key_codes, codes], -2)
        self.key_step = torch.cat([self.key_step, step], -2)
        self.key_min = torch.cat([self.key_min, minimum], -2)
        if values.shape[-1]:
            codes, step, minimum = quantize_values(values, self.bits, self.group)
            self.value_codes = torch.cat([self.value_codes, codes], -2)
            self.value_step = torch.cat([self.value_step, step], -2)
            self.value_min = torch.cat([self.value_min, minimum], -2)
        else:  # keys only: keep the value parts' row count in step with the keys'
            self.value_codes = self.value_codes.new_empty((batch, heads, self.quantized + n, 0))
            self.value_step = self.value_step.new_empty((batch, heads, self.quantized + n, 0))
            self.value_min = self.value_step.clone()
        self.quantized += n

    def dequantize_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the layer's rows, in full precision, into keys[..., :length, :] and values[..., :length, :]."""
        q = self.quantized
        if q:
            keys[..., :q, :] = dequantize_keys(self.key_codes, self.key_step, self.key_min, self.bits)
            if values.shape[-1]:
                values[..., :q, :] = dequantize_values(self.value_codes, self.value_step, self.value_min, self.bits)
        keys[..., q : self.length, :] = self.tail_keys[..., : self.tail, :]
        values[..., q : self.length, :] = self.tail_values[..., : self.tail, :]

    def copy(self, device: torch.device | str, room: int = 0) -> QuantizedLayer:
        """This layer on `device` with `room` spare tail rows: the quantized parts shared (moved when the device
        differs), the tail copied, so what the copy appends never reaches this layer."""
        twin = copy.copy(self)
        non_blocking = torch.device(device).type != "cpu"  # from pinned host memory without a stall; to host, wait
        for name in PARTS:
            setattr(twin, name, getattr(self, name).to(device, non_blocking=non_blocking))
        for name in ("tail_keys", "tail_values"):
            rows = max(self.tail + room, RESIDUAL + GROUP)
            buffer = _with_rows(getattr(self, name)[..., : self.tail, :], rows, device, non_blocking)
            setattr(twin, name, buffer)
        return twin

    def pin_memory(self) -> None:
        for name in (*PARTS, "tail_keys", "tail_values"):
            setattr(self, name, getattr(self, name).pin_memory())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The parts a saved reading stores: codes, steps, minimums and the tail's rows in use."""
        parts = {name: getattr(self, name) for name in PARTS}
        return {
            **parts,
            "tail_keys": self.tail_keys[..., : self.tail, :],
            "tail_values": self.tail_values[..., : self.tail, :],
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bits: int) -> QuantizedLayer:
        """A layer from `tensors()`'s parts; ValueError if their shapes do not fit together."""
        tail_keys, tail_values = tensors["tail_keys"], tensors["tail_values"]
        layer = cls(tail_keys[..., :0, :], tail_values[..., :0, :], bits)
        for name in PARTS:
            setattr(layer, name, tensors[name])
        layer.quantized = layer.key_codes.shape[-2]
        layer.hold(tail_keys, tail_values)
        batch, heads, q, _ = layer.key_codes.shape
        d, dv = tail_keys.shape[-1], tail_values.shape[-1]
        expected = {
            "key_codes": (batch, heads, q, d * bits // 8),
            "key_step": (batch, heads, q // GROUP, d),
            "key_min": (batch, heads, q // GROUP, d),
            "value_codes": (batch, heads, q, dv * bits // 8),
            "value_step": (batch, heads, q, dv // layer.group),
            "value_min": (batch, heads, q, dv // layer.group),
        }
        dtypes = {name: torch.uint8 if name.endswith("codes") else tail_keys.dtype for name in PARTS}
        if q % GROUP or any(tuple(getattr(layer, name).shape) != shape for name, shape in expected.items()):
            raise ValueError("the quantized parts' shapes do not fit together")
        if tail_values.dtype != tail_keys.dtype or any(getattr(layer, n).dtype != t for n, t in dtypes.items()):
            raise ValueError("the quantized parts' dtypes do not fit together")
        return layer

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _with_rows(rows: torch.Tensor, capacity: int, device, non_blocking: bool = False) -> torch.Tensor:
    """A buffer of `capacity` rows on `device` that starts with `rows`."""
    buffer = torch.empty((*rows.shape[:-2], capacity, rows.shape[-1]), dtype=rows.dtype, device=device)
    buffer[..., : rows.shape[-2], :].copy_(rows, non_blocking=non_blocking)
    return buffer


class QuantizedCache:
    """A cache of `QuantizedLayer`s with `KVCache`'s `update(keys, values, layer_idx)`.

    `update` appends and returns the whole layer dequantized into a scratch buffer shared by all layers on its
    device; what it returns is valid until the next layer's `update`, which is how the attention uses it.
    While decoding (`decoding=True`) rows age into quantized groups as they are appended; in prompt mode
    (a reading, and a question's lease of it) appended rows stay in full precision until `for_decoding`.
    """

    def __init__(self, cache: KVCache, bits: int, *, decoding: bool = True, free: bool = False) -> None:
        """Quantize `cache`'s filled layers; `free` drops each of its full-precision layers once quantized (a reading:
        the whole cache is never held twice)."""
        check_bits(bits)
        self.bits, self.decoding = bits, decoding
        self.layers: list[QuantizedLayer | None] = [None] * cache.num_layers
        # A lease's layers not yet used: the reading's, copied to `targets[i]` when the question first touches them.
        self.sources: list[QuantizedLayer | None] = [None] * cache.num_layers
        self.targets: list[torch.device | None] = [None] * cache.num_layers
        self.room = 0
        for i in range(cache.num_layers):
            if cache.filled(i):
                self.layers[i] = QuantizedLayer(*cache.layer(i), bits)
                if free:
                    cache.free(i)
        self.capacity = 0
        self._scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # one per device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def lease(self, device: Devices, room: int) -> QuantizedCache:
        """A prompt-mode cache for one question over this reading: each layer is copied to `device` (one for all,
        or one per layer) when first used (the codes shared, the tail with `room` spare rows), so a reading in host
        memory comes over layer by layer and two leases never write the same rows."""
        leased = QuantizedCache(KVCache(self.num_layers), self.bits, decoding=False)
        leased.sources, leased.room = list(self._held()), room
        leased.targets = [torch.device(d) for d in per_layer(device, self.num_layers)]
        return leased

    def fork(self) -> QuantizedCache:
        """`KVCache.fork`'s counterpart: a lease with every layer on its own device."""
        return self.lease([d or torch.device("cpu") for d in self.devices()], 0)

    def _held(self) -> list[QuantizedLayer | None]:
        return [layer or source for layer, source in zip(self.layers, self.sources, strict=True)]

    def devices(self) -> list[torch.device | None]:
        """Where each layer is (a lease's unused layer: where it will be), None for a layer that holds nothing."""
        return [
            None if layer is None else (self.targets[i] if self.sources[i] is not None else layer.tail_keys.device)
            for i, layer in enumerate(self._held())
        ]

    @torch.inference_mode()  # the tails were made in inference mode (the prefill's), so are written in it
    def for_decoding(self) -> QuantizedCache:
        """Hand a prompt-mode cache to decoding: quantize what KIVI would have (every whole group older than the
        recent rows) and from now on as rows are appended. Equal to quantizing the whole prompt's cache at once."""
        for i in range(self.num_layers):
            layer = self._layer(i)
            if layer is not None:
                layer.settle()
        self.decoding = True
        return self

    def _layer(self, layer_idx: int) -> QuantizedLayer | None:
        source = self.sources[layer_idx]
        if source is not None:
            self.layers[layer_idx] = source.copy(self.targets[layer_idx], self.room)
            self.sources[layer_idx] = None
        return self.layers[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self._layer(layer_idx)
        if layer is None:
            empty = (key_states[..., :0, :], value_states[..., :0, :])
            layer = self.layers[layer_idx] = QuantizedLayer(*empty, self.bits)
        if self.decoding:
            layer.append(key_states, value_states)
        else:
            layer.hold(key_states, value_states)
        keys, values = self._buffers(key_states, value_states, layer.length)
        layer.dequantize_into(keys, values)
        return keys[..., : layer.length, :], values[..., : layer.length, :]

    def _buffers(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The scratch shared by the layers on this device, grown by a quarter when a layer outgrows it (new when
        the value width changes: GemFilter's keys-only filter layer)."""
        scratch = self._scratch.get(keys.device)
        if (
            scratch is None
            or scratch[0].shape[-2] < length
            or scratch[0].shape[:2] != keys.shape[:2]
            or scratch[1].shape[-1] != values.shape[-1]
        ):
            rows = max(length, length + length // 4)
            scratch = self._scratch[keys.device] = (
                keys.new_empty((*keys.shape[:-2], rows, keys.shape[-1])),
                values.new_empty((*values.shape[:-2], rows, values.shape[-1])),
            )
        return scratch

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values dequantized into new tensors (for inspection, not decoding)."""
        layer = self._layer(layer_idx)
        keys = layer.tail_keys.new_empty((*layer.tail_keys.shape[:-2], layer.length, layer.tail_keys.shape[-1]))
        values = layer.tail_values.new_empty((*keys.shape[:-1], layer.tail_values.shape[-1]))
        layer.dequantize_into(keys, values)
        return keys, values

    def filled(self, layer_idx: int) -> bool:
        return self.layers[layer_idx] is not None or self.sources[layer_idx] is not None

    def free(self, layer_idx: int) -> None:
        """Drop one layer (GemFilter's question pass is done with it)."""
        self.layers[layer_idx] = self.sources[layer_idx] = None

    def seq_length(self, layer_idx: int = 0) -> int:
        layer = self.layers[layer_idx] or self.sources[layer_idx]
        return layer.length if layer is not None else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length(layer_idx)

    def to(self, device: Devices, room: int = 0) -> QuantizedCache:
        """A copy with every layer on `device`, one for all or one per layer (a reading moved to host memory and
        back)."""
        moved = QuantizedCache(KVCache(self.num_layers), self.bits, decoding=self.decoding)
        targets = per_layer(device, self.num_layers)
        moved.layers = [
            layer.copy(target, room) if layer is not None else None
            for layer, target in zip(self._held(), targets, strict=True)
        ]
        return moved

    def pin_memory(self) -> QuantizedCache:
        for layer in self.layers:
            if layer is not None:
                layer.pin_memory()
        return self

    def nbytes(self) -> int:
        """Bytes of the codes, steps, minimums and full-precision tail (not of the one-layer scratch)."""
        return sum(self.nbytes_by_device().values())

    def nbytes_by_device(self) -> dict[str, int]:
        by_device: dict[str, int] = {}
        for layer, device in zip(self._held(), self.devices(), strict=True):
            if layer is not None:
                by_device[str(device)] = by_device.get(str(device), 0) + layer.nbytes()
        return by_device


def quantized(cache: KVCache | QuantizedCache, bits: int | None) -> KVCache | QuantizedCache:
    """The decoding cache for a method's `kv_bits`: `cache` itself when None; a prompt-mode cache (a question over a
    quantized reading) handed to decoding; else a KIVI-quantized copy."""
    check_bits(bits)
    if bits is None:
        return cache
    if isinstance(cache, QuantizedCache):
        if cache.bits != bits:
            raise LongDocError(f"a {cache.bits}-bit cache cannot decode with kv_bits={bits}")
        return cache.for_decoding()
    return QuantizedCache(cache, bits)


def quantized_bytes(tokens: int, key_width: int, value_width: int, bits: int, element_size: int) -> int:
    """Bytes `QuantizedLayer` holds for `tokens` rows of one KV head (what a reading will cost, before reading it)."""
    q = max(0, tokens - RESIDUAL) // GROUP * GROUP
    codes = q * (key_width + value_width) * bits // 8
    scales = 2 * (q // GROUP * key_width + (q * value_width // math.gcd(GROUP, value_width) if value_width else 0))
    return codes + scales * element_size + (tokens - q) * (key_width + value_width) * element_size
