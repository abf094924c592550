"""A minimal key/value cache that the model's own attention modules write into.

Transformers' attention layers call `past_key_values.update(keys, values, layer_idx)` and attend
over what it returns. This class answers that call with preallocated buffers (decoding appends
without re-copying the whole cache) and adds what the prefill methods need: keeping a subset
of positions in every layer (GemFilter's, HOMER's and SnapKV's pruning), freeing a layer, and
forking a reading's cache for one question without copying it.

Each layer's keys and values live on the device its attention ran on: on a model split over several
GPUs (a device_map) the layers of one cache are on several devices, and a move (`to`) takes a device
per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention import decode_attention

Devices = torch.device | str | Sequence[torch.device | str]  # one device for every layer, or one per layer


def per_layer(devices: Devices, num_layers: int) -> list[torch.device | str]:
    """One device for each of `num_layers` layers, from a single device or a per-layer list."""
    if isinstance(devices, (torch.device, str)):
        return [devices] * num_layers
    devices = list(devices)
    if len(devices) != num_layers:
        raise ValueError(f"{len(devices)} devices given for {num_layers} layers")
    return devices


class KVCache:
    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.capacity = capacity  # rows to allocate at once when the final length is known

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append (batch, kv_heads, new, head_dim) states; return the layer's whole keys and values."""
        new = key_states.shape[-2]
        length = self.lengths[layer_idx]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if keys is None or length + new > keys.shape[-2]:
            # The capacity the caller announced if it suffices; else grow by a quarter, not double: a forked
            # 128K-token cache must not double its memory to decode.
            needed = length + new
            capacity = self.capacity if self.capacity >= needed else max(needed, length + max(length // 4, 64))
            keys = _grow(keys, length, capacity, key_states)
            values = _grow(values, length, capacity, value_states)
            self.keys[layer_idx], self.values[layer_idx] = keys, values
        keys[..., length : length + new, :] = key_states
        values[..., length : length + new, :] = value_states
        self.lengths[layer_idx] = length + new
        return keys[..., : length + new, :], values[..., : length + new, :]

    def filled(self, layer_idx: int) -> bool:
        """Whether this layer holds keys and values (a layer never run, or freed, does not)."""
        return self.keys[layer_idx] is not None

    def pin_memory(self) -> KVCache:
        """The same cache with host tensors in page-locked memory, so copies to a GPU run without a host stall."""
        for i in range(self.num_layers):
            if self.filled(i):
                self.keys[i], self.values[i] = self.keys[i].pin_memory(), self.values[i].pin_memory()
        return self

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.lengths[layer_idx]
        return self.keys[layer_idx][..., :length, :], self.values[layer_idx][..., :length, :]

    def seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The transformers Cache name for `seq_length`, for modules that ask."""
        return self.lengths[layer_idx]

    def set_layer(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[layer_idx], self.values[layer_idx] = keys.contiguous(), values.contiguous()
        self.lengths[layer_idx] = keys.shape[-2]

    def keep(self, index: torch.Tensor, layers: range | list[int] | None = None) -> None:
        """Keep only the positions in `index` in the given layers (all filled ones by default).

        `index` is 1-D (the same positions for every KV head, ascending) or (kv_heads, k) (each KV head its own).
        """
        for i in layers if layers is not None else range(self.num_layers):
            if self.keys[i] is None:
                continue
            keys, values = self.layer(i)
            idx = index.to(keys.device)
            if idx.ndim == 1:
                self.set_layer(i, keys.index_select(-2, idx), values.index_select(-2, idx))
            else:
                gather = idx[None, :, :, None].expand(keys.shape[0], -1, -1, keys.shape[-1])
                self.set_layer(i, keys.gather(2, gather), values.gather(2, gather))

    def free(self, layer_idx: int) -> None:
        """Drop one layer's keys and values (its memory is released once nothing else holds it)."""
        self.keys[layer_idx] = self.values[layer_idx] = None
        self.lengths[layer_idx] = 0

    def fork(self) -> KVCache:
        """A cache that starts as this one and grows on its own; this one's first `seq_length` rows never change.

        The fork shares the buffers: what it appends is written past this cache's length, which this cache
        never reads, and a buffer that must grow is copied first. So a reading's document cache serves one
        question after another without a copy. Two forks alive at once would write the same rows: the
        caller (a Reading) hands out one at a time.
        """
        forked = KVCache(self.num_layers)
        forked.keys, forked.values, forked.lengths = list(self.keys), list(self.values), list(self.lengths)
        return forked

    def to(self, device: Devices, room: int = 0) -> KVCache:
        """A copy with every filled layer (only its used length) on `device` (one for all, or one per layer, as
        a split model's `Arch.layer_devices`), with `room` spare rows per layer.

        Each layer is copied once, straight into a buffer that already has the room to grow.
        """
        devices = per_layer(device, self.num_layers)
        moved = KVCache(self.num_layers)
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                keys, values = self.layer(i)
                length = keys.shape[-2]
                for buffers, source in ((moved.keys, keys), (moved.values, values)):
                    shape = (*source.shape[:-2], length + room, source.shape[-1])
                    buffers[i] = source.new_empty(shape, device=devices[i])
                    buffers[i][..., :length, :].copy_(source)
                moved.lengths[i] = length
        return moved

    def devices(self) -> list[torch.device | None]:
        """The device of each layer's keys (None for a layer that holds none)."""
        return [keys.device if keys is not None else None for keys in self.keys]

    def nbytes(self) -> int:
        """Bytes of the rows in use (not of spare capacity)."""
        return sum(self.nbytes_by_device().values())

    def nbytes_by_device(self) -> dict[str, int]:
        """Bytes of the rows in use on each device ("cuda:0", "cpu"), for budgets kept per device."""
        totals: dict[str, int] = {}
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                keys, values = self.layer(i)
                where = str(keys.device)
                totals[where] = totals.get(where, 0) + (keys.numel() + values.numel()) * keys.element_size()
        return totals


class StaticSlots:
    """What graph decoding's step reads and advances in a static-capacity cache (`decode_graph.decode_step`): `slot`,
    a (1,) device tensor (the position being fed), and `mask` (1, 1, 1, capacity), 0 on the filled slots and the
    dtype's minimum elsewhere. Shared by `decode_graph.StaticCache` and `static_quantized.StaticQuantizedCache`."""

    slot: torch.Tensor
    mask: torch.Tensor

    def begin_step(self) -> None:
        """Before a step's layers: let attention see `slot` (the token being fed attends to itself)."""
        self.mask.index_fill_(-1, self.slot, 0)

    def reset(self, filled: int) -> None:
        """Back to `filled` slots (after a warm-up step wrote past them)."""
        self.slot.fill_(filled)
        self.mask[..., filled:] = torch.finfo(self.mask.dtype).min
        self.mask[..., :filled] = 0

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        visible: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Write one token's states at `slot` (`update`); the (1, heads, 1, head_dim) query's attention over the
        first `visible` slots of the buffers `update` returns (`Arch.decode_layer`'s attention)."""
        keys, values = self.update(key_states, value_states, layer_idx)
        return decode_attention(query, keys, values, visible, scale)


def _grow(buffer: torch.Tensor | None, length: int, capacity: int, like: torch.Tensor) -> torch.Tensor:
    shape = (*like.shape[:-2], capacity, like.shape[-1])
    grown = torch.empty(shape, dtype=like.dtype, device=like.device)
    if buffer is not None and length:
        grown[..., :length, :] = buffer[..., :length, :]
    return grown


class HostBackedCache(KVCache):
    """A reading's cache held in (pinned) host memory, brought to the GPU one layer at a time as a question uses it.

    A layer is copied when first touched (`update` or `layer`), with room for the question's rows, to that layer's
    device (`device`: one for all layers, or one per layer on a split model); a layer the question is done with can
    be freed. GemFilter's question pass frees each layer after it, so about one layer of the reading is on a GPU at
    a time; full's decoding needs every layer, so all of them come over.
    """

    def __init__(self, host: KVCache, device: Devices, room: int) -> None:
        super().__init__(host.num_layers)
        self.host, self.devices_to, self.room = host, per_layer(device, host.num_layers), room
        self.lengths = list(host.lengths)
        self.fetched = [host.keys[i] is None for i in range(host.num_layers)]

    def _fetch(self, layer_idx: int) -> None:
        if self.fetched[layer_idx]:
            return
        self.fetched[layer_idx] = True
        keys, values = self.host.layer(layer_idx)
        length = keys.shape[-2]
        for name, source in (("keys", keys), ("values", values)):
            buffer = torch.empty((*source.shape[:-2], length + self.room, source.shape[-1]), dtype=source.dtype,
                                 device=self.devices_to[layer_idx])  # fmt: skip
            buffer[..., :length, :].copy_(source, non_blocking=True)  # pinned memory: no host stall
            getattr(self, name)[layer_idx] = buffer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self._fetch(layer_idx)
        return super().update(key_states, value_states, layer_idx)

    def layer(self, layer_idx: int):
        self._fetch(layer_idx)
        return super().layer(layer_idx)

    def free(self, layer_idx: int) -> None:
        self.fetched[layer_idx] = True
        super().free(layer_idx)
