"""LlamaIndex: `LongDocLLM` (a CustomLLM) and `LongDocQueryEngine`, which reads every document with no retrieval.

    from longdoc.integrations.llama_index import LongDocLLM, LongDocQueryEngine
    llm = LongDocLLM(model="meta-llama/Llama-3.1-8B-Instruct", method="gemfilter")
    engine = LongDocQueryEngine.from_documents(SimpleDirectoryReader("contracts").load_data(), llm=llm)
    response = engine.query("When can either party terminate?")
    response.source_nodes  # the evidence: quote, file, page and offsets of the spans the method kept

Messages and prompts are laid out by the core (`longdoc.prompt.layout_messages` / `layout_completion`), so
LlamaIndex's own QA and refine templates are compressed, and a repeated document reuses its reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
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
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
    from llama_index.core.query_engine import CustomQueryEngine
    from llama_index.core.schema import BaseNode, NodeWithScore, TextNode
    from pydantic import Field, PrivateAttr
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the LlamaIndex integration needs llama-index-core: pip install 'longdoc[llamaindex]'") from exc

from longdoc import Answer, LongDoc
from longdoc.documents import Document, from_parts

from .common import context_window, generation_options, load_engine


class LongDocLLM(CustomLLM):
    """A longdoc engine as a LlamaIndex LLM; one loaded model serves every call."""

    model: str = Field(default="meta-llama/Llama-3.1-8B-Instruct", description="Hub id or local model folder.")
    method: str = Field(default="gemfilter", description="Prefill method: full, gemfilter, homer, ...")
    method_options: dict = Field(default_factory=dict, description="Options of the method, e.g. top_k.")
    max_new_tokens: int = Field(default=256, description="Most tokens to generate.")
    temperature: float = Field(default=0.0, description="0 is greedy.")
    seed: int | None = Field(default=None, description="Seed for sampling.")
    device: str = Field(default="auto")
    _doc: LongDoc = PrivateAttr()

    def __init__(self, engine: LongDoc | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._doc = engine or load_engine(self.model, self.method, self.device, self.method_options)

    @classmethod
    def class_name(cls) -> str:
        return "LongDocLLM"

    @property
    def engine(self) -> LongDoc:
        return self._doc

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=context_window(self._doc),
            num_output=self.max_new_tokens,
            model_name=self.model,
            is_chat_model=True,
        )

    def _options(self, kwargs: dict) -> dict:
        return generation_options(
            kwargs.get("max_new_tokens", self.max_new_tokens),
            kwargs.get("temperature", self.temperature),
            kwargs.get("stop"),
            kwargs.get("seed", self.seed),
        )

    def _stream(self, prompt, kwargs: dict):
        """(text so far, new piece) pairs, then the finished Answer."""
        text = ""
        stream = self._doc.stream_prompt(prompt, **self._options(kwargs))
        for piece in stream:
            text += piece
            yield text, piece
        yield stream.answer

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = self._doc.ask_prompt(prompt, **self._options(kwargs))
        return CompletionResponse(text=answer.text, raw=_raw(answer))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            for item in self._stream(prompt, kwargs):
                if isinstance(item, Answer):
                    yield CompletionResponse(text=item.text, delta="", raw=_raw(item))
                else:
                    yield CompletionResponse(text=item[0], delta=item[1])

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        answer = self._doc.ask_prompt(_pairs(messages), **self._options(kwargs))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=answer.text), raw=_raw(answer))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        def gen() -> ChatResponseGen:
            for item in self._stream(_pairs(messages), kwargs):
                if isinstance(item, Answer):
                    message = ChatMessage(role=MessageRole.ASSISTANT, content=item.text)
                    yield ChatResponse(message=message, delta="", raw=_raw(item))
                else:
                    yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=item[0]), delta=item[1])

        return gen()


class LongDocQueryEngine(CustomQueryEngine):
    """Every document in context, no retrieval and no embeddings; the evidence comes back as source nodes."""

    llm: LongDocLLM
    document: Document
    streaming: bool = False

    @classmethod
    def from_documents(
        cls, documents: Sequence[BaseNode], llm: LongDocLLM, streaming: bool = False
    ) -> LongDocQueryEngine:
        """Documents or nodes (e.g. SimpleDirectoryReader(...).load_data()), in the order given."""
        parts = [(node.get_content(), _source(node), _page(node)) for node in documents]
        return cls(llm=llm, document=from_parts(parts), streaming=streaming)

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        options = self.llm._options({})
        if self.streaming:
            stream = self.llm.engine.stream(self.document.text, query_str, **options)
            return StreamingResponse(response_gen=iter(stream), source_nodes=self._nodes(stream.evidence))
        answer = self.llm.engine.ask(self.document.text, query_str, **options)
        return Response(response=answer.text, source_nodes=self._nodes(answer.evidence), metadata=_raw(answer))

    def _nodes(self, evidence) -> list[NodeWithScore]:
        return [
            NodeWithScore(
                node=TextNode(text=span["quote"], metadata={k: span[k] for k in ("file", "page", "start", "end")}),
                score=span["score"],
            )
            for span in self.document.locate_evidence(evidence)
        ]


def _pairs(messages: Sequence[ChatMessage]) -> list[tuple[str, str]]:
    return [(str(m.role.value), m.content or "") for m in messages]


def _raw(answer: Answer) -> dict:
    s = answer.stats
    return dict(
        method=s.method,
        tokens_in=s.tokens_in,
        tokens_kept=s.tokens_kept,
        tokens_out=s.tokens_out,
        prefill_seconds=s.prefill_seconds,
        notes=s.notes,
    )


def _source(node: BaseNode) -> str:
    meta = node.metadata or {}
    return str(meta.get("file_path") or meta.get("file_name") or node.node_id)


def _page(node: BaseNode) -> int | None:
    label = (node.metadata or {}).get("page_label")
    return int(label) if isinstance(label, (int, str)) and str(label).isdigit() else None


__all__ = ["LongDocLLM", "LongDocQueryEngine"]
