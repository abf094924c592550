"""Wall time and peak GPU memory of one step, measured by the caller around a method (methods do no bookkeeping)."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch


class Measure:
    """Wall time and peak GPU memory above the starting point, synchronised on CUDA; memory is None on CPU.

    `device` is one device or several (a model split over GPUs): then every GPU is synchronised and the peak is
    the sum of each GPU's own peak above its start.
    """

    def __init__(self, device: torch.device | Iterable[torch.device]) -> None:
        devices = [device] if isinstance(device, torch.device) else list(device)
        self.gpus = list(dict.fromkeys(d for d in devices if d.type == "cuda"))
        self.cuda = bool(self.gpus)
        self.seconds = 0.0
        self.peak_bytes: int | None = None

    def __enter__(self) -> Measure:
        self.base = {}
        for gpu in self.gpus:
            torch.cuda.synchronize(gpu)
            torch.cuda.reset_peak_memory_stats(gpu)
            self.base[gpu] = torch.cuda.memory_allocated(gpu)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        for gpu in self.gpus:
            torch.cuda.synchronize(gpu)
        self.seconds = time.perf_counter() - self.start
        if self.cuda:
            self.peak_bytes = sum(torch.cuda.max_memory_allocated(gpu) - self.base[gpu] for gpu in self.gpus)
