"""A minimal key/value cache that the model's own attention modules write into.

Transformers' attention layers call `past_key_values.update(keys, values, layer_idx)` and attend
over what it returns. This class answers that call with preallocated buffers (decoding appends
without re-copying the whole cache) and adds what the prefill methods need: selecting a subset
of positions in every layer (GemFilter's and HOMER's pruning) and merging two caches.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append (batch, kv_heads, new, head_dim) states; return the layer's whole keys and values."""
        new = key_states.shape[-2]
        length = self.lengths[layer_idx]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if keys is None or length + new > keys.shape[-2]:
            capacity = max(length + new, 2 * length, 64)
            keys = _grow(keys, length, capacity, key_states)
            values = _grow(values, length, capacity, value_states)
            self.keys[layer_idx], self.values[layer_idx] = keys, values
        keys[..., length : length + new, :] = key_states
        values[..., length : length + new, :] = value_states
        self.lengths[layer_idx] = length + new
        return keys[..., : length + new, :], values[..., : length + new, :]

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

    def select(self, index: torch.Tensor, layers: range | None = None) -> None:
        """Keep only the positions in `index` (sorted, 1-D) in the given layers (all filled ones by default)."""
        for i in layers if layers is not None else range(self.num_layers):
            if self.keys[i] is None:
                continue
            keys, values = self.layer(i)
            idx = index.to(keys.device)
            self.set_layer(i, keys.index_select(-2, idx), values.index_select(-2, idx))

    def to(self, device: torch.device | str) -> KVCache:
        """A copy with every filled layer (only its used length) on `device`."""
        moved = KVCache(self.num_layers)
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                keys, values = self.layer(i)
                moved.set_layer(i, keys.to(device), values.to(device))
        return moved

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


def _grow(buffer: torch.Tensor | None, length: int, capacity: int, like: torch.Tensor) -> torch.Tensor:
    shape = (*like.shape[:-2], capacity, like.shape[-1])
    grown = torch.empty(shape, dtype=like.dtype, device=like.device)
    if buffer is not None and length:
        grown[..., :length, :] = buffer[..., :length, :]
    return grown
