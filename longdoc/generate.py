"""Decoding from a prefilled cache: greedy or sampled, stop strings, EOS, token streaming."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .arch import Arch
from .decode_graph import StaticDecoder, unsupported_reason
from .errors import LongDocError
from .methods.base import Prefill


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LongDocError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LongDocError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LongDocError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))


def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids from the generation config (int or list) and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


@torch.inference_mode()
def step(arch: Arch, token: int, position: int, prefill: Prefill) -> torch.Tensor:
    """Feed one token at `position`; return the next (1, vocab) float32 logits."""
    hidden = arch.embed(torch.tensor([[token]], device=arch.device))
    position_embeddings = arch.rotary(hidden, torch.tensor([[position]], device=arch.device))
    return arch.head(arch.forward(hidden, position_embeddings, prefill.cache))


def pick(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    if config.temperature == 0:
        return int(logits.argmax(-1))
    probs = torch.softmax(logits[0] / config.temperature, -1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs > config.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


Decode = Callable[[int, int], torch.Tensor]  # (token, position) -> next (1, vocab) float32 logits


def decoder(
    arch: Arch, prefilled: Prefill, max_steps: int, notes: list[str] | None, graph: bool = True, compile: bool = False
) -> Decode:
    """A CUDA graph replayed per token where the model and cache allow it, else the eager `step`.

    `compile` captures the torch.compile'd step (`decode_graph.compiled_step`). On a GPU, the reason for
    decoding eagerly is added to `notes` (the answer's stats).
    """
    reason = unsupported_reason(arch, prefilled.cache) if graph else "graph decoding turned off"
    if reason is None:
        try:
            decode = StaticDecoder(
                arch, prefilled.cache, prefilled.next_position, max_steps, capture=True, compile=compile
            )
            if decode.refused is not None and notes is not None:
                notes.append(f"{decode.refused}: this answer replays the uncompiled graph")
            return decode
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # the eager loop still has the untouched cache
            reason = f"graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    if notes is not None and arch.device.type == "cuda":
        notes.append(f"decoded eagerly: {reason}")
    return lambda token, position: step(arch, token, position, prefilled)


def generate_tokens(
    arch: Arch,
    prefilled: Prefill,
    config: GenerationConfig,
    eos_ids: Iterable[int],
    *,
    notes: list[str] | None = None,
    graph: bool = True,
    compile: bool = False,
) -> Iterator[int]:
    """Yield generated token ids until EOS or `max_new_tokens`. Positions continue at `next_position`.

    On CUDA the steps after the first token replay a captured graph (`decode_graph.py`), of the compiled
    step with `compile`; `graph=False` keeps the eager loop. Why a GPU decoded eagerly is appended to `notes`.
    """
    eos = set(eos_ids)
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=prefilled.last_logits.device).manual_seed(config.seed)
    token = pick(prefilled.last_logits, config, generator)
    remaining = config.max_new_tokens - 1
    if token in eos:
        return
    yield token
    if not remaining:
        return
    decode = decoder(arch, prefilled, remaining, notes, graph, compile)  # after the first token: it streams at once
    position = prefilled.next_position
    if config.temperature == 0 and isinstance(decode, StaticDecoder) and decode.graph is not None:
        tokens = decode.greedy(token, position, remaining)  # the graph picks the tokens itself, a step ahead
    else:
        tokens = _stepped(decode, token, position, remaining, config, generator)
    for token in tokens:
        if token in eos:
            return
        yield token


def _stepped(
    decode: Decode, token: int, position: int, count: int, config: GenerationConfig, generator
) -> Iterator[int]:
    """`count` tokens after `token`, each fed back to pick the next one (sampled or greedy on the host)."""
    for i in range(count):
        token = pick(decode(token, position + i), config, generator)
        yield token


def stream_text(tokenizer, tokens: Iterable[int], stop: tuple[str, ...] = ()) -> Iterator[str]:
    """Turn token ids into text pieces; end at the first stop string (which is not emitted).

    Text that could still become a stop string, or an incomplete UTF-8 character, is held back
    until the next token decides it.
    """
    ids: list[int] = []
    emitted = 0
    hold = max((len(s) for s in stop), default=1) - 1
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s, max(0, emitted - hold)) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = len(text) - hold
        while safe > emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > emitted:
        yield text[emitted:]
