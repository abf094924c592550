"""Wall time and peak GPU memory of one step, measured by the caller around a method (methods do no bookkeeping)."""

from __future__ import annotations

import time

import torch


class Measure:
    """Wall time and peak GPU memory above the starting point, synchronised on CUDA; memory is None on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.peak_bytes: int | None = None

    def __enter__(self) -> Measure:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak_bytes = torch.cuda.max_memory_allocated() - self.base if self.cuda else None
