"""What both framework integrations share: loading one engine, generation options, evidence as plain dicts."""

from __future__ import annotations

from functools import lru_cache

from longdoc import LongDoc

LONG_CONTEXT = 1 << 20  # homer and rag read past the trained window; memory, not positions, is the limit


@lru_cache(maxsize=4)
def shared_model(model: str, device: str) -> LongDoc:
    """One loaded model per (model, device) in this process; every integration object shares it."""
    return LongDoc.from_pretrained(model, method="full", device=device)


def load_engine(model: str, method: str, device: str, method_options: dict | None) -> LongDoc:
    """The shared model with this method (no reload; a bad option fails here, before any call)."""
    return shared_model(model, device).with_method(method, **(method_options or {}))


def context_window(doc: LongDoc) -> int:
    """Tokens one prompt may hold with this method: the trained window, except where the method reaches past it."""
    if doc.method.name in ("homer", "rag"):
        return LONG_CONTEXT
    return doc.arch.trained_window or LONG_CONTEXT


def generation_options(max_new_tokens: int, temperature: float, stop: list[str] | None, seed: int | None) -> dict:
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if stop:
        options["stop"] = list(stop)
    return options
