"""LlamaIndex with the bundled needle model: the no-retrieval query engine, the LLM, callbacks, the example."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_index.core")
from llama_index.core import Document as LlamaDocument  # noqa: E402
from llama_index.core import Settings, SimpleDirectoryReader, SummaryIndex  # noqa: E402
from llama_index.core.base.llms.types import ChatMessage, MessageRole  # noqa: E402
from llama_index.core.callbacks import (  # noqa: E402  # noqa: E402
    CallbackManager,
    CBEventType,
    EventPayload,
    LlamaDebugHandler,
    TokenCountingHandler,
)
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.llms.llm import LLM  # noqa: E402
from longdoc.integrations.llama_index import LongDocLLM, LongDocQueryEngine  # noqa: E402

from longdoc import LongDoc  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from needle_folder import BOOKS, MODEL, NEEDLE_GEMFILTER, NEEDLE_TEXT, QUESTION_TEXT, VALUE, write_folder  # noqa: E402

from longdoc import LongDocError  # noqa: E402
from longdoc.bench.needle import Haystacks, load_books  # noqa: E402
from longdoc.methods import parse_method  # noqa: E402
from longdoc.profile import load_profile  # noqa: E402

FOUND_BOOKS = BOOKS if BOOKS.is_dir() else None  # the held-out books beside the checkout
needs_books = pytest.mark.skipif(FOUND_BOOKS is None, reason="needs ../shared/corpus/books beside the checkout")
PROMPT = f"Some words before. {NEEDLE_TEXT} Some words after.\n\n{QUESTION_TEXT}"


@pytest.fixture(scope="module")
def engine() -> LongDoc:
    return LongDoc.from_pretrained(str(MODEL), method="gemfilter", device="cpu", **NEEDLE_GEMFILTER)


@pytest.fixture(scope="module")
def llm(engine) -> LongDocLLM:
    return LongDocLLM(engine=engine, model="needle-tiny", max_new_tokens=32)


@needs_books
def test_query_engine_reads_a_folder_and_cites_the_needle(engine, llm, tmp_path):
    folder = write_folder(tmp_path / "docs", engine.tokenizer, FOUND_BOOKS)
    documents = SimpleDirectoryReader(str(folder)).load_data()
    assert len(documents) == 2
    query_engine = LongDocQueryEngine.from_documents(documents, llm=llm)
    response = query_engine.query(QUESTION_TEXT)
    assert VALUE in response.response
    # The source node that holds the needle points into chapter-2.txt. (With the bundled model it is not
    # always the strongest: its filter layer also favours the document's last lines; see the model card.)
    node = next(n.node for n in response.source_nodes if NEEDLE_TEXT in n.node.text)
    assert node.metadata["file_name"] == "chapter-2.txt" and Path(node.metadata["file_path"]).parent == folder
    text = (folder / "chapter-2.txt").read_text(encoding="utf-8")
    assert text[node.start_char_idx : node.end_char_idx] == node.text  # the span's text, offsets in the file
    assert node.ref_doc_id == documents[1].doc_id and "quote" in node.metadata
    assert response.metadata["tokens_kept"] < response.metadata["tokens_in"]
    assert response.metadata["reading"] == "reused"  # read at construction
    assert response.metadata["finish_reason"] == "stop"

    streaming = LongDocQueryEngine.from_documents(documents, llm=llm, streaming=True).query(QUESTION_TEXT)
    sources = [n.node.text for n in response.source_nodes]
    assert [n.node.text for n in streaming.source_nodes] == sources  # evidence is there before the answer streams
    assert "".join(streaming.response_gen) == response.response

    asynchronous = asyncio.run(query_engine.aquery(QUESTION_TEXT))
    assert asynchronous.response == response.response


def test_complete_stream_chat_and_async_agree(llm):
    text = llm.complete(PROMPT).text
    assert VALUE in text
    chunks = list(llm.stream_complete(PROMPT))
    assert chunks[-1].text == text and "".join(c.delta for c in chunks) == text
    messages = [ChatMessage(role=MessageRole.USER, content=PROMPT.replace("\n\n" + QUESTION_TEXT, "")),
                ChatMessage(role=MessageRole.USER, content=QUESTION_TEXT)]  # fmt: skip
    chat = llm.chat(messages)
    assert chat.message.role == MessageRole.ASSISTANT and chat.message.content == text
    assert list(llm.stream_chat(messages))[-1].message.content == text
    assert asyncio.run(llm.acomplete(PROMPT)).text == text
    assert asyncio.run(llm.achat(messages)).message.content == text

    async def collect():
        return [c async for c in await llm.astream_complete(PROMPT)]

    assert asyncio.run(collect())[-1].text == text


def test_a_method_named_by_string_gets_the_models_profile():
    """As LongDoc.from_pretrained: the tuned settings of longdoc.json under the options given."""
    tuned = load_profile(str(MODEL)).options("gemfilter")
    llm = LongDocLLM(model=str(MODEL), method="gemfilter", device="cpu")
    assert llm.engine.method == parse_method("gemfilter", tuned)
    llm = LongDocLLM(model=str(MODEL), method="gemfilter", method_options={"filter_layer": 3}, device="cpu")
    assert llm.engine.method == parse_method("gemfilter", {**tuned, "filter_layer": 3})


def test_metadata_and_llama_index_checks(engine, llm):
    assert isinstance(llm, LLM)
    meta = llm.metadata
    assert meta.context_window <= 4096 and meta.num_output == 32 and meta.is_chat_model
    homer = LongDocLLM(engine=engine.with_method("homer"), model="needle-tiny")
    assert homer.metadata.context_window > 4096  # HOMER reads past the trained window
    handler = LlamaDebugHandler()
    llm.callback_manager = CallbackManager([handler])
    llm.complete(PROMPT)
    llm.chat([ChatMessage(role=MessageRole.USER, content=PROMPT)])
    assert len(handler.get_event_pairs(CBEventType.LLM)) == 2
    llm.callback_manager = CallbackManager([])
    Settings.llm = llm
    assert Settings.llm is llm


@needs_books
def test_the_example_runs(capsys):
    spec = importlib.util.spec_from_file_location("llama_index_query", EXAMPLES / "llama_index_query.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    response = module.main()
    assert VALUE in response.response
    assert NEEDLE_TEXT in response.source_nodes[0].node.text  # the demo model's needle is the strongest evidence
    assert "chapter-2.txt" in capsys.readouterr().out


@pytest.fixture(scope="module")
def haystacks(engine) -> Haystacks:
    return Haystacks(load_books(FOUND_BOOKS, held_out=True), engine.tokenizer) if FOUND_BOOKS else None


class Events(BaseEventHandler):
    """Records the instrumentation dispatcher's events by class name."""

    names: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Events"

    def handle(self, event, **kwargs) -> None:
        self.names.append(event.class_name())


@needs_books
@pytest.mark.parametrize("mode", ["compact", "refine", "tree_summarize"])
def test_summary_index_query_engines_compress_in_one_call(engine, llm, haystacks, mode):
    """`Settings.llm = LongDocLLM(...)` and LlamaIndex's own synthesizers: one compressed call per document."""
    sample = haystacks.sample(random.Random("summary"), 1200, needles=1, depth=0.5)
    documents = [LlamaDocument(text=sample.context, metadata={"file_name": "book.txt", "file_path": "/docs/book.txt"})]
    handler, debug = TokenCountingHandler(tokenizer=llm.tokenizer), LlamaDebugHandler()
    # LlamaIndex's synthesizers set their LLM's callback manager to Settings.callback_manager (or the one they
    # are given), so a handler attached to llm.callback_manager alone is replaced: attach it where LlamaIndex says.
    Settings.llm, Settings.embed_model, Settings.callback_manager = llm, None, CallbackManager([handler, debug])
    try:
        response = SummaryIndex.from_documents(documents).as_query_engine(response_mode=mode).query(sample.question)
    finally:
        Settings.callback_manager = llm.callback_manager = CallbackManager([])
    # GemFilter scores with the prompt's last 16 query tokens (the bundled model's setting); under LlamaIndex's
    # QA template those are the template's tail, so the tiny model keeps the wrong lines and answers in its
    # format with a wrong value (query_tokens=32 answers right). The integration is checked with full below.
    assert response.response.startswith(f"The special magic number for {sample.key} is:")
    assert len(handler.llm_token_counts) == 1 and handler.llm_token_counts[0].prompt_token_count > 1000
    raw = debug.get_event_pairs(CBEventType.LLM)[0][1].payload[EventPayload.RESPONSE].raw
    assert raw["tokens_kept"] < raw["tokens_in"] == handler.llm_token_counts[0].prompt_token_count
    Settings.llm = LongDocLLM(engine=engine.with_method("full"), max_new_tokens=32)
    full = SummaryIndex.from_documents(documents).as_query_engine(response_mode=mode).query(sample.question)
    assert sample.value in full.response  # LlamaIndex's own prompt reaches the model whole and in order


def test_context_window_is_what_the_method_reads_and_the_users_limit(engine):
    gem = LongDocLLM(engine=engine, model="needle-tiny")
    window = gem.metadata.context_window
    assert 2000 < window <= 4096  # the trained window, in LlamaIndex's (tiktoken) counts with room to spare
    assert LongDocLLM(engine=engine, context_window=1500).metadata.context_window == 1500
    homer = LongDocLLM(engine=engine.with_method("homer"), context_window=100_000)
    assert homer.metadata.context_window == 100_000  # past the window, capped by the user's value


def test_arguments_are_honoured_or_refused(engine, llm):
    assert llm.complete(PROMPT, max_tokens=3).raw["tokens_out"] == 3
    assert llm.complete(PROMPT, max_tokens=3).raw["finish_reason"] == "length"
    sized = LongDocLLM(engine=engine, num_output=4, generate_kwargs={"do_sample": False})
    assert sized.metadata.num_output == 4 and sized.complete(PROMPT).raw["tokens_out"] == 4
    with pytest.raises(LongDocError, match="has no argument tokenizer_kwargs"):
        LongDocLLM(engine=engine, tokenizer_kwargs={})
    with pytest.raises(LongDocError, match="unknown generation option 'num_beams'"):
        LongDocLLM(engine=engine, generate_kwargs={"num_beams": 2}).complete(PROMPT)
    with pytest.raises(LongDocError, match="unknown call option foo"):
        llm.complete(PROMPT, foo=1)
    with pytest.raises(LongDocError, match="device_map=.* is not supported"):
        LongDocLLM(model=str(MODEL), device_map="balanced")
    with pytest.raises(LongDocError, match="engine= is loaded; device cannot change it"):
        LongDocLLM(engine=engine, device="cpu")
    system = LongDocLLM(engine=engine, max_new_tokens=4, system_prompt="Answer briefly.").complete(PROMPT)
    assert system.raw["tokens_in"] > llm.complete(PROMPT, max_tokens=4).raw["tokens_in"]


@needs_books
def test_query_engine_reuses_its_reading_and_is_traced(engine, haystacks, one_thread):
    """Five questions over one document: read at construction, follow-ups' prefill <= 0.3 x a full read."""
    sample = haystacks.sample(random.Random("reuse"), 3400, needles=1, depth=0.5)
    llm = LongDocLLM(engine=engine, max_new_tokens=16)
    document = LlamaDocument(text=sample.context, metadata={"file_name": "book.txt", "file_path": "/docs/book.txt"})
    first = llm.complete(f"{sample.context}\n\n{sample.question}").raw  # a fresh read of the same size
    debug, events = LlamaDebugHandler(), Events()
    get_dispatcher().add_event_handler(events)
    query_engine = LongDocQueryEngine.from_documents([document], llm=llm)
    query_engine.callback_manager = CallbackManager([debug])
    questions = [sample.question] + [sample.question.replace(sample.key, k) for k in ("apple", "river", "cloud", "x")]
    metas = [query_engine.query(q).metadata for q in questions]
    assert [m["reading"] for m in metas] == ["reused"] * 5
    ratio = max(m["prefill_seconds"] for m in metas) / first["prefill_seconds"]
    print(f"LlamaIndex follow-up / first prefill at {metas[0]['tokens_in']} tokens: {ratio:.3f}")
    assert ratio <= 0.3
    assert len(debug.get_event_pairs(CBEventType.RETRIEVE)) == 5 and len(debug.get_event_pairs(CBEventType.LLM)) == 5
    end = debug.get_event_pairs(CBEventType.LLM)[0][1].payload[EventPayload.COMPLETION]
    assert end.raw["usage"]["prompt_tokens"] == metas[0]["tokens_in"]
    assert {"RetrievalEndEvent", "LLMCompletionStartEvent", "LLMCompletionEndEvent"} <= set(events.names)


@needs_books
@pytest.mark.parametrize("mode", ["context", "condense_plus_context"])
def test_chat_engines_compress_and_answer(engine, llm, haystacks, mode):
    """LlamaIndex's chat engines put the retrieved text in the system message: compressed and reused with gemfilter,
    answered right with full (gemfilter on the bundled model misses under these templates, as in the QA test)."""
    sample = haystacks.sample(random.Random("chat"), 1200, needles=1, depth=0.5)
    documents = [LlamaDocument(text=sample.context, metadata={"file_name": "book.txt"})]
    debug = LlamaDebugHandler()
    Settings.llm, Settings.embed_model, Settings.callback_manager = llm, None, CallbackManager([debug])
    try:
        chat = SummaryIndex.from_documents(documents).as_chat_engine(chat_mode=mode, llm=llm)
        chat.chat(sample.question)
        chat.chat(sample.question.replace(sample.key, "zebra"))
    finally:
        Settings.callback_manager = llm.callback_manager = CallbackManager([])
    responses = [pair[1].payload.get(EventPayload.RESPONSE) for pair in debug.get_event_pairs(CBEventType.LLM)]
    raws = [r.raw for r in responses if r is not None and r.raw and "tokens_kept" in r.raw]
    long_calls = [raw for raw in raws if raw["tokens_in"] > 1000]
    assert long_calls and all(raw["tokens_kept"] < raw["tokens_in"] for raw in long_calls)
    assert any(raw["reading"] in ("reused", "extended") for raw in long_calls[1:])
    full = LongDocLLM(engine=engine.with_method("full"), max_new_tokens=32)
    Settings.llm = full
    answer = SummaryIndex.from_documents(documents).as_chat_engine(chat_mode=mode, llm=full).chat(sample.question)
    assert sample.value in answer.response
