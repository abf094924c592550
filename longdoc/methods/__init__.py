"""Prefill methods: one frozen dataclass config each, with a `prefill(arch, layout, progress)` method.

The registry maps names to configs so the API, CLI, integrations and benchmarks share one list.
"""

from __future__ import annotations

from dataclasses import fields

from ..errors import LongDocError
from .base import Prefilled
from .full import FullConfig
from .gemfilter import GemFilterConfig
from .homer import HomerConfig
from .rag import RagConfig
from .snapkv import SnapKVConfig
from .streaming import StreamingConfig

METHODS: dict[str, type] = {
    "full": FullConfig,
    "gemfilter": GemFilterConfig,
    "homer": HomerConfig,
    # Peer baselines, on the same engine so comparisons are like for like.
    "snapkv": SnapKVConfig,
    "streaming": StreamingConfig,
    "rag": RagConfig,
}


def make_method(name: str, **options):
    """Build a method config by name; unknown names or options fail with what is accepted."""
    if name not in METHODS:
        raise LongDocError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    cls = METHODS[name]
    accepted = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise LongDocError(
            f"method '{name}' has no option {', '.join(unknown)}; its options are: {', '.join(sorted(accepted))}"
        )
    return cls(**options)


__all__ = [
    "METHODS",
    "FullConfig",
    "GemFilterConfig",
    "HomerConfig",
    "Prefilled",
    "RagConfig",
    "SnapKVConfig",
    "StreamingConfig",
    "make_method",
]
