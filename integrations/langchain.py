"""LangChain: `ChatLongDoc` (chat model), `LongDocLLM` (text LLM), `LongDocQA` (documents in, answer and evidence out).

    from longdoc.integrations.langchain import ChatLongDoc, LongDocQA
    chat = ChatLongDoc(model="meta-llama/Llama-3.1-8B-Instruct", method="gemfilter")
    chain = ChatPromptTemplate.from_messages([("system", "{context}"), ("human", "{question}")]) | chat
    LongDocQA(chat=chat).invoke({"documents": docs, "question": "When can either party terminate?"})

Messages and prompts are laid out by the core (`longdoc.prompt.layout_messages` / `layout_completion`): the
model's chat template renders them as given, message text is compressible except the last user message's
head and tail (the question and answer cue), and repeated documents reuse their reading. One loaded model is
shared by every object that names it (per model and device), so building these objects is cheap.
`timeout` and `max_retries` are accepted for compatibility with LangChain's standard parameters;
a local model makes no network calls, so they change nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

try:
    from langchain_core.callbacks import CallbackManagerForLLMRun
    from langchain_core.documents import Document as LCDocument
    from langchain_core.language_models import BaseChatModel, BaseLLM, LangSmithParams
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
    from langchain_core.outputs import (
        ChatGeneration,
        ChatGenerationChunk,
        ChatResult,
        Generation,
        GenerationChunk,
        LLMResult,
    )
    from langchain_core.runnables import RunnableConfig, RunnableSerializable
    from pydantic import Field
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the LangChain integration needs langchain-core: pip install 'longdoc[langchain]'") from exc

from longdoc import Answer, LongDoc
from longdoc.documents import from_parts

from .common import generation_options, load_engine

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class _LongDocFields:
    """Fields and helpers shared by the chat model and the text LLM."""

    def _engine(self, kwargs: dict) -> tuple[LongDoc, str]:
        model = kwargs.get("model") or self.model
        return load_engine(model, self.method, self.device, self.method_options), model

    def _generation(self, stop: list[str] | None, kwargs: dict) -> dict:
        return generation_options(
            kwargs.get("max_tokens", self.max_tokens),
            kwargs.get("temperature", self.temperature),
            stop if stop is not None else self.stop,
            kwargs.get("seed", self.seed),
        )

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return dict(
            model=self.model,
            method=self.method,
            method_options=self.method_options,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            stop=self.stop,
            seed=self.seed,
        )

    def _ls_params(self, model_type: str, stop: list[str] | None, kwargs: dict) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="longdoc",
            ls_model_name=kwargs.get("model") or self.model,
            ls_model_type=model_type,
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        stop = stop if stop is not None else self.stop
        if stop:
            params["ls_stop"] = list(stop)
        return params


def _metadata(answer: Answer, model: str) -> dict:
    s = answer.stats
    return dict(
        model_name=model,
        model_provider="longdoc",
        method=s.method,
        tokens_kept=s.tokens_kept,
        prefill_seconds=s.prefill_seconds,
        decode_seconds=s.decode_seconds,
        notes=s.notes,
    )


def _usage(answer: Answer) -> dict:
    s = answer.stats
    return dict(input_tokens=s.tokens_in, output_tokens=s.tokens_out, total_tokens=s.tokens_in + s.tokens_out)


def _pairs(messages: list[BaseMessage]) -> list[tuple[str, str]]:
    return [(m.type, m.text) for m in messages]


class ChatLongDoc(_LongDocFields, BaseChatModel):
    """A chat model that reads long inputs through longdoc's prefill methods (GemFilter, HOMER, ...)."""

    model: str = Field(default=DEFAULT_MODEL, description="Hub id or local model folder.")
    method: str = Field(default="gemfilter", description="Prefill method: full, gemfilter, homer, ...")
    method_options: dict = Field(default_factory=dict, description="Options of the method, e.g. {'top_k': 1024}.")
    temperature: float = 0.0
    max_tokens: int = 256
    stop: list[str] | None = None
    seed: int | None = None
    device: str = "auto"
    streaming: bool = False
    timeout: float | None = None  # accepted for compatibility; nothing goes over a network
    max_retries: int = 0  # accepted for compatibility; nothing goes over a network

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        load_engine(self.model, self.method, self.device, self.method_options)  # loads once, checks options

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
        answer = engine.ask_prompt(_pairs(messages), **self._generation(stop, kwargs))
        message = AIMessage(
            content=answer.text, usage_metadata=_usage(answer), response_metadata=_metadata(answer, model)
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine, model = self._engine(kwargs)
        stream = engine.stream_prompt(_pairs(messages), **self._generation(stop, kwargs))
        for piece in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        answer = stream.answer
        message = AIMessageChunk(
            content="", usage_metadata=_usage(answer), response_metadata=_metadata(answer, model), chunk_position="last"
        )
        yield ChatGenerationChunk(message=message)


class LongDocLLM(_LongDocFields, BaseLLM):
    """A text-completion LLM: the prompt's last paragraph is the question, the rest is the context."""

    model: str = Field(default=DEFAULT_MODEL, description="Hub id or local model folder.")
    method: str = Field(default="gemfilter")
    method_options: dict = Field(default_factory=dict)
    temperature: float = 0.0
    max_tokens: int = 256
    stop: list[str] | None = None
    seed: int | None = None
    device: str = "auto"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        load_engine(self.model, self.method, self.device, self.method_options)

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
        generations, tokens_in, tokens_out = [], 0, 0
        for prompt in prompts:
            answer = engine.ask_prompt(prompt, **self._generation(stop, kwargs))
            generations.append([Generation(text=answer.text, generation_info=_metadata(answer, model))])
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
        stream = engine.stream_prompt(prompt, **self._generation(stop, kwargs))
        for piece in stream:
            chunk = GenerationChunk(text=piece)
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info=_metadata(stream.answer, model))


class LongDocQA(RunnableSerializable[dict, dict]):
    """No retrieval: {"documents": [Document, ...], "question": str} -> {"answer": str, "evidence": [Document]}.

    Every document goes into the context (in order, pages of one source joined); the evidence documents
    hold the quote of each kept span with its source, page and character offsets within that source.
    """

    chat: ChatLongDoc

    def invoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> dict:
        return self._call_with_config(self._answer, input, config, **kwargs)

    def _answer(self, input: dict) -> dict:
        documents: list[LCDocument] = input["documents"]
        parts = [
            (d.page_content, str(d.metadata.get("source", f"document-{i}")), _page(d)) for i, d in enumerate(documents)
        ]
        document = from_parts(parts)
        engine, _ = self.chat._engine({})
        answer = engine.ask(document.text, input["question"], **self.chat._generation(None, {}))
        evidence = [
            LCDocument(
                page_content=span["quote"],
                metadata=dict(
                    source=span["file"], page=span["page"], start=span["start"], end=span["end"], score=span["score"]
                ),
            )
            for span in document.locate_evidence(answer.evidence)
        ]
        return {"answer": answer.text, "evidence": evidence}


def _page(document: LCDocument) -> int | None:
    page = document.metadata.get("page")
    return page if isinstance(page, int) else None


__all__ = ["ChatLongDoc", "LongDocLLM", "LongDocQA"]
