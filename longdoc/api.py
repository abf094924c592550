"""The public entry point: LongDoc.from_pretrained(...); doc.ask(text, question) or doc.read(source).ask(question).

One data path: text and question (or any chat / completion prompt) -> PromptLayout -> the method's prefill,
over a reading of the question-independent part when there is one -> decoding -> Answer. The caller
(this module) times the prefill, measures memory and writes the stats; methods only compute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .arch import Arch
from .documents import Document, join_documents, load_documents
from .errors import LongDocError
from .evidence import Evidence, evidence_spans
from .generate import GenerationConfig, eos_token_ids, generate_tokens, stream_text
from .measure import Measure
from .methods import Auto, Full, Method, Prefill, parse_method
from .model import load_model
from .profile import Profile, configure, load_profile
from .progress import ProgressHook, no_progress
from .prompt import PromptLayout, build_layout, layout_completion, layout_messages
from .quantized import quantized, quantized_bytes
from .reading import ROOM, ReadingCache, ReadingStore, default_budgets
from .reading import load as load_saved
from .reading import save as save_reading

log = logging.getLogger(__name__)

GENERATION_OPTIONS = ("max_new_tokens", "temperature", "top_p", "stop", "seed")


@dataclass
class Stats:
    method: str
    tokens_in: int
    tokens_kept: int
    tokens_out: int = 0
    prefill_seconds: float = 0.0  # this question's time to first token, a reading made for it included
    decode_seconds: float = 0.0
    peak_memory_bytes: int | None = None  # GPU memory above the loaded model during prefill; None on CPU
    cache_bytes: int = 0  # the decoding cache's keys and values after prefill
    # "read": made for this question; "reused": an earlier reading of these tokens; "extended": an earlier reading of
    # the first tokens, extended (a grown chat; equal to a fresh reading up to rounding); "none": nothing reusable
    reading: str = "none"
    reused_tokens: int = 0  # prompt tokens whose work came from an earlier reading
    reading_bytes: int = 0  # the reading's keys and values (held for later questions)
    reading_device: str = "none"  # where the reading is held: cuda, cpu or none
    compressed_span: tuple[int, int] = (0, 0)  # prompt rows a method may drop from: [first, end)
    notes: list[str] = field(default_factory=list)


@dataclass
class Answer:
    text: str
    evidence: list[Evidence]
    stats: Stats


class AnswerStream:
    """An answer being generated: iterate for text pieces; `evidence` is known at once, `answer` at the end.

    The prefill has run when this object exists, so `evidence` and `stats` (prefill part) are final.
    """

    def __init__(self, evidence: list[Evidence], stats: Stats, pieces: Iterator[str], on_close=None) -> None:
        self.evidence, self.stats = evidence, stats
        self._pieces, self._text, self._on_close = pieces, [], on_close
        self._answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for piece in self._pieces:
                self._text.append(piece)
                yield piece
            self._answer = Answer("".join(self._text), self.evidence, self.stats)
        finally:
            self.close()

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    @property
    def answer(self) -> Answer:
        """The finished answer; generates the rest first if the stream was not read to the end."""
        if self._answer is None:
            for _ in self:
                pass
        return self._answer


class LongDoc:
    """A model plus a default prefill method; ask questions about long documents, or read one and ask many."""

    def __init__(
        self,
        model,
        tokenizer,
        method: Method | str = "auto",
        system_prompt: str | None = None,
        *,
        store: ReadingStore | None = None,
        readings_on_host: bool = False,
        compile_decode: bool = False,
        profile: Profile | None = None,
        **method_options,
    ):
        self.model = model
        self.compile_decode = compile_decode  # decode through torch.compile (decode_graph.compiled_step)
        self.tokenizer = tokenizer
        self.arch = Arch(model)
        self.profile = profile  # the model's tuned settings (longdoc.json); a method named by string gets them
        options, self.profile_notes = configure(method, method_options, profile)
        self.method = parse_method(method, options)
        self.system_prompt = system_prompt
        self.eos_ids = eos_token_ids(model, tokenizer)
        if self.arch.split:
            log.info("the model runs on several devices: %s", self.arch.placement())
        if store is None:
            devices = list(dict.fromkeys(self.arch.layer_devices))  # where a reading's layers are held
            device_bytes, host_bytes = default_budgets(devices, weight_bytes_by_device(model))
            if readings_on_host:  # GPU memory for the model; readings stream in from host memory
                freed = sum(n for where, n in device_bytes.items() if where != "cpu")
                device_bytes = {where: n if where == "cpu" else 0 for where, n in device_bytes.items()}
                if "cpu" in device_bytes:  # some layers compute in host memory: readings share its budget
                    device_bytes["cpu"] += freed
                else:
                    host_bytes += freed
            store = ReadingStore(device_bytes, host_bytes)
        self.store = store

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        method: Method | str = "auto",
        *,
        device: str = "auto",
        device_map: str | dict | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        system_prompt: str | None = None,
        readings_on_host: bool = False,
        compile_decode: bool = False,
        **method_options,
    ) -> LongDoc:
        """Load a hub id or a local folder (safetensors only). `method` is a Method object (or a name + options);
        a name gets the model's profile (`longdoc tune`) under the options given.

        `device_map` spreads a model too large for one GPU over several: "auto" (accelerate balances the layers
        over the visible GPUs, then host memory) or a dict of module name -> device (0, "cuda:1", "cpu": weights
        kept in host memory and brought to the GPU as each layer runs). None (the default) puts the model on
        `device`; with device "auto" or "cuda", on one GPU when its weights fit, else as "auto" does.
        Every method runs on a split model with the same results; decoding is then eager (not graph-captured).

        `readings_on_host` keeps readings in pinned host memory (GPU memory for the model and one question);
        a question then brings the reading's layers over as it uses them.
        `compile_decode` fuses the captured decode step with torch.compile on a GPU: faster tokens (H200, 8B:
        see README) after a compilation of about half a minute per cache size, worth it for long answers or many.
        """
        profile = load_profile(model)
        parse_method(method, configure(method, method_options, profile)[0])  # fail on bad options before loading
        loaded, tokenizer = load_model(
            model, device, dtype, attn_implementation, trust_remote_code, device_map=device_map
        )
        return cls(
            loaded,
            tokenizer,
            method,
            system_prompt,
            profile=profile,
            readings_on_host=readings_on_host,
            compile_decode=compile_decode,
            **method_options,
        )

    def with_method(self, method: Method | str, **method_options) -> LongDoc:
        """The same loaded model (and reading store) with another default method; nothing is reloaded."""
        return LongDoc(
            self.model,
            self.tokenizer,
            method,
            self.system_prompt,
            store=self.store,
            compile_decode=self.compile_decode,
            profile=self.profile,
            **method_options,
        )

    def _method(self, method: Method | str | None) -> Method:
        """One call's method: the engine's (None), a Method, or a name, which gets the model's profile as at loading."""
        if method is None:
            return self.method
        if isinstance(method, str):
            return parse_method(method, configure(method, {}, self.profile)[0])
        if not isinstance(method, Method):
            raise LongDocError(f"method must be a Method or a method's name, not {type(method).__name__}")
        return method

    # ----- layouts -----
    def layout(self, context: str, question: str) -> PromptLayout:
        return build_layout(self.tokenizer, context, question, self.system_prompt)

    def layout_prompt(self, prompt: str | list[tuple[str, str]]) -> PromptLayout:
        """A framework's prompt: one completion string, or chat messages as (role, text) pairs."""
        if isinstance(prompt, str):
            return layout_completion(self.tokenizer, prompt)
        return layout_messages(self.tokenizer, list(prompt))

    # ----- asking -----
    def ask(
        self,
        context: str,
        question: str,
        *,
        method: Method | str | None = None,
        progress: ProgressHook = no_progress,
        **generation,
    ) -> Answer:
        """Answer `question` about `context`; returns text, evidence spans and stats."""
        return self.stream(context, question, method=method, progress=progress, **generation).answer

    def stream(
        self,
        context: str,
        question: str,
        *,
        method: Method | str | None = None,
        progress: ProgressHook = no_progress,
        **generation,
    ) -> AnswerStream:
        """Prefill now; the returned stream yields the answer's text as it is generated."""
        config = generation_config(generation)
        progress("tokenizing", 0, 1)
        layout = self.layout(context, question)
        progress("tokenizing", 1, 1)
        return self._start(layout, self._method(method), config, progress)

    def ask_prompt(
        self, prompt: str | list[tuple[str, str]], *, method: Method | str | None = None, **generation
    ) -> Answer:
        """Answer a whole prompt as a framework sends it (completion string or chat messages); see `layout_prompt`."""
        return self.stream_prompt(prompt, method=method, **generation).answer

    def stream_prompt(
        self,
        prompt: str | list[tuple[str, str]],
        *,
        method: Method | str | None = None,
        progress: ProgressHook = no_progress,
        **generation,
    ) -> AnswerStream:
        config = generation_config(generation)
        return self._start(self.layout_prompt(prompt), self._method(method), config, progress)

    # ----- readings -----
    def read(
        self,
        source: str | Document | Path | list,
        *,
        method: Method | str | None = None,
        progress: ProgressHook = no_progress,
    ) -> Reading:
        """Read a document once: text, a Document, a path, or a list of paths / Documents."""
        document = as_document(source)
        method = self._method(method)
        layout = self.layout(document.text, "?")  # the prefix and document do not depend on the question
        head = layout.token_ids()[: layout.reading_len]
        if isinstance(method, Auto):  # auto's reading is the chosen method's (gemfilter's when the text fits)
            method = method.pick(self.arch, len(layout))
        if method.reusable:
            self._check_window(method, len(head))
        try:
            cache = self._reading_for(method, head, progress, keep=True)[0]
        except torch.OutOfMemoryError:
            raise out_of_memory("reading the document", method) from None
        return Reading(self, method, document, cache)

    def load_reading(
        self,
        folder: str | Path,
        source: str | Document | Path | list | None = None,
        *,
        method: Method | str | None = None,
    ) -> Reading:
        """A reading saved by `Reading.save`, checked against this model, the method (default: this engine's),
        longdoc's version and the document (default: the text saved with it) before use."""
        method = self._method(method)
        try:
            saved = json.loads((Path(folder) / "reading.json").read_text())["document"]
            document = Document(text=saved["text"], source=saved["source"])
        except (OSError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError):
            raise LongDocError(f"{folder} holds no readable saved reading; save one with reading.save") from None
        if source is not None:
            document = as_document(source)
        if isinstance(method, Auto):  # saved as the method auto picked for this document (see read)
            method = method.pick(self.arch, len(self.layout(document.text, "?")))
        facts = self.facts(method, document)
        try:
            cache = load_saved(Path(folder), facts, method, self.arch.num_layers, self.arch.layer_devices)
        except torch.OutOfMemoryError:
            raise LongDocError(
                f"out of GPU memory while loading the saved reading in {folder}; free GPU memory or load the model on "
                "another device"
            ) from None
        self.store.add(cache)
        return Reading(self, method, document, cache)

    def facts(self, method: Method, document: Document) -> dict:
        """What a saved reading must agree with: model, weights, method and settings, longdoc version, document."""
        from . import __version__

        return dict(
            model=str(getattr(self.arch.config, "_name_or_path", "")),
            model_fingerprint=model_fingerprint(self.model),
            method=method.name,
            kv_bits=method.kv_bits,  # how the saved tensors are laid out (codes or full precision): its own fact
            options={k: v for k, v in method.options().items()},
            longdoc=__version__,
            document_sha256=hashlib.sha256(document.text.encode()).hexdigest(),
        )

    # ----- the one data path -----
    def prefill(
        self, layout: PromptLayout, method: Method | str | None = None, progress: ProgressHook = no_progress
    ) -> Prefill:
        """The method's prefill of `layout`, for callers that decode themselves: its cache is their own, so no
        reading is used or kept (the result is the same by construction; see prompt.py's reading_len)."""
        return self._prefill(layout, self._method(method), progress, use_store=False)[0]

    def _start(self, layout: PromptLayout, method: Method, config: GenerationConfig, progress) -> AnswerStream:
        self._check_question(layout)
        prefill, stats, release = self._prefill(layout, method, progress)
        evidence = evidence_spans(layout, prefill.kept_context, prefill.context_scores)
        progress("generating", 0, config.max_new_tokens)
        pieces = self._decode(prefill, config, stats)
        return AnswerStream(evidence, stats, pieces, on_close=release)

    def _prefill(self, layout: PromptLayout, method: Method, progress, use_store: bool = True):
        """(prefill, stats, release): `release` hands the reading back once decoding (which may append to
        the reading's buffers, for full) is over."""
        notes = []
        # The engine's own method (or one auto picks from it) carries the profile's settings.
        own = self.method
        configured = method == own or (isinstance(own, Auto) and method in (own.within, own.beyond))
        if isinstance(method, Auto):
            notes.append(method.why(self.arch, len(layout)))
            method = method.pick(self.arch, len(layout))
        elif isinstance(own, Auto) and method is own.pick(self.arch, len(layout)):  # a reading auto picked for
            notes.append(own.why(self.arch, len(layout)))
        if not layout.context_len:  # nothing to compress: every method's prefill is the plain one
            method, notes = Full(kv_bits=method.kv_bits), ["no context: plain prefill of the question"]
        self._check_window(method, len(layout))
        head = layout.token_ids()[: layout.reading_len]
        with Measure(self.arch.devices) as measure:
            try:
                reuse = method.reusable and use_store
                cache, how = self._reading_for(method, head, progress) if reuse else (None, "none")
                lease = cache.lease(self.arch.layer_devices) if cache is not None else None
                try:
                    prefill = method.prefill(self.arch, layout, progress, reading=lease)
                    if method.kv_bits is not None:
                        prefill.cache = quantized(prefill.cache, method.kv_bits)
                        prefill.notes.append(f"kv_bits={method.kv_bits}: the decoding cache is quantized (KIVI)")
                        if method.reusable:
                            prefill.notes.append(
                                f"kv_bits={method.kv_bits}: the reading is quantized too; the question attends to it "
                                "dequantized, whether it was read now or earlier"
                            )
                except BaseException:
                    if cache is not None:
                        cache.release()
                    raise
            except torch.OutOfMemoryError:
                raise out_of_memory(f"prefilling {len(layout)} tokens", method) from None
        if not method.reusable and layout.context_len:
            notes.append(f"{method.name}: its compression depends on the question, so it is redone for each question")
        stats = Stats(
            method=method.name,
            tokens_in=len(layout),
            tokens_kept=prefill.tokens_kept,
            prefill_seconds=measure.seconds,
            peak_memory_bytes=measure.peak_bytes,
            cache_bytes=prefill.cache.nbytes(),
            reading=how,
            reused_tokens={"reused": len(head), "extended": cache.extended_from if cache else 0}.get(how, 0),
            reading_bytes=cache.nbytes if cache is not None else 0,
            reading_device=cache.device if cache is not None else "none",
            compressed_span=(layout.prefix_len, layout.prefix_len + layout.context_len),
            notes=notes
            + prefill.notes
            + ([self.profile_notes[method.name]] if configured and method.name in self.profile_notes else []),
        )
        return prefill, stats, (cache.release if cache is not None else None)

    def _reading_for(
        self, method: Method, head: list[int], progress: ProgressHook, keep: bool = False
    ) -> tuple[ReadingCache | None, str]:
        """The store's reading of `head` for this method, or a new one (kept if the budget allows, or `keep`)."""
        if not method.reusable or not head:
            return ReadingCache(method, head, None), "none"
        found = self.store.find(method, head)
        if found is not None:  # one held in host memory stays there: its lease streams layers to the GPU
            return found, "reused"
        if not keep and not self.store.fits(self.reading_bytes_by_device(method, len(head))):
            return None, "none"  # too large to keep: the method's own one-pass prefill, same result
        start = time.perf_counter()
        base = self.store.longest_prefix(method, head)
        if base is not None:  # extend a copy of an earlier reading of the first tokens: equal up to rounding
            cache = base.cache.to(self.arch.layer_devices, room=len(head) - base.length + ROOM)
            ids = torch.tensor([head[base.length :]], device=self.arch.device)
            method.extend(self.arch, cache, ids, progress)
        else:
            ids = torch.tensor([head], device=self.arch.device)
            cache = method.read(self.arch, ids, progress, capacity=len(head) + ROOM)
        extended = base.length if base is not None else 0
        reading = ReadingCache(method, head, cache, seconds=time.perf_counter() - start, extended_from=extended)
        self.store.add(reading)
        return reading, "extended" if base is not None else "read"

    def reading_bytes(self, method: Method, tokens: int) -> int:
        """Keys and values a reading of `tokens` tokens would hold (gemfilter's last layer holds keys only), quantized
        with the method's kv_bits."""
        return sum(self.reading_bytes_by_device(method, tokens).values())

    def reading_bytes_by_device(self, method: Method, tokens: int) -> dict[str, int]:
        """The same by device: each layer's keys and values are held where the layer runs."""
        layers = method.reading_layers(self.arch)
        full_layers = layers if isinstance(method, Full) else layers - 1
        d, size, heads = self.arch.head_dim, self.arch.dtype.itemsize, self.arch.num_kv_heads
        by_device: dict[str, int] = {}
        for i in range(layers):
            value_width = d if i < full_layers else 0
            if method.kv_bits is None:
                nbytes = tokens * (d + value_width) * size * heads
            else:
                nbytes = quantized_bytes(tokens, d, value_width, method.kv_bits, size) * heads
            where = str(self.arch.layer_devices[i])
            by_device[where] = by_device.get(where, 0) + nbytes
        return by_device

    def _decode(self, prefill: Prefill, config: GenerationConfig, stats: Stats) -> Iterator[str]:
        start = time.perf_counter()
        counted = 0

        def counting(tokens):
            nonlocal counted
            for token in tokens:
                counted += 1
                yield token

        tokens = counting(
            generate_tokens(self.arch, prefill, config, self.eos_ids, notes=stats.notes, compile=self.compile_decode)
        )
        try:
            yield from stream_text(self.tokenizer, tokens, config.stop)
        except torch.OutOfMemoryError:
            raise LongDocError("out of GPU memory while decoding; lower max_new_tokens or use another device") from None
        finally:
            stats.tokens_out = counted
            stats.decode_seconds = time.perf_counter() - start

    def _check_question(self, layout: PromptLayout) -> None:
        window = self.arch.trained_window
        if window and layout.prefix_len + layout.suffix_len >= window:
            raise LongDocError(
                f"the question and prompt template take {layout.prefix_len + layout.suffix_len} tokens, more than "
                f"the model's {window}-token window; ask a shorter question"
            )

    def _check_window(self, method: Method, tokens: int) -> None:
        """Full attention past the trained window gives garbage: say so instead (homer and rag read past it)."""
        window = self.arch.trained_window
        if window and tokens > window and not (method.reads_past_window or getattr(method, "past_window", False)):
            raise LongDocError(
                f"the prompt has {tokens} tokens, more than the model's {window}-token window, which method "
                f"'{method.name}' cannot read past; use method 'auto' (homer past the window) or method 'homer', or "
                "set past_window=True to run it anyway"
            )


class Reading:
    """A document read once by one method; ask it as many questions as you like.

    For full and gemfilter each question runs only its own tokens over the reading and the answer equals
    `doc.ask(text, question)` token for token; other methods recompute per question (the stats say so).
    """

    def __init__(self, engine: LongDoc, method: Method, document: Document, cache: ReadingCache | None) -> None:
        self.engine, self.method, self.document = engine, method, document
        self.cache = cache  # held here, so the store's eviction never takes it from under this object

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    @property
    def tokens(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def ask(self, question: str, *, progress: ProgressHook = no_progress, **generation) -> Answer:
        return self.stream(question, progress=progress, **generation).answer

    def stream(self, question: str, *, progress: ProgressHook = no_progress, **generation) -> AnswerStream:
        engine = self.engine
        if self.cache is not None and self.cache.cache is not None:
            engine.store.add(self.cache)  # back in the store if it was evicted: this question finds it there
        return engine.stream(self.document.text, question, method=self.method, progress=progress, **generation)

    def save(self, folder: str | Path) -> Path:
        """Tensors in safetensors, facts in JSON (model, weights, method, version, document); `load_reading` checks."""
        if self.cache is None:
            raise LongDocError("this reading holds nothing to save")
        facts = self.engine.facts(self.method, self.document)
        facts["document"] = {"text": self.document.text, "source": self.document.source}
        return save_reading(self.cache, Path(folder), facts)


def out_of_memory(work: str, method: Method) -> LongDocError:
    """The one message for running out of GPU memory in a prefill or a reading: what helps."""
    return LongDocError(
        f"out of GPU memory {work} with {method.describe()}; try method Homer(), a smaller top_k or prefill_chunk, "
        "or another device"
    )


def generation_config(generation: dict) -> GenerationConfig:
    """Generation options by name; an unknown one is refused with the list of those there are."""
    unknown = set(generation) - set(GENERATION_OPTIONS)
    if unknown:
        raise LongDocError(
            f"unknown generation option {', '.join(sorted(unknown))}; use {', '.join(GENERATION_OPTIONS)}"
        )
    stop = generation.get("stop")
    if isinstance(stop, str):
        generation = {**generation, "stop": (stop,)}
    elif stop is not None:
        generation = {**generation, "stop": tuple(stop)}
    return GenerationConfig(**generation)


def as_document(source) -> Document:
    """Text, a Document, a path, or a list of paths / Documents -> one Document."""
    if isinstance(source, Document):
        return source
    if isinstance(source, str):
        return Document(text=source, source="text")
    if isinstance(source, Path):
        return load_documents([str(source)])
    if isinstance(source, (list, tuple)) and source:
        if all(isinstance(s, Document) for s in source):
            return source[0] if len(source) == 1 else join_documents(list(source))
        return load_documents([str(s) for s in source])
    raise LongDocError("read() takes text, a Document, a path, or a list of paths or Documents")


def weight_bytes_by_device(model) -> dict[str, int]:
    """Bytes of the model's weights on each device; weights offloaded to host memory (meta here) are not counted."""
    by_device: dict[str, int] = {}
    for param in model.parameters():
        if param.device.type != "meta":
            where = str(param.device)
            by_device[where] = by_device.get(where, 0) + param.numel() * param.element_size()
    return by_device


def model_fingerprint(model) -> str:
    """A hash of the model's config and of its weight files' names and sizes (a saved reading must match)."""
    config = model.config.to_json_string(use_diff=False)
    folder = Path(str(getattr(model.config, "_name_or_path", "")))
    files = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    return hashlib.sha256(json.dumps([config, files]).encode()).hexdigest()[:16]


__all__ = ["Answer", "AnswerStream", "LongDoc", "Reading", "Stats", "asdict"]
