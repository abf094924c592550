"""The public entry point: LongDoc.from_pretrained(...).ask(context, question)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .arch import Arch
from .errors import LongDocError
from .evidence import Evidence, evidence_spans
from .generate import GenerationConfig, eos_token_ids, generate_tokens, stream_text
from .methods import FullConfig, Prefilled, make_method
from .model import load_model
from .progress import ProgressHook, no_progress
from .prompt import PromptLayout, build_layout


@dataclass
class Stats:
    method: str
    tokens_in: int
    tokens_kept: int
    tokens_out: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    peak_memory_bytes: int | None = None  # GPU memory above the loaded model during prefill; None on CPU
    notes: list[str] = field(default_factory=list)


@dataclass
class Answer:
    text: str
    evidence: list[Evidence]
    stats: Stats


class LongDoc:
    """A model plus one prefill method; ask questions about long documents."""

    def __init__(self, model, tokenizer, method: str = "gemfilter", system_prompt: str | None = None, **method_config):
        self.model = model
        self.tokenizer = tokenizer
        self.arch = Arch(model)
        self.method = make_method(method, **method_config)
        self.system_prompt = system_prompt
        self.eos_ids = eos_token_ids(model, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        method: str = "gemfilter",
        *,
        device: str = "auto",
        dtype: str = "auto",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        system_prompt: str | None = None,
        **method_config,
    ) -> LongDoc:
        """Load a hub id or a local folder (safetensors only). `method_config` goes to the method."""
        make_method(method, **method_config)  # fail on bad options before loading weights
        loaded, tokenizer = load_model(model, device, dtype, attn_implementation, trust_remote_code)
        return cls(loaded, tokenizer, method, system_prompt, **method_config)

    def with_method(self, method: str, **method_config) -> LongDoc:
        """The same loaded model with another method (no reload)."""
        return LongDoc(self.model, self.tokenizer, method, self.system_prompt, **method_config)

    def layout(self, context: str, question: str) -> PromptLayout:
        return build_layout(self.tokenizer, context, question, self.system_prompt)

    def prefill(self, layout: PromptLayout, progress: ProgressHook = no_progress) -> Prefilled:
        # With no context there is nothing to compress: every method's prefill is the plain one.
        method = self.method if layout.context_len else FullConfig()
        try:
            prefilled = method.prefill(self.arch, layout, progress)
        except torch.OutOfMemoryError:
            raise LongDocError(
                f"out of GPU memory prefilling {len(layout)} tokens with '{self.method.name}'; try "
                "--method homer, a smaller --top-k or --chunk-len, or another device"
            ) from None
        if not layout.context_len:
            prefilled.notes.append("no context: plain prefill of the question")
        return prefilled

    def ask(self, context: str, question: str, progress: ProgressHook = no_progress, **generation) -> Answer:
        """Answer `question` about `context`; returns text, evidence spans and stats."""
        *_, answer = self.stream_answer(context, question, progress, **generation)
        return answer

    def stream(self, context: str, question: str, progress: ProgressHook = no_progress, **generation) -> Iterator[str]:
        """Yield the answer's text pieces as they are generated."""
        for piece in self.stream_answer(context, question, progress, **generation):
            if isinstance(piece, str):
                yield piece

    def stream_answer(self, context: str, question: str, progress: ProgressHook = no_progress, **generation):
        """Yield text pieces, then the finished Answer (text filled in) as the last item."""
        _, pieces = self.begin(context, question, progress, **generation)
        yield from pieces

    def begin(self, context: str, question: str, progress: ProgressHook = no_progress, **generation):
        """Prefill now; return (evidence, iterator of text pieces that ends with the finished Answer).

        For callers that must hand out the evidence before the answer streams (query engines).
        """
        run = self._run(context, question, progress, GenerationConfig(**_stop_tuple(generation)), announce=True)
        evidence = next(run)

        def pieces():
            text: list[str] = []
            for piece in run:
                if isinstance(piece, Answer):
                    piece.text = "".join(text)
                else:
                    text.append(piece)
                yield piece

        return evidence, pieces()

    def _run(self, context: str, question: str, progress: ProgressHook, config: GenerationConfig, announce=False):
        progress("tokenizing", 0, 1)
        layout = self.layout(context, question)
        progress("tokenizing", 1, 1)
        self._check_question(layout)
        prefilled = self.prefill(layout, progress)
        progress("generating", 0, config.max_new_tokens)
        stats = Stats(
            method=self.method.name,
            tokens_in=prefilled.tokens_in,
            tokens_kept=prefilled.tokens_kept,
            prefill_seconds=prefilled.prefill_seconds,
            peak_memory_bytes=prefilled.peak_memory_bytes,
            notes=list(prefilled.notes),
        )
        evidence = evidence_spans(layout, prefilled.kept_context, prefilled.context_scores)
        if announce:
            yield evidence
        counted: list[int] = []

        def counting(tokens):
            for token in tokens:
                counted.append(token)
                yield token

        start = time.perf_counter()
        tokens = counting(generate_tokens(self.arch, prefilled, config, self.eos_ids, notes=stats.notes))
        try:
            yield from stream_text(self.tokenizer, tokens, config.stop)
        except torch.OutOfMemoryError:
            raise LongDocError(
                "out of GPU memory while decoding; lower --max-new-tokens or use another device"
            ) from None
        stats.tokens_out = len(counted)
        stats.decode_seconds = time.perf_counter() - start
        yield Answer(text="", evidence=evidence, stats=stats)

    def _check_question(self, layout: PromptLayout) -> None:
        window = self.arch.trained_window
        if window and layout.prefix_len + layout.suffix_len >= window:
            raise LongDocError(
                f"the question and prompt template take {layout.prefix_len + layout.suffix_len} tokens, more than "
                f"the model's {window}-token window; ask a shorter question"
            )


def _stop_tuple(generation: dict) -> dict:
    stop = generation.get("stop")
    if isinstance(stop, str):
        generation = {**generation, "stop": (stop,)}
    elif stop is not None:
        generation = {**generation, "stop": tuple(stop)}
    unknown = set(generation) - {"max_new_tokens", "temperature", "top_p", "stop", "seed"}
    if unknown:
        raise LongDocError(
            f"unknown generation option {', '.join(sorted(unknown))}; "
            "use max_new_tokens, temperature, top_p, stop, seed"
        )
    return generation
