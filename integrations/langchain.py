"""LangChain: `ChatLongDoc` (chat model), `LongDocLLM` (text LLM), `LongDocQA` (documents in, answer and evidence out).

    from longdoc.integrations.langchain import ChatLongDoc, LongDocQA
    chat = ChatLongDoc(model="meta-llama/Llama-3.1-8B-Instruct")  # method "auto": gemfilter, homer past the window
    chain = create_stuff_documents_chain(chat, prompt)  # the documents compress wherever the prompt puts them
    LongDocQA(chat=chat).invoke({"documents": docs, "question": "When can either party terminate?"})

Messages and prompts are laid out by the core (`longdoc.prompt.layout_messages` / `layout_completion`): the
model's chat template renders them as given, message text is compressible except the last user message's
head and tail (the question and answer cue), and a repeated document reuses its reading (five questions over
one document read it once). Every constructor and call argument is honoured or refused with the list of
those there are. One loaded model is shared by every object with the same resolved path, device and loading
options; it is freed when the last of them is gone (or at `release()`).

Evidence (`response_metadata["evidence"]`, `LongDocQA`'s evidence documents) follows one convention: pages
1-based (LangChain's PDF loaders number `page` from 0: longdoc reads `page_label`, else `page` + 1), offsets
within the source's text, `page_content` the span's whole text and `quote` a one-line cut. Give the chat
model `documents=[...]` and evidence found in a prompt names their source and page; otherwise it names the
message. `timeout`, `max_retries` and `api_key` are LangChain's standard parameters; a local model makes no
network calls, so they change nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

try:
    from langchain_core.callbacks import CallbackManagerForChainRun, CallbackManagerForLLMRun
    from langchain_core.documents import Document as LCDocument
    from langchain_core.language_models import BaseChatModel, BaseLLM, LangSmithParams
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
    from langchain_core.outputs import (
        ChatGeneration,
        ChatGenerationChunk,
        ChatResult,
        Generation,
        GenerationChunk,
        LLMResult,
    )
    from langchain_core.runnables import RunnableConfig, RunnableSerializable
    from langchain_core.runnables.config import patch_config
    from pydantic import Field, PrivateAttr, SecretStr
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the LangChain integration needs langchain-core: pip install 'longdoc[langchain]'") from exc

from longdoc import Answer, LongDoc, LongDocError
from longdoc.methods import Method

from .common import (
    Sources,
    answer_stats,
    as_document,
    check_engine_or_loading,
    engine_for,
    generation_options,
    load_options,
    loading_fields,
    place_evidence,
    release_memory,
    renamed,
    shared_model,
)

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CALL_OPTIONS = ("model", "max_tokens", "max_new_tokens", "temperature", "top_p", "seed", "do_sample")
ALIASES = {"max_new_tokens": "max_tokens"}


class _LongDocFields:
    """Fields and helpers shared by the chat model and the text LLM (pydantic fields are declared on each)."""

    def _setup(self) -> None:
        check_engine_or_loading(self.engine, self.model_fields_set)
        base = self.engine or self._load(self.model)
        self._base = base
        self._doc = engine_for(
            base, self._chosen_method(), self.method_options, self.system_prompt or base.system_prompt
        )

    def _chosen_method(self) -> str | Method:
        """The method asked for, else the given engine's; a name gets each model's own profile (also a per-call
        model's), a Method object (the engine's, when no method is given) is used as it is."""
        return self.method if self.engine is None or "method" in self.model_fields_set else self.engine.method

    def _load(self, model: str) -> LongDoc:
        return shared_model(load_options(model, loading_fields(self), self.model_kwargs))

    def _engine(self, kwargs: dict) -> tuple[LongDoc, str]:
        """This object's engine, or another model's for a per-call `model=` (loaded with the same options)."""
        if self._doc is None:
            raise LongDocError("this object was released; build a new one to ask again")
        model = kwargs.get("model")
        if not model or model == self.model:
            return self._doc, self.model
        return engine_for(self._load(model), self._chosen_method(), self.method_options, self._doc.system_prompt), model

    def _generation(self, stop: list[str] | None, kwargs: dict) -> dict:
        unknown = sorted(set(kwargs) - set(CALL_OPTIONS))
        if unknown:
            raise LongDocError(f"unknown call option {', '.join(unknown)}; longdoc takes {', '.join(CALL_OPTIONS)}")
        defaults = dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        call = {k: v for k, v in kwargs.items() if k != "model"}
        call["stop"] = stop if stop is not None else self.stop
        return generation_options(defaults, call, self.generate_kwargs)

    def _sources(self) -> Sources:
        return Sources([(d.page_content, _source(d, i), _page(d)) for i, d in enumerate(self.documents or [])])

    def _with_system(self, messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The system prompt as the first message (kept as its own message, so the chain's own stays as given)."""
        system = self._doc.system_prompt
        if not system or (messages and messages[0] == ("system", system)):
            return messages
        return [("system", system), *messages]

    def _prompt_pairs(self, prompt: str | list[tuple[str, str]]) -> str | list[tuple[str, str]]:
        if isinstance(prompt, str):
            return self._with_system([("user", prompt)]) if self._doc.system_prompt else prompt
        return self._with_system(prompt)

    def _metadata(self, answer: Answer, model: str, prompt, options: dict) -> dict:
        s = answer.stats
        pairs = prompt if isinstance(prompt, list) else [("user", prompt)]
        shift = 1 if self._doc.system_prompt and pairs and pairs[0] == ("system", self._doc.system_prompt) else 0
        evidence = self._sources().place(answer, [text for _, text in pairs])
        for span in evidence:
            if span.get("message") is not None:
                span["message"] -= shift
        return dict(
            model_name=model,
            model_provider="longdoc",
            **answer_stats(answer, options),
            decode_seconds=s.decode_seconds,
            evidence=evidence,
        )

    def get_token_ids(self, text: str) -> list[int]:
        """The model's own tokenizer (no download, no guess)."""
        return list(self._engine({})[0].tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Tokens of the messages as the model's chat template renders them."""
        if tools:
            raise LongDocError("longdoc models take no tools; count the messages alone")
        tokenizer = self._engine({})[0].tokenizer
        rendered = [{"role": _role(m), "content": m.text} for m in messages]
        if getattr(tokenizer, "chat_template", None) and rendered:
            text = tokenizer.apply_chat_template(rendered, tokenize=False)
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return sum(self.get_num_tokens(m["content"]) for m in rendered)

    def release(self) -> None:
        """Let go of the model now: it is freed when no other object uses it (later calls on this one fail)."""
        self._doc = self._base = None
        release_memory()

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return dict(
            model=self.model,
            method=self.method,
            method_options=self.method_options,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            top_p=self.top_p,
            stop=self.stop,
            seed=self.seed,
        )

    def _ls_params(self, model_type: str, stop: list[str] | None, kwargs: dict) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="longdoc",
            ls_model_name=kwargs.get("model") or self.model,
            ls_model_type=model_type,
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_tokens)),
        )
        stop = stop if stop is not None else self.stop
        if stop:
            params["ls_stop"] = list(stop)
        return params


def _check_arguments(cls, kwargs: dict) -> dict:
    """Constructor arguments: max_new_tokens is max_tokens; an unknown one is refused with the list."""
    kwargs = renamed(kwargs, ALIASES)
    accepted = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        own = [name for name in OWN_FIELDS if name in cls.model_fields]
        raise LongDocError(f"{cls.__name__} has no argument {', '.join(unknown)}; its arguments: {', '.join(own)}")
    return kwargs


OWN_FIELDS = (
    "model", "engine", "method", "method_options", "max_tokens", "max_new_tokens", "temperature", "top_p", "seed",
    "stop", "generate_kwargs", "system_prompt", "device", "device_map", "dtype", "attn_implementation",
    "trust_remote_code", "model_kwargs", "documents", "streaming", "timeout", "max_retries", "api_key", "callbacks",
    "tags", "metadata", "verbose", "cache", "rate_limiter", "disable_streaming",
)  # fmt: skip


def _usage(answer: Answer) -> dict:
    s = answer.stats
    return dict(input_tokens=s.tokens_in, output_tokens=s.tokens_out, total_tokens=s.tokens_in + s.tokens_out)


def _role(message: BaseMessage) -> str:
    return message.role if isinstance(message, ChatMessage) else message.type


def _pairs(messages: list[BaseMessage]) -> list[tuple[str, str]]:
    return [(_role(m), m.text) for m in messages]


class ChatLongDoc(_LongDocFields, BaseChatModel):
    """A chat model that reads long inputs through longdoc's prefill methods (GemFilter, HOMER, ...)."""

    model: str = Field(default=DEFAULT_MODEL, description="Hub id or local model folder.")
    engine: LongDoc | None = Field(default=None, exclude=True, description="A loaded LongDoc to use as it is.")
    method: str = Field(default="auto", description="Prefill method: auto (gemfilter, homer past the window), ...")
    method_options: dict = Field(default_factory=dict, description="Options of the method, e.g. {'top_k': 1024}.")
    temperature: float = 0.0
    max_tokens: int = 256
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    generate_kwargs: dict = Field(default_factory=dict, description="max_new_tokens, temperature, top_p, ...")
    system_prompt: str | None = None
    device: str = "auto"
    device_map: Any = None  # "auto", one device, or a dict of module name -> device (LoadOptions checks)
    dtype: Any = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    model_kwargs: dict = Field(default_factory=dict, description="dtype, attn_implementation, quantization_config")
    documents: list[LCDocument] | None = Field(default=None, description="Where evidence found in prompts lies.")
    streaming: bool = False
    timeout: float | None = None  # accepted for compatibility; nothing goes over a network
    max_retries: int = 0  # accepted for compatibility; nothing goes over a network
    api_key: SecretStr | None = Field(default=None, exclude=True)  # accepted for compatibility: no service, no key
    _base: LongDoc | None = PrivateAttr(default=None)
    _doc: LongDoc | None = PrivateAttr(default=None)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_check_arguments(type(self), kwargs))
        self._setup()  # loads once (shared), checks the method's options

    @property
    def _llm_type(self) -> str:
        return "longdoc-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("chat", stop, kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine, model = self._engine(kwargs)
        options = self._generation(stop, kwargs)
        prompt = self._prompt_pairs(_pairs(messages))
        answer = engine.ask_prompt(prompt, **options)
        metadata = self._metadata(answer, model, prompt, options)
        message = AIMessage(content=answer.text, usage_metadata=_usage(answer), response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine, model = self._engine(kwargs)
        options = self._generation(stop, kwargs)
        prompt = self._prompt_pairs(_pairs(messages))
        stream = engine.stream_prompt(prompt, **options)
        for piece in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        answer = stream.answer
        metadata = self._metadata(answer, model, prompt, options)
        message = AIMessageChunk(
            content="", usage_metadata=_usage(answer), response_metadata=metadata, chunk_position="last"
        )
        yield ChatGenerationChunk(message=message)


class LongDocLLM(_LongDocFields, BaseLLM):
    """A text-completion LLM: the prompt is one user message; its head and tail (the question) always stay."""

    model: str = Field(default=DEFAULT_MODEL, description="Hub id or local model folder.")
    engine: LongDoc | None = Field(default=None, exclude=True, description="A loaded LongDoc to use as it is.")
    method: str = Field(default="auto", description="Prefill method: auto (gemfilter, homer past the window), ...")
    method_options: dict = Field(default_factory=dict)
    temperature: float = 0.0
    max_tokens: int = 256
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    generate_kwargs: dict = Field(default_factory=dict)
    system_prompt: str | None = None
    device: str = "auto"
    device_map: Any = None  # "auto", one device, or a dict of module name -> device (LoadOptions checks)
    dtype: Any = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    model_kwargs: dict = Field(default_factory=dict)
    documents: list[LCDocument] | None = None
    _base: LongDoc | None = PrivateAttr(default=None)
    _doc: LongDoc | None = PrivateAttr(default=None)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_check_arguments(type(self), kwargs))
        self._setup()

    @property
    def _llm_type(self) -> str:
        return "longdoc"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("llm", stop, kwargs)

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        engine, model = self._engine(kwargs)
        options = self._generation(stop, kwargs)
        generations, tokens_in, tokens_out = [], 0, 0
        for text in prompts:
            prompt = self._prompt_pairs(text)
            answer = engine.ask_prompt(prompt, **options)
            info = self._metadata(answer, model, prompt, options)
            generations.append([Generation(text=answer.text, generation_info=info)])
            tokens_in += answer.stats.tokens_in
            tokens_out += answer.stats.tokens_out
        usage = dict(prompt_tokens=tokens_in, completion_tokens=tokens_out, total_tokens=tokens_in + tokens_out)
        return LLMResult(generations=generations, llm_output=dict(model_name=model, token_usage=usage))

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        engine, model = self._engine(kwargs)
        options = self._generation(stop, kwargs)
        laid_out = self._prompt_pairs(prompt)
        stream = engine.stream_prompt(laid_out, **options)
        for piece in stream:
            chunk = GenerationChunk(text=piece)
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info=self._metadata(stream.answer, model, laid_out, options))


class LongDocQA(RunnableSerializable[dict, dict]):
    """No retrieval: {"documents": [Document, ...], "question": str} -> {"answer": str, "evidence": [Document]}.

    Every document goes into the context (in order, pages of one source joined) as the system message, asked
    through the chat model, so callbacks see a chain run, a chat-model run with token usage, and a retriever
    run whose documents are the evidence: the kept spans with source, 1-based page and offsets in the source.
    """

    chat: ChatLongDoc

    def invoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> dict:
        return self._call_with_config(self._answer, input, config, **kwargs)

    def _answer(self, input: dict, run_manager: CallbackManagerForChainRun, config: RunnableConfig) -> dict:
        documents: list[LCDocument] = input["documents"]
        question: str = input["question"]
        document = as_document([(d.page_content, _source(d, i), _page(d)) for i, d in enumerate(documents)])
        child = patch_config(config, callbacks=run_manager.get_child())
        message = self.chat.invoke([("system", document.text), ("human", question)], config=child)
        evidence = self._evidence(document, message.response_metadata["evidence"])
        retriever = run_manager.get_child().on_retriever_start({"name": "longdoc-evidence"}, question)
        retriever.on_retriever_end(evidence)
        return {"answer": message.text, "evidence": evidence, "metadata": message.response_metadata}

    @staticmethod
    def _evidence(document, spans: list[dict]) -> list[LCDocument]:
        in_document = [_Span(s) for s in spans if s["message"] == 0]
        return [
            LCDocument(
                page_content=span["text"],
                metadata={k: span[k] for k in ("file", "page", "start", "end", "quote", "score")}
                | {"source": span["file"]},
            )
            for span in place_evidence(document, in_document)
        ]


class _Span:
    """An evidence dict from response metadata, as `Document.locate_evidence` reads spans."""

    def __init__(self, span: dict) -> None:
        self.start, self.end, self.peak = span["message_start"], span["message_end"], span["message_peak"]
        self.score = span["score"]


def _source(document: LCDocument, index: int) -> str:
    return str(document.metadata.get("source", f"document-{index}"))


def _page(document: LCDocument) -> int | None:
    """1-based: `page_label` when it is a number, else LangChain's 0-based `page` + 1."""
    label = document.metadata.get("page_label")
    if isinstance(label, (int, str)) and str(label).isdigit():
        return int(label)
    page = document.metadata.get("page")
    return page + 1 if isinstance(page, int) else None


__all__ = ["ChatLongDoc", "LongDocLLM", "LongDocQA"]
