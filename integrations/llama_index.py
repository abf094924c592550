"""LlamaIndex: `LongDocLLM` (an LLM for `Settings.llm`) and `LongDocQueryEngine`, which reads every document once.

    from longdoc.integrations.llama_index import LongDocLLM, LongDocQueryEngine
    Settings.llm = LongDocLLM(model="meta-llama/Llama-3.1-8B-Instruct")  # method "auto"
    SummaryIndex.from_documents(documents).as_query_engine(response_mode="compact").query("...")  # compressed
    engine = LongDocQueryEngine.from_documents(SimpleDirectoryReader("contracts").load_data(), llm=Settings.llm)
    response = engine.query("When can either party terminate?")
    response.source_nodes  # the evidence: the kept spans, with the reader's file_name / file_path / page_label

Messages and prompts are laid out by the core (`longdoc.prompt.layout_messages` / `layout_completion`), so
LlamaIndex's own QA, refine and summary templates are compressed and a repeated document reuses its reading.
`metadata.context_window` is what the method can read (far past the trained window for homer and rag), in the
units LlamaIndex counts with (its global tokenizer; set `Settings.tokenizer = llm.tokenizer` for exact counts),
and never more than a `context_window` you give. Evidence: pages 1-based (`page_label`), node text the span's
whole text, `quote` a one-line cut, `ref_doc_id` the document the span lies in; give `documents=[...]` and
evidence found in prompts names their file and page (in `raw["evidence"]`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

try:
    from llama_index.core.base.llms.generic_utils import messages_to_prompt as generic_messages_to_prompt
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        ChatResponseGen,
        CompletionResponse,
        CompletionResponseGen,
        LLMMetadata,
        MessageRole,
    )
    from llama_index.core.base.response.schema import Response, StreamingResponse
    from llama_index.core.callbacks import CBEventType, EventPayload
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.events.llm import LLMCompletionEndEvent, LLMCompletionStartEvent
    from llama_index.core.instrumentation.events.retrieval import RetrievalEndEvent, RetrievalStartEvent
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
    from llama_index.core.llms.llm import default_completion_to_prompt
    from llama_index.core.query_engine import CustomQueryEngine
    from llama_index.core.schema import BaseNode, NodeRelationship, NodeWithScore, RelatedNodeInfo, TextNode
    from llama_index.core.utils import get_tokenizer
    from pydantic import Field, PrivateAttr
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the LlamaIndex integration needs llama-index-core: pip install 'longdoc[llamaindex]'") from exc

from longdoc import Answer, AnswerStream, LongDoc, LongDocError
from longdoc.documents import Document

from .common import (
    LONG_CONTEXT,
    Sources,
    answer_stats,
    as_document,
    check_engine_or_loading,
    context_window,
    engine_for,
    generation_options,
    load_options,
    loading_fields,
    place_evidence,
    release_memory,
    renamed,
    shared_model,
)

dispatcher = get_dispatcher(__name__)
ALIASES = {"num_output": "max_new_tokens", "max_tokens": "max_new_tokens"}
CALL_OPTIONS = ("max_new_tokens", "max_tokens", "temperature", "top_p", "seed", "stop", "do_sample")
SAFETY = 0.9  # LlamaIndex counts with another tokenizer: leave room for the difference
# English prose, to compare LlamaIndex's token counts with the model's own (window in LlamaIndex's units).
REFERENCE_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness. The agreement may be terminated by either party with thirty days' written notice, provided "
    "that all outstanding invoices have been paid in full. Context information is below. Given the context "
    "information and not prior knowledge, answer the query. The quick brown fox jumps over the lazy dog."
)


class LongDocLLM(CustomLLM):
    """A longdoc engine as a LlamaIndex LLM; one loaded model serves every object with the same options."""

    model: str = Field(default="meta-llama/Llama-3.1-8B-Instruct", description="Hub id or local model folder.")
    method: str = Field(default="auto", description="Prefill method: auto (gemfilter, homer past the window), ...")
    method_options: dict = Field(default_factory=dict, description="Options of the method, e.g. top_k.")
    max_new_tokens: int = Field(default=256, description="Most tokens to generate (LlamaIndex's num_output).")
    temperature: float = Field(default=0.0, description="0 is greedy.")
    top_p: float | None = Field(default=None, description="Nucleus sampling.")
    seed: int | None = Field(default=None, description="Seed for sampling.")
    stop: list[str] | None = Field(default=None, description="Stop strings.")
    generate_kwargs: dict = Field(default_factory=dict, description="max_new_tokens, temperature, top_p, ...")
    context_window: int | None = Field(default=None, description="At most this many tokens per call.")
    device: str = Field(default="auto")
    device_map: Any = Field(default=None)
    dtype: Any = Field(default="auto")
    attn_implementation: str | None = Field(default=None)
    trust_remote_code: bool = Field(default=False)
    model_kwargs: dict = Field(default_factory=dict, description="dtype, attn_implementation, quantization_config")
    documents: list[BaseNode] | None = Field(default=None, description="Where evidence found in prompts lies.")
    _base: LongDoc | None = PrivateAttr(default=None)
    _doc: LongDoc | None = PrivateAttr(default=None)

    def __init__(self, engine: LongDoc | None = None, **kwargs: Any) -> None:
        super().__init__(**_check_arguments(type(self), kwargs))
        check_engine_or_loading(engine, self.model_fields_set)
        self._base = engine or shared_model(load_options(self.model, loading_fields(self), self.model_kwargs))
        method = engine.method if engine is not None and "method" not in self.model_fields_set else self.method
        self._doc = engine_for(self._base, method, self.method_options, self._base.system_prompt)

    @classmethod
    def class_name(cls) -> str:
        return "LongDocLLM"

    @property
    def engine(self) -> LongDoc:
        if self._doc is None:
            raise LongDocError("this LLM was released; build a new one to ask again")
        return self._doc

    def release(self) -> None:
        """Let go of the model now: it is freed when no other object uses it (later calls on this one fail)."""
        self._doc = self._base = None
        release_memory()

    @property
    def tokenizer(self) -> Callable[[str], list[int]]:
        """The model's own token counter, for `Settings.tokenizer` (LlamaIndex's chunking then counts exactly)."""
        tokenizer = self.engine.tokenizer
        return lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self._window(),
            num_output=self.max_new_tokens,
            model_name=self.model,
            is_chat_model=True,
        )

    def _window(self) -> int:
        """What the method can read, in LlamaIndex's token units, capped by the user's context_window."""
        tokens = context_window(self.engine)
        if tokens < LONG_CONTEXT:
            counted, own = len(get_tokenizer()(REFERENCE_TEXT)), len(self.tokenizer(REFERENCE_TEXT))
            tokens = int(tokens * min(1.0, counted / own) * SAFETY) if counted != own else tokens
        return min(tokens, self.context_window) if self.context_window else tokens

    def _options(self, kwargs: dict) -> dict:
        unknown = sorted(set(kwargs) - set(CALL_OPTIONS) - {"formatted"})
        if unknown:
            raise LongDocError(f"unknown call option {', '.join(unknown)}; longdoc takes {', '.join(CALL_OPTIONS)}")
        defaults = dict(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed
        )
        defaults["stop"] = self.stop
        return generation_options(defaults, kwargs, self.generate_kwargs)

    def _completion_prompt(self, prompt: str, formatted: bool) -> str | list[tuple[str, str]]:
        if not formatted and self.completion_to_prompt is not default_completion_to_prompt:
            prompt = self.completion_to_prompt(prompt)
        return [("system", self.system_prompt), ("user", prompt)] if self.system_prompt else prompt

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> str | list[tuple[str, str]]:
        if self.messages_to_prompt is not generic_messages_to_prompt:
            return self.messages_to_prompt(messages)
        pairs = [(str(m.role.value), m.content or "") for m in messages]
        if self.system_prompt and (not pairs or pairs[0] != ("system", self.system_prompt)):
            pairs = [("system", self.system_prompt), *pairs]
        return pairs

    def _raw(self, answer: Answer, prompt, options: dict) -> dict:
        texts = [prompt] if isinstance(prompt, str) else [text for _, text in prompt]
        sources = Sources([(n.get_content(), _source(n), _page(n)) for n in self.documents or []])
        return raw_of(answer, options, sources.place(answer, texts))

    def _stream(self, prompt, kwargs: dict) -> Iterator:
        """(text so far, new piece) pairs, then the finished Answer's raw dict."""
        options = self._options(kwargs)
        text, stream = "", self.engine.stream_prompt(prompt, **options)
        for piece in stream:
            text += piece
            yield text, piece
        yield self._raw(stream.answer, prompt, options)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        options, laid_out = self._options(kwargs), self._completion_prompt(prompt, formatted)
        answer = self.engine.ask_prompt(laid_out, **options)
        return CompletionResponse(text=answer.text, raw=self._raw(answer, laid_out, options))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        laid_out = self._completion_prompt(prompt, formatted)

        def gen() -> CompletionResponseGen:
            text = ""
            for item in self._stream(laid_out, kwargs):
                if isinstance(item, dict):
                    yield CompletionResponse(text=text, delta="", raw=item)
                else:
                    text = item[0]
                    yield CompletionResponse(text=item[0], delta=item[1])

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        options, prompt = self._options(kwargs), self._chat_prompt(messages)
        answer = self.engine.ask_prompt(prompt, **options)
        message = ChatMessage(role=MessageRole.ASSISTANT, content=answer.text)
        return ChatResponse(message=message, raw=self._raw(answer, prompt, options))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        prompt = self._chat_prompt(messages)

        def gen() -> ChatResponseGen:
            text = ""
            for item in self._stream(prompt, kwargs):
                if isinstance(item, dict):
                    yield ChatResponse(
                        message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta="", raw=item
                    )
                else:
                    text = item[0]
                    yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=item[1])

        return gen()


def _check_arguments(cls, kwargs: dict) -> dict:
    """num_output / max_tokens are max_new_tokens; an unknown argument is refused with the list."""
    kwargs = renamed(kwargs, ALIASES)
    unknown = sorted(set(kwargs) - set(cls.model_fields))
    if unknown:
        raise LongDocError(
            f"{cls.__name__} has no argument {', '.join(unknown)}; its arguments: engine, num_output, "
            f"{', '.join(cls.model_fields)}"
        )
    return kwargs


def raw_of(answer: Answer, options: dict, evidence: list[dict]) -> dict:
    """What a response's `raw` holds: stats, usage as LlamaIndex's token counter reads it, evidence."""
    s = answer.stats
    return dict(
        **answer_stats(answer, options),
        tokens_out=s.tokens_out,
        usage=dict(prompt_tokens=s.tokens_in, completion_tokens=s.tokens_out, total_tokens=s.tokens_in + s.tokens_out),
        evidence=evidence,
    )


class LongDocQueryEngine(CustomQueryEngine):
    """Every document in context, no retrieval and no embeddings; read once at construction, then each query
    runs only its own tokens. The evidence comes back as source nodes; callbacks and the instrumentation
    dispatcher see a query, a retrieval (the evidence nodes) and an LLM call with its token counts."""

    llm: LongDocLLM
    document: Document
    sources: list[BaseNode] = Field(default_factory=list)
    streaming: bool = False
    _reading: Any = PrivateAttr(default=None)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reading = self.llm.engine.read(self.document)

    @classmethod
    def from_documents(
        cls, documents: Sequence[BaseNode], llm: LongDocLLM, streaming: bool = False
    ) -> LongDocQueryEngine:
        """Documents or nodes (e.g. SimpleDirectoryReader(...).load_data()), in the order given."""
        parts = [(node.get_content(), _source(node), _page(node)) for node in documents]
        return cls(llm=llm, document=as_document(parts), sources=list(documents), streaming=streaming)

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        options = self.llm._options({})
        event_id = self.callback_manager.on_event_start(CBEventType.LLM, payload={EventPayload.PROMPT: query_str})
        dispatcher.event(LLMCompletionStartEvent(prompt=query_str, additional_kwargs=options, model_dict={}))
        stream = self._reading.stream(query_str, **options)
        nodes = self._retrieved(query_str, stream)
        if self.streaming:
            answer_gen = self._finishing(query_str, stream, options, event_id)
            return StreamingResponse(response_gen=answer_gen, source_nodes=nodes)
        answer = stream.answer
        self._llm_end(query_str, answer, options, event_id)
        return Response(response=answer.text, source_nodes=nodes, metadata=raw_of(answer, options, []))

    def _retrieved(self, query_str: str, stream: AnswerStream) -> list[NodeWithScore]:
        """The evidence as a retrieval: what tracing tools show as the nodes this answer rests on."""
        with self.callback_manager.event(CBEventType.RETRIEVE, payload={EventPayload.QUERY_STR: query_str}) as event:
            dispatcher.event(RetrievalStartEvent(str_or_query_bundle=query_str))
            nodes = self._nodes(stream.evidence)
            dispatcher.event(RetrievalEndEvent(str_or_query_bundle=query_str, nodes=nodes))
            event.on_end(payload={EventPayload.NODES: nodes})
        return nodes

    def _llm_end(self, query_str: str, answer: Answer, options: dict, event_id: str) -> None:
        response = CompletionResponse(text=answer.text, raw=raw_of(answer, options, []))
        dispatcher.event(LLMCompletionEndEvent(prompt=query_str, response=response))
        payload = {EventPayload.PROMPT: query_str, EventPayload.COMPLETION: response}
        self.callback_manager.on_event_end(CBEventType.LLM, payload=payload, event_id=event_id)

    def _finishing(self, query_str: str, stream: AnswerStream, options: dict, event_id: str) -> Iterator[str]:
        yield from stream
        self._llm_end(query_str, stream.answer, options, event_id)

    def _nodes(self, evidence) -> list[NodeWithScore]:
        return [
            NodeWithScore(node=self._node(span), score=span["score"])
            for span in place_evidence(self.document, evidence)
        ]

    def _node(self, span: dict) -> TextNode:
        """A node as LlamaIndex's readers make them: the source's metadata keys, ref_doc_id, the span's text."""
        source = self._source_node(span["file"], span["page"])
        metadata = dict(source.metadata) if source is not None else {"file_path": span["file"]}
        if span["page"] is not None:
            metadata["page_label"] = str(span["page"])
        metadata.update(quote=span["quote"])
        node = TextNode(text=span["text"], metadata=metadata, start_char_idx=span["start"], end_char_idx=span["end"])
        if source is not None:
            node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=source.ref_doc_id or source.node_id)
        return node

    def _source_node(self, file: str, page: int | None) -> BaseNode | None:
        matches = [n for n in self.sources if _source(n) == file]
        return next((n for n in matches if _page(n) == page), matches[0] if matches else None)


def _source(node: BaseNode) -> str:
    meta = node.metadata or {}
    return str(meta.get("file_path") or meta.get("file_name") or node.node_id)


def _page(node: BaseNode) -> int | None:
    label = (node.metadata or {}).get("page_label")
    return int(label) if isinstance(label, (int, str)) and str(label).isdigit() else None


__all__ = ["LongDocLLM", "LongDocQueryEngine"]
