"""LangChain: LangChain's own standard suites on the bundled needle model, plus LongDocQA and the example."""

from __future__ import annotations

import atexit
import gc
import importlib.util
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.messages import HumanMessage, SystemMessage, trim_messages  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402
from longdoc.integrations.langchain import ChatLongDoc, LongDocLLM, LongDocQA  # noqa: E402
from tiny_models import build_model  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from longdoc.integrations import common  # noqa: E402
from needle_folder import BOOKS, MODEL, NEEDLE_GEMFILTER, NEEDLE_TEXT, QUESTION_TEXT, VALUE  # noqa: E402

from longdoc import LongDoc, LongDocError  # noqa: E402
from longdoc.bench.needle import Haystacks, load_books  # noqa: E402
from longdoc.methods import parse_method  # noqa: E402
from longdoc.profile import load_profile  # noqa: E402

PARAMS = {"model": str(MODEL), "method": "gemfilter", "method_options": NEEDLE_GEMFILTER, "device": "cpu"}
# A second local model for the suites' per-call `model=` override: a tiny random Llama built here.
_OTHER_DIR = tempfile.mkdtemp(prefix="longdoc-other-")
atexit.register(shutil.rmtree, _OTHER_DIR, ignore_errors=True)
OTHER_MODEL = str(build_model("llama", Path(_OTHER_DIR) / "tiny-llama"))
FOUND_BOOKS = BOOKS if BOOKS.is_dir() else None  # the held-out books beside the checkout
needs_books = pytest.mark.skipif(FOUND_BOOKS is None, reason="needs ../shared/corpus/books beside the checkout")


class ChatLongDocConfig:
    """What both standard suites need to build the model. Out of scope, declared through the suites' own
    flags: ChatLongDoc does not override bind_tools or with_structured_output, so has_tool_calling and
    has_structured_output are False; image, audio and PDF inputs keep their default False."""

    @property
    def chat_model_class(self) -> type[ChatLongDoc]:
        return ChatLongDoc

    @property
    def chat_model_params(self) -> dict:
        return PARAMS

    @property
    def model_override_value(self) -> str:
        return OTHER_MODEL


class TestChatLongDocUnit(ChatLongDocConfig, ChatModelUnitTests):
    pass


class TestChatLongDocIntegration(ChatLongDocConfig, ChatModelIntegrationTests):
    pass


PROMPT = f"Some words before. {NEEDLE_TEXT} Some words after.\n\n{QUESTION_TEXT}"


def test_chat_answers_from_earlier_messages_with_usage_and_method():
    chat = ChatLongDoc(**PARAMS, max_tokens=32)
    result = chat.invoke([("system", f"Some words before. {NEEDLE_TEXT} Some words after."), ("human", QUESTION_TEXT)])
    assert VALUE in result.content
    assert result.usage_metadata["input_tokens"] > 20 and result.usage_metadata["output_tokens"] > 0
    assert result.response_metadata["method"] == "gemfilter"
    assert result.response_metadata["tokens_kept"] <= result.usage_metadata["input_tokens"]
    streamed = "".join(chunk.content for chunk in chat.stream([("human", PROMPT)]))
    assert streamed == chat.invoke([("human", PROMPT)]).content
    stopped = chat.invoke(PROMPT, stop=[VALUE[3:]]).content
    assert stopped.endswith(VALUE[:3]) and VALUE[3:] not in stopped


def test_text_llm_and_batch():
    llm = LongDocLLM(**PARAMS, max_tokens=32)
    assert VALUE in llm.invoke(PROMPT)
    assert "".join(llm.stream(PROMPT)) == llm.invoke(PROMPT)
    assert llm.batch([PROMPT, PROMPT]) == [llm.invoke(PROMPT)] * 2
    assert llm._identifying_params["method_options"] == NEEDLE_GEMFILTER


def test_a_method_named_by_string_gets_the_models_profile():
    """As LongDoc.from_pretrained: the tuned settings of longdoc.json under the options given, and its note."""
    profile = load_profile(str(MODEL))
    tuned = profile.options("gemfilter")
    chat = ChatLongDoc(model=str(MODEL), method="gemfilter", device="cpu", max_tokens=8)
    assert chat._engine({})[0].method == parse_method("gemfilter", tuned)
    result = chat.invoke([("system", f"Some words before. {NEEDLE_TEXT} Some words after."), ("human", QUESTION_TEXT)])
    assert profile.describe("gemfilter") in result.response_metadata["notes"]
    llm = LongDocLLM(model=str(MODEL), method="gemfilter", method_options={"top_k": 64}, device="cpu")
    assert llm._engine({})[0].method == parse_method("gemfilter", {**tuned, "top_k": 64})
    # A per-call model= gets that model's own profile (the tiny random Llama has none: the method's defaults).
    assert chat._engine({"model": OTHER_MODEL})[0].method == parse_method("gemfilter")


def test_long_document_qa_returns_evidence_documents():
    chat = ChatLongDoc(**PARAMS, max_tokens=32)
    documents = [  # LangChain's PDF loaders number `page` from 0: longdoc's output is 1-based
        Document("Nothing to see on this page. " * 80, metadata={"source": "a.pdf", "page": 0}),
        Document(f"Words before. {NEEDLE_TEXT} Words after.", metadata={"source": "a.pdf", "page": 1}),
    ]
    handler = Recorder()
    out = LongDocQA(chat=chat).invoke({"documents": documents, "question": QUESTION_TEXT}, {"callbacks": [handler]})
    assert VALUE in out["answer"]
    top = next(d for d in out["evidence"] if NEEDLE_TEXT in d.page_content)
    assert top.metadata["source"] == "a.pdf" and top.metadata["page"] == 2
    source = "\n".join(d.page_content for d in documents)  # offsets are within the source (its pages joined)
    assert source[top.metadata["start"] : top.metadata["end"]] == top.page_content
    assert {"chain_start", "chat_model_start", "llm_end", "retriever_end", "chain_end"} <= set(handler.events)
    assert handler.usage["input_tokens"] > 0 and handler.retrieved == out["evidence"]


@needs_books
def test_the_example_runs(capsys):
    spec = importlib.util.spec_from_file_location("langchain_chain", EXAMPLES / "langchain_chain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    answer, qa = module.main()
    assert VALUE in answer and VALUE in qa["answer"]
    top = qa["evidence"][0]  # the demo model's needle is the strongest evidence
    assert NEEDLE_TEXT in top.page_content and top.metadata["source"].endswith("chapter-2.txt")
    assert "chapter-2.txt" in capsys.readouterr().out


def test_the_examples_say_in_one_line_when_the_corpus_is_missing(tmp_path):
    from needle_folder import require_books

    with pytest.raises(SystemExit, match=f"corpus books, not found at {tmp_path / 'none'}"):
        require_books(tmp_path / "none")


class Recorder(BaseCallbackHandler):
    """Records what a LangChain tracing tool would see."""

    def __init__(self) -> None:
        self.events, self.usage, self.retrieved = [], {}, []

    def on_chain_start(self, *args, **kwargs):
        self.events.append("chain_start")

    def on_chain_end(self, *args, **kwargs):
        self.events.append("chain_end")

    def on_chat_model_start(self, *args, **kwargs):
        self.events.append("chat_model_start")

    def on_llm_end(self, response, **kwargs):
        self.events.append("llm_end")
        self.usage = response.generations[0][0].message.usage_metadata

    def on_retriever_end(self, documents, **kwargs):
        self.events.append("retriever_end")
        self.retrieved = list(documents)


@pytest.fixture(scope="module")
def haystacks() -> Haystacks:
    return Haystacks(load_books(FOUND_BOOKS, held_out=True), ChatLongDoc(**PARAMS)._doc.tokenizer)


def pages_of(sample) -> list[Document]:
    """The haystack as two PDF pages, as PyPDFLoader gives them (page 0-based)."""
    half = sample.context.find(". ", len(sample.context) // 2) + 2
    texts = [sample.context[:half], sample.context[half:]]
    return [Document(t, metadata={"source": "book.pdf", "page": i}) for i, t in enumerate(texts)]


STUFF_PROMPTS = {
    "system": [("system", "Answer from this text:\n\n{context}"), ("human", "{input}")],
    "human": [("human", "Context:\n{context}\n\nQuestion: {input}")],
}


@needs_books
@pytest.mark.parametrize("where", sorted(STUFF_PROMPTS))
def test_stuff_documents_chain_compresses_answers_and_names_the_page(haystacks, where):
    chains = pytest.importorskip("langchain_classic.chains.combine_documents")
    sample = haystacks.sample(random.Random("stuff"), 1200, needles=1, depth=0.5)
    documents = pages_of(sample)
    chat = ChatLongDoc(**PARAMS, max_tokens=24, documents=documents)
    prompt = ChatPromptTemplate.from_messages(STUFF_PROMPTS[where])
    message = (prompt | chat).invoke(
        {"context": "\n\n".join(d.page_content for d in documents), "input": sample.question}
    )
    assert sample.value in message.content
    meta = message.response_metadata
    assert meta["tokens_kept"] < meta["tokens_in"] and meta["finish_reason"] == "stop"
    needle = next(e for e in meta["evidence"] if "special magic number" in e["text"])
    assert needle["file"] == "book.pdf" and needle["page"] in (1, 2)
    assert documents[needle["page"] - 1].page_content[needle["start"] : needle["end"]] == needle["text"]
    chain = chains.create_stuff_documents_chain(chat, prompt)
    assert sample.value in chain.invoke({"context": documents, "input": sample.question})


@needs_books
def test_completion_template_keeps_the_question():
    """A completion template's question stays (full answers right through it) and the document is compressed.

    GemFilter with the bundled model's profile scores with the prompt's last 16 queries; behind this template's
    "\n\nAnswer:" they no longer hold the key, and it misses the needle (README, Not there yet).
    """
    llm = LongDocLLM(**PARAMS, max_tokens=24)
    haystacks = Haystacks(load_books(FOUND_BOOKS, held_out=True), llm._doc.tokenizer)
    sample = haystacks.sample(random.Random("completion"), 1200, needles=1, depth=0.5)
    prompt = PromptTemplate.from_template("Context:\n{context}\n\nQuestion: {q}\n\nAnswer:")
    full = LongDocLLM(model=str(MODEL), method="full", device="cpu", max_tokens=24)
    assert sample.value in (prompt | full).invoke({"context": sample.context, "q": sample.question})
    info = llm.generate([prompt.format(context=sample.context, q=sample.question)]).generations[0][0].generation_info
    assert info["tokens_kept"] < info["tokens_in"] and info["method"] == "gemfilter"


@needs_books
def test_five_questions_through_a_chain_read_the_document_once(haystacks, one_thread):
    """Follow-ups reuse the reading: prefill at ~3.5K tokens <= 0.3 x the first; answers equal fresh calls."""
    # The shared engine is held weakly: an earlier test's, alive until the collector breaks its cycles, would still
    # hold readings whose tokens begin this prompt's, and the first question would extend one ("extended").
    gc.collect()
    sample = haystacks.sample(random.Random("reuse"), 3400, needles=1, depth=0.5)
    questions = [sample.question] + [sample.question.replace(sample.key, k) for k in ("apple", "river", "cloud", "x")]
    prompt = ChatPromptTemplate.from_messages(STUFF_PROMPTS["system"])
    chain = prompt | ChatLongDoc(**PARAMS, max_tokens=16)
    metas = [chain.invoke({"context": sample.context, "input": q}).response_metadata for q in questions]
    assert [m["reading"] for m in metas] == ["read"] + ["reused"] * 4
    ratio = max(m["prefill_seconds"] for m in metas[1:]) / metas[0]["prefill_seconds"]
    print(f"LangChain follow-up / first prefill at {metas[0]['tokens_in']} tokens: {ratio:.3f}")
    assert ratio <= 0.3
    fresh_engine = LongDoc.from_pretrained(str(MODEL), method="gemfilter", device="cpu", **NEEDLE_GEMFILTER)
    fresh = ChatLongDoc(engine=fresh_engine, max_tokens=16)
    again = (prompt | fresh).invoke({"context": sample.context, "input": questions[-1]})
    assert again.content == chain.invoke({"context": sample.context, "input": questions[-1]}).content


def test_every_argument_is_honoured_or_refused():
    short = ChatLongDoc(**PARAMS, max_new_tokens=3).invoke(PROMPT)
    assert short.usage_metadata["output_tokens"] == 3 and short.response_metadata["finish_reason"] == "length"
    chat = ChatLongDoc(**PARAMS, generate_kwargs={"max_new_tokens": 4, "do_sample": False})
    assert chat.invoke(PROMPT).usage_metadata["output_tokens"] == 4
    assert chat.invoke(PROMPT, max_tokens=2).usage_metadata["output_tokens"] == 2
    with pytest.raises(LongDocError, match="has no argument bogus; its arguments: model, engine"):
        ChatLongDoc(**PARAMS, bogus=1)
    with pytest.raises(LongDocError, match="unknown generation option 'num_beams'; longdoc takes max_new_tokens"):
        ChatLongDoc(**PARAMS, generate_kwargs={"num_beams": 2}).invoke(PROMPT)
    with pytest.raises(LongDocError, match="unknown call option foo"):
        ChatLongDoc(**PARAMS).invoke(PROMPT, foo=1)
    with pytest.raises(LongDocError, match="unknown model_kwargs key 'load_in_8bit'"):
        LongDocLLM(**PARAMS, model_kwargs={"load_in_8bit": True})
    with pytest.raises(LongDocError, match="give device or device_map, not both"):
        LongDocLLM(**PARAMS, device_map={"": "cpu"})
    mapped = LongDocLLM(**{**PARAMS, "device": "auto"}, device_map={"": "cpu"})  # a dict reaches longdoc's loading
    assert mapped._base.arch.devices == [torch.device("cpu")]
    with pytest.raises(LongDocError, match="quantization_config needs"):
        ChatLongDoc(**PARAMS, model_kwargs={"quantization_config": {"load_in_4bit": True}})
    with pytest.raises(LongDocError, match="engine= is loaded; dtype cannot change it"):
        ChatLongDoc(engine=ChatLongDoc(**PARAMS)._doc, dtype="bfloat16")
    half = ChatLongDoc(**PARAMS, dtype=torch.bfloat16, attn_implementation="eager", trust_remote_code=False)
    assert half._doc.arch.dtype == torch.bfloat16 and half._doc.model.config._attn_implementation == "eager"
    told = ChatLongDoc(**PARAMS, max_tokens=8, system_prompt="You answer briefly.").invoke(PROMPT)
    assert (
        told.usage_metadata["input_tokens"]
        > ChatLongDoc(**PARAMS, max_tokens=8).invoke(PROMPT).usage_metadata["input_tokens"]
    )


def test_token_counts_come_from_the_model_tokenizer():
    chat = ChatLongDoc(**PARAMS)
    tokenizer = chat._doc.tokenizer
    assert chat.get_token_ids(NEEDLE_TEXT) == tokenizer(NEEDLE_TEXT, add_special_tokens=False)["input_ids"]
    assert chat.get_num_tokens(NEEDLE_TEXT * 40) == len(
        tokenizer(NEEDLE_TEXT * 40, add_special_tokens=False)["input_ids"]
    )
    messages = [SystemMessage(NEEDLE_TEXT * 80), HumanMessage(QUESTION_TEXT)]
    counted = chat.get_num_tokens_from_messages(messages)
    assert counted > chat.get_num_tokens(NEEDLE_TEXT * 80)
    kept = trim_messages(messages, max_tokens=100, token_counter=chat, strategy="last", include_system=False)
    assert kept == [messages[1]]


def test_one_model_per_resolved_path_device_and_options_released_when_unused():
    relative = Path(MODEL).relative_to(Path.cwd()) if Path(MODEL).is_relative_to(Path.cwd()) else MODEL
    first = ChatLongDoc(**PARAMS)
    second = LongDocLLM(**{**PARAMS, "model": str(relative), "method": "homer", "method_options": {}})
    assert first._base is second._base  # relative vs absolute path, another method: one loaded model
    other = ChatLongDoc(**PARAMS, dtype="bfloat16")
    assert other._base is not first._base
    held = common.shared_models()
    del other
    assert common.shared_models() == held - 1
    first.release()
    with pytest.raises(LongDocError, match="released"):
        first.invoke(PROMPT)
    assert second.invoke(PROMPT, max_tokens=4)  # the model stays while another object uses it
