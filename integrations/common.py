"""What both framework integrations share: loading (one model per resolved path, device and options, held
weakly), generation options as the Hugging Face wrappers take them, and evidence in one convention.

Evidence convention (all of longdoc's own output): pages are 1-based; `start`/`end` are character offsets in
the source's own text; `text` is the span's whole text and `quote` a one-line cut of it.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longdoc import Answer, LongDoc, LongDocError
from longdoc.documents import Document, from_parts
from longdoc.evidence import quote_of
from longdoc.hub import resolve_source
from longdoc.methods import Method
from longdoc.model import DTYPES, check_device_map, load_model, resolve_device, resolve_dtype, uses_gpu
from longdoc.profile import load_profile

LONG_CONTEXT = 1 << 20  # homer and rag read past the trained window; memory, not positions, is the limit

# Generation options by the names the frameworks and the HF wrappers use -> longdoc's names.
GENERATE_KEYS = ("max_new_tokens", "max_tokens", "temperature", "top_p", "do_sample", "seed", "stop", "stop_strings")
# The wrappers' fields that say how to load the model: with an already loaded `engine=` they cannot apply.
LOADING = ("device", "device_map", "dtype", "attn_implementation", "trust_remote_code", "model_kwargs")
# model_kwargs as the HF wrappers take them -> longdoc's loading options.
MODEL_KEYS = ("dtype", "torch_dtype", "attn_implementation", "trust_remote_code", "device_map", "quantization_config")


def loading_fields(wrapper: Any) -> dict:
    """A wrapper's loading fields by name (model_kwargs apart: `load_options` reads them on their own)."""
    return {name: getattr(wrapper, name) for name in LOADING if name != "model_kwargs"}


def check_engine_or_loading(engine: LongDoc | None, fields_set: set[str]) -> None:
    """A wrapper gets a loaded `engine=` or loading fields, not both: they could not apply to a loaded model."""
    loading = sorted(set(LOADING) & fields_set)
    if engine is not None and loading:
        raise LongDocError(f"engine= is loaded; {', '.join(loading)} cannot change it: give one or the other")


# ----- loading and sharing -----
@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded; two objects with equal options (after resolving) share one loaded model."""

    model: str
    device: str = "auto"
    dtype: str | torch.dtype = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    device_map: Any = None  # None, one device ("cpu", "cuda:1"), "auto", or a dict of module name -> device
    quantization_config: Any = None

    def key(self) -> tuple:
        device, device_map = self.placement()
        mapped = check_device_map(device_map)
        device = resolve_device(device) if mapped is None else ("cuda" if uses_gpu(mapped) else "cpu")
        source, _ = resolve_source(self.model)
        local = Path(source).expanduser()
        where = str(local.resolve()) if local.exists() else source
        placed = json.dumps(mapped, sort_keys=True)  # a dict is not hashable; equal maps share one model
        return (where, device, placed, resolve_dtype(self.dtype, device), self.attn_implementation,
                self.trust_remote_code, repr(self.quantization_config))  # fmt: skip

    def placement(self) -> tuple[str, str | dict | None]:
        """(device, device_map) for `load_model`, from device_map as the HF wrappers take it: None keeps `device`,
        one device ("cpu", "cuda", "cuda:N") is that device, and "auto" or a dict of module name -> device
        spreads the model over several (longdoc checks the dict)."""
        if self.device_map is None:
            return self.device, None
        if isinstance(self.device_map, str) and self.device_map != "auto":
            if self.device_map != "cpu" and not self.device_map.startswith("cuda"):
                raise LongDocError(
                    f'device_map={self.device_map!r} is not supported; use "auto", a dict of module name -> '
                    "device, or one device: 'cpu', 'cuda', 'cuda:N' (or device=...)"
                )
            return self.device_map, None
        if self.device != "auto":
            raise LongDocError(f"give device or device_map, not both (got device={self.device!r})")
        return "auto", self.device_map


def load_options(model: str, fields: dict, model_kwargs: dict | None) -> LoadOptions:
    """Loading fields plus `model_kwargs` (as the HF wrappers take them); a key set twice differently is refused."""
    options = {k: v for k, v in fields.items() if v is not None}
    for key, value in (model_kwargs or {}).items():
        if key not in MODEL_KEYS:
            raise LongDocError(f"unknown model_kwargs key {key!r}; longdoc takes {', '.join(MODEL_KEYS)}")
        key = "dtype" if key == "torch_dtype" else key
        if key in options and options[key] != value and not (key == "device" and value is None):
            raise LongDocError(f"{key} is given twice ({options[key]!r} and model_kwargs {value!r}); give it once")
        options[key] = value
    loaded = LoadOptions(model=model, **options)
    if options.get("quantization_config") is not None:
        check_quantization(*loaded.placement())
    return loaded


def check_quantization(device: str, device_map: str | dict | None = None) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LongDocError("quantization_config needs bitsandbytes: pip install bitsandbytes (and a CUDA GPU)")
    mapped = check_device_map(device_map)
    on_gpu = uses_gpu(mapped) if mapped is not None else resolve_device(str(device)) != "cpu"
    if not on_gpu:
        raise LongDocError("quantization_config needs a CUDA GPU (bitsandbytes); use device='cuda' or drop it")


_SHARED: weakref.WeakValueDictionary[tuple, LongDoc] = weakref.WeakValueDictionary()


def shared_model(options: LoadOptions) -> LongDoc:
    """One loaded model per resolved (path, device, dtype, options); it goes when no object holds it any more."""
    key = options.key()
    found = _SHARED.get(key)
    if found is None:
        if isinstance(options.dtype, str) and options.dtype not in DTYPES:
            raise LongDocError(f"unknown dtype '{options.dtype}'; use one of {', '.join(DTYPES)} or a torch.dtype")
        device, device_map = options.placement()
        # The model's profile (longdoc.json) gives a method named by string its tuned settings, as from_pretrained;
        # read first, so that a damaged one fails before a long load.
        profile = load_profile(options.model)
        model, tokenizer = load_model(
            options.model,
            device,
            options.dtype,
            options.attn_implementation,
            options.trust_remote_code,
            quantization_config=options.quantization_config,
            device_map=device_map,
        )
        found = LongDoc(model, tokenizer, method="full", profile=profile)
        _SHARED[key] = found
    return found


def shared_models() -> int:
    """How many loaded models the integrations hold now (for tests and for checking a release worked)."""
    gc.collect()
    return len(_SHARED)


def release_memory() -> None:
    """Collect what was released and hand cached GPU memory back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_for(base: LongDoc, method: str | Method, method_options: dict | None, system_prompt: str | None) -> LongDoc:
    """The shared model with this method and system prompt (no reload; a bad option fails here); a method named
    by string gets the model's profile under `method_options`."""
    engine = base.with_method(method, **(method_options or {}))
    engine.system_prompt = system_prompt
    return engine


def context_window(engine: LongDoc, asked: int | None = None) -> int:
    """Tokens one prompt may hold: the trained window, or far more where the method reads past it; never more
    than the user's own `asked` value."""
    window = engine.arch.trained_window or LONG_CONTEXT
    possible = LONG_CONTEXT if engine.method.reads_past_window else window
    return min(possible, asked) if asked else possible


# ----- generation options -----
def renamed(kwargs: dict, aliases: dict) -> dict:
    """Arguments with each alias under its field's name (the same option given twice differently is refused)."""
    kwargs = dict(kwargs)
    for alias, name in aliases.items():
        if alias in kwargs:
            if name in kwargs and kwargs[name] != kwargs[alias]:
                raise LongDocError(f"{alias} and {name} are the same option; give one")
            kwargs[name] = kwargs.pop(alias)
    return kwargs


ALIASES = {"max_tokens": "max_new_tokens", "stop_strings": "stop"}


def generation_options(defaults: dict, call: dict, generate_kwargs: dict | None = None) -> dict:
    """Defaults, then `generate_kwargs`, then this call's options -> the core's options. Unknown keys are refused."""
    merged: dict = {}
    for source in (defaults, generate_kwargs or {}, call):
        for key, value in source.items():
            if key not in GENERATE_KEYS:
                raise LongDocError(f"unknown generation option {key!r}; longdoc takes {', '.join(GENERATE_KEYS)}")
            if value is not None:
                merged[ALIASES.get(key, key)] = value
    stop = merged.pop("stop", None)
    if stop:
        merged["stop"] = [stop] if isinstance(stop, str) else list(stop)
    sample = merged.pop("do_sample", None)
    if sample is False:
        merged["temperature"] = 0.0  # greedy, as transformers' do_sample=False
    elif sample and not merged.get("temperature"):
        raise LongDocError("do_sample=True needs a temperature above 0 (longdoc's default, 0, is greedy)")
    return merged


def finish_reason(answer: Answer, options: dict) -> str:
    """ "length" when the answer ran into max_new_tokens, else "stop" (end of turn or a stop string)."""
    return "length" if answer.stats.tokens_out >= options.get("max_new_tokens", 256) else "stop"


def answer_stats(answer: Answer, options: dict) -> dict:
    """The answer's stats both frameworks' response metadata carry."""
    s = answer.stats
    return dict(
        method=s.method,
        tokens_in=s.tokens_in,
        tokens_kept=s.tokens_kept,
        prefill_seconds=s.prefill_seconds,
        reading=s.reading,
        reused_tokens=s.reused_tokens,
        finish_reason=finish_reason(answer, options),
        notes=s.notes,
    )


# ----- evidence -----
def place_evidence(document: Document, evidence) -> list[dict]:
    """Evidence spans (strongest first) in the documents given: source, 1-based page, offsets in that source,
    the span's whole text and its one-line quote, score."""
    placed = []
    for span in document.locate_evidence(evidence):
        begin = next((f.start for f in document.files if f.source == span["file"]), 0)
        text = document.text[begin + span["start"] : begin + span["end"]]
        placed.append({**span, "text": text})
    return placed


@dataclass
class Sources:
    """The documents an integration was given, so evidence found in a prompt's text can name source and page."""

    parts: list[tuple[str, str, int | None]]  # (text, source, 1-based page or None)

    def place(self, answer: Answer, messages: list[str]) -> list[dict]:
        """Each evidence span: its source and page where its text is found in a given document, else the message."""
        return [self.place_span(span, messages) for span in answer.evidence]

    def place_span(self, span, messages: list[str]) -> dict:
        message = messages[span.message] if span.message is not None and span.message < len(messages) else ""
        text = message[span.start : span.end] if message else span.quote
        found = {"message": span.message, "message_start": span.start, "message_end": span.end, "text": text}
        found.update(start=span.start, end=span.end, message_peak=span.peak)
        found.update(quote=quote_of(text, 0, len(text)), score=span.score)
        # A span that runs over two documents (the prompt joins them) is placed by its longest piece.
        pieces = sorted((p.strip() for p in text.split("\n")), key=len, reverse=True)
        for needle in [text.strip(), *pieces]:
            for source_text, source, page in self.parts:
                at = source_text.find(needle) if needle else -1
                if at >= 0:
                    return {**found, "file": source, "page": page, "start": at, "end": at + len(needle), "text": needle}
        return found


def no_sources() -> Sources:
    return Sources([])


def as_document(parts: list[tuple[str, str, int | None]]) -> Document:
    return from_parts(parts)
