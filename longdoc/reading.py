"""A document read once, asked many questions; the engine's store of recent readings.

Attention is causal, so a method's work on [prefix | document] does not depend on a question that
comes after it. A reusable method (`Method.reusable`: full, gemfilter) keeps that work in a
`Reading`: full keeps every layer's keys and values, gemfilter layers 0..r. A question then runs only
its own tokens over it. Every prompt is computed as [0, reading_len) then the rest (see prompt.py),
whether or not the first part comes from a reading, so a follow-up equals a one-shot answer token
for token. Methods whose reduction depends on the question (homer, snapkv, streaming, rag) keep only
the tokens and recompute per question, and say so. A method with `kv_bits` keeps its reading quantized
(quantized.py): in the store, in host memory and on disk.

The store keeps recent readings by (method settings, token ids), within a memory budget: on the
model's devices first (a budget per device: a model split over GPUs keeps each layer's part of a
reading on that layer's GPU), then in host memory, least recently used evicted. Every entry point
(Python, CLI, LangChain, LlamaIndex) goes through it, so repeating a document reuses its reading unchanged.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .cache import Devices, HostBackedCache, KVCache, per_layer
from .errors import LongDocError
from .methods import Method
from .quantized import PARTS, QuantizedCache, QuantizedLayer

ROOM = 1024  # spare rows a reading's cache keeps, so a question and its answer append without a copy
FORMAT = 1  # saved reading layout version


def ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()


@dataclass
class ReadingCache:
    """The question-independent work of one method on one prompt head: token ids [0, L) and, if reusable, a cache."""

    method: Method
    ids: list[int]
    cache: KVCache | QuantizedCache | None  # None for methods that recompute per question; quantized with kv_bits
    seconds: float = 0.0  # time it took to read
    extended_from: int = 0  # tokens taken from an earlier reading (0: read from the start)
    leases: int = field(default=0, repr=False)  # questions over it not finished yet: the store leaves it in place

    @property
    def length(self) -> int:
        return len(self.ids)

    @cached_property
    def key(self) -> tuple[str, str]:
        """The store's key: method settings and a digest of the tokens (hashed once, not at every question)."""
        return self.method.describe(), ids_digest(self.ids)

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else 0

    @property
    def in_use(self) -> bool:
        return self.leases > 0

    @property
    def device(self) -> str:
        """Where the reading is held: "cuda", "cpu" or "none" (its first layer's)."""
        held = [d for d in self.cache.devices() if d is not None] if self.cache is not None else []
        return held[0].type if held else "none"

    def nbytes_by_device(self) -> dict[str, int]:
        return self.cache.nbytes_by_device() if self.cache is not None else {}

    def matches(self, ids: list[int]) -> bool:
        return len(ids) >= self.length and ids[: self.length] == self.ids

    def lease(self, device: Devices) -> KVCache | QuantizedCache | None:
        """A cache one question may append to, each layer on `device` (one for all, or the model's device per
        layer). The first lease shares the buffers; one taken while another is out (an unfinished stream) is a
        copy, so two questions never write the same rows. Each lease is handed back with `release`."""
        if self.cache is None:
            return None
        wanted = [torch.device(d) for d in per_layer(device, self.cache.num_layers)]
        shared = not self.in_use
        self.leases += 1
        if isinstance(self.cache, QuantizedCache):  # codes are never written: every lease shares them, own tails
            return self.cache.lease(wanted, ROOM)
        held = self.cache.devices()
        home = all(h is None or same_device(h, w) for h, w in zip(held, wanted, strict=True))
        if not home and all(h is None or h.type == "cpu" for h in held):  # in host memory: layers come as used
            return HostBackedCache(self.cache, wanted, ROOM)
        if not shared or not home:
            return self.cache.to(wanted, room=ROOM)
        return self.cache.fork()

    def release(self) -> None:
        self.leases = max(0, self.leases - 1)

    def to(self, device: torch.device | str) -> None:
        """Move the cache (host memory is pinned on a GPU machine, so a later copy back is fast)."""
        if self.cache is None:
            return
        moved = self.cache.to(device)
        self.cache = moved.pin_memory() if str(device) == "cpu" and torch.cuda.is_available() else moved


class ReadingStore:
    """Recent readings by (method settings, token ids), within a budget on each of the model's devices and
    `host_bytes` in host memory; least recently used moves to the host, then out.

    `device_bytes` maps each device the model computes on ("cuda:0", "cuda:1"; or a type, "cuda") to the bytes
    readings may hold there; a plain number is that budget on `device_type`. A reading's bytes count where its
    layers are: on a split model, each layer's keys and values against that layer's GPU.
    """

    def __init__(self, device_bytes: int | dict[str, int], host_bytes: int, device_type: str = "cpu") -> None:
        self.device_bytes = device_bytes if isinstance(device_bytes, dict) else {device_type: device_bytes}
        self.host_bytes = host_bytes
        self.entries: OrderedDict[tuple[str, str], ReadingCache] = OrderedDict()
        self.hits = self.misses = 0

    def find(self, method: Method, ids: list[int]) -> ReadingCache | None:
        key = (method.describe(), ids_digest(ids))
        reading = self.entries.get(key)
        if reading is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return reading

    def longest_prefix(self, method: Method, ids: list[int]) -> ReadingCache | None:
        """The reading by this method whose tokens are the longest proper prefix of `ids` (a chat that grew, a
        document with more appended), or None."""
        if method.kv_bits is not None:  # new rows over a quantized reading would differ from a fresh reading by more
            return None  # than rounding (they would attend to dequantized rows): read the whole prompt head again
        key = method.describe()
        best = None
        for (described, _), reading in self.entries.items():
            if described == key and reading.cache is not None and reading.length < len(ids) and reading.matches(ids):
                if best is None or reading.length > best.length:
                    best = reading
        return best

    def budget_of(self, device: str) -> str | None:
        """The budget a device's bytes count against ("cuda:1", or its type), or None: host memory."""
        if device in self.device_bytes:
            return device
        kind = torch.device(device).type
        return kind if kind in self.device_bytes else None

    def fits(self, nbytes: int | dict[str, int]) -> bool:
        """Whether a reading of `nbytes` (in all, or by device) could be kept: on the devices, or in host memory."""
        by_device = nbytes if isinstance(nbytes, dict) else {next(iter(self.device_bytes)): nbytes}
        on_devices = all(
            self.budget_of(d) is not None and n <= self.device_bytes[self.budget_of(d)] for d, n in by_device.items()
        )
        return on_devices or sum(by_device.values()) <= self.host_bytes

    def add(self, reading: ReadingCache) -> None:
        self.entries[reading.key] = reading
        self._balance()

    def clear(self) -> None:
        self.entries.clear()

    def used(self, where: str) -> int:
        """Bytes held on one budget ("cuda:0", "cuda", "cpu"), on every device ("device"), or in "host" memory."""

        def counted(budget: str | None) -> bool:
            if where == "host":
                return budget is None
            return budget is not None if where == "device" else budget == where

        held = (r.nbytes_by_device().items() for r in self.entries.values())
        return sum(nbytes for by_device in held for device, nbytes in by_device if counted(self.budget_of(device)))

    def _on_host(self, reading: ReadingCache) -> bool:
        held = reading.nbytes_by_device()
        return bool(held) and all(self.budget_of(d) is None for d in held)

    def _room_on_host(self, reading: ReadingCache) -> bool:
        """Whether host memory has room for the whole reading: its own budget, or the "cpu" device's when some of
        the model's layers compute there."""
        if "cpu" not in self.device_bytes:
            return reading.nbytes <= self.host_bytes
        there = reading.nbytes_by_device().get("cpu", 0)
        return self.used("cpu") - there + reading.nbytes <= self.device_bytes["cpu"]

    def _over(self) -> list[str]:
        return [budget for budget, limit in self.device_bytes.items() if self.used(budget) > limit]

    def _balance(self) -> None:
        for key in list(self.entries):  # least recently used first
            over = self._over()
            if not over:
                break
            reading = self.entries[key]
            held = reading.nbytes_by_device()
            if reading.in_use or not any(self.budget_of(d) in over for d in held):
                continue
            if any(d != "cpu" for d in held) and self._room_on_host(reading):
                reading.to("cpu")
            else:
                del self.entries[key]
        for key in list(self.entries):
            if self.used("host") <= self.host_bytes:
                break
            if self._on_host(self.entries[key]) and not self.entries[key].in_use:
                del self.entries[key]


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: "cuda" (no index) is the same as any "cuda:N"."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def default_budgets(devices: list[torch.device], weight_bytes: dict[str, int]) -> tuple[dict[str, int], int]:
    """({device: bytes}, host bytes) for readings: on each GPU half the memory its weights leave, and a quarter
    of host memory (on a CPU model the device is host memory, so host memory holds no second budget)."""
    host = _host_memory() // 4
    budgets: dict[str, int] = {}
    for device in devices:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            budgets[str(device)] = max(0, (total - weight_bytes.get(str(device), 0)) // 2)
        else:
            budgets[device.type] = host
    return budgets, (0 if "cpu" in budgets else host)


def _host_memory() -> int:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


# ----- saved readings: tensors in safetensors, facts in JSON; nothing is ever unpickled -----

TENSORS, META = "reading.safetensors", "reading.json"


def save(reading: ReadingCache, folder: Path, facts: dict) -> Path:
    """Write the reading's cache (every filled layer's rows in use; a quantized reading's codes, steps, minimums and
    full-precision tail) and the facts it will be checked against."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"ids": torch.tensor(reading.ids, dtype=torch.int64)}
    cache = reading.cache
    if isinstance(cache, QuantizedCache):
        for i, layer in enumerate(cache.layers):
            if layer is not None:
                tensors.update({f"{name}.{i}": t.contiguous().cpu() for name, t in layer.tensors().items()})
    elif cache is not None:
        for i in range(cache.num_layers):
            if cache.filled(i):
                keys, values = cache.layer(i)
                tensors[f"keys.{i}"], tensors[f"values.{i}"] = keys.contiguous().cpu(), values.contiguous().cpu()
    save_file(tensors, str(folder / TENSORS))
    meta = {**facts, "format": FORMAT, "ids_sha256": reading.key[1], "tokens": reading.length}
    (folder / META).write_text(json.dumps(meta, indent=1))
    # safetensors writes 0600 whatever the umask: give both files the mode the umask gives (a shared cache folder).
    (folder / TENSORS).chmod(stat.S_IMODE((folder / META).stat().st_mode))
    return folder


def load(folder: Path, facts: dict, method: Method, num_layers: int, device: Devices) -> ReadingCache:
    """A saved reading, refused with one line if it was made by another model, method, version or is damaged.

    Each layer goes to `device` (one for all, or one per layer: where a split model runs it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / TENSORS).is_file():
        raise LongDocError(f"{folder} holds no saved reading ({META} and {TENSORS}); save one with reading.save")
    try:
        meta = json.loads((folder / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LongDocError(
            f"the saved reading in {folder} is damaged ({META} is not JSON); read the document again"
        ) from None
    for name, want in {**facts, "format": FORMAT}.items():
        if meta.get(name) != want:
            raise LongDocError(
                f"the saved reading in {folder} was made with {name} {meta.get(name)!r}, not {want!r}; "
                "read the document again with this model and method"
            )
    try:
        tensors = load_file(str(folder / TENSORS), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise LongDocError(f"the saved reading in {folder} is damaged ({exc}); read the document again") from None
    ids = tensors.pop("ids", torch.empty(0, dtype=torch.int64)).tolist()
    if ids_digest(ids) != meta.get("ids_sha256"):
        raise LongDocError(
            f"the saved reading in {folder} is damaged (its tokens do not match); read the document again"
        )
    cache = None
    if method.reusable and method.kv_bits is not None:
        cache = _quantized_cache(tensors, method.kv_bits, num_layers, len(ids), device, folder)
    elif method.reusable:
        cache = KVCache(num_layers, capacity=len(ids) + ROOM)
        devices = per_layer(device, num_layers)
        for i in range(num_layers):
            if f"keys.{i}" in tensors:
                keys, values = tensors[f"keys.{i}"].to(devices[i]), tensors[f"values.{i}"].to(devices[i])
                if keys.shape[-2] != len(ids):
                    raise LongDocError(f"the saved reading in {folder} is damaged (layer {i}); read the document again")
                cache.update(keys, values, i)
    return ReadingCache(method=method, ids=ids, cache=cache, seconds=0.0)


def _quantized_cache(
    tensors: dict, bits: int, num_layers: int, tokens: int, device: Devices, folder: Path
) -> QuantizedCache:
    """A quantized reading from its saved parts (the codes as saved: re-quantizing dequantized rows would not give
    them back), checked to hold `tokens` rows in every layer, each layer on its device."""
    cache = QuantizedCache(KVCache(num_layers), bits, decoding=False)
    devices = per_layer(device, num_layers)
    for i in range(num_layers):
        if f"tail_keys.{i}" not in tensors:
            continue
        names = (*PARTS, "tail_keys", "tail_values")
        if any(f"{name}.{i}" not in tensors for name in names):
            raise LongDocError(f"the saved reading in {folder} is damaged (layer {i}); read the document again")
        parts = {name: tensors[f"{name}.{i}"].to(devices[i]) for name in names}  # out of memory: the caller says so
        try:
            layer = QuantizedLayer.from_tensors(parts, bits)
        except (ValueError, RuntimeError):
            layer = None
        if layer is None or layer.length != tokens:
            raise LongDocError(f"the saved reading in {folder} is damaged (layer {i}); read the document again")
        cache.layers[i] = layer
    return cache
