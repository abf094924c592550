"""LangChain: LangChain's own standard suites on the bundled needle model, plus LongDocQA and the example."""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")
from langchain_core.documents import Document  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402
from longdoc.integrations.langchain import ChatLongDoc, LongDocLLM, LongDocQA  # noqa: E402
from tiny_models import build_model  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from needle_folder import BOOKS, MODEL, NEEDLE_GEMFILTER, NEEDLE_TEXT, QUESTION_TEXT, VALUE  # noqa: E402

PARAMS = {"model": str(MODEL), "method": "gemfilter", "method_options": NEEDLE_GEMFILTER, "device": "cpu"}
# A second local model for the suites' per-call `model=` override: a tiny random Llama built here.
_OTHER_DIR = tempfile.mkdtemp(prefix="longdoc-other-")
atexit.register(shutil.rmtree, _OTHER_DIR, ignore_errors=True)
OTHER_MODEL = str(build_model("llama", Path(_OTHER_DIR) / "tiny-llama"))
needs_books = pytest.mark.skipif(not BOOKS.is_dir(), reason="needs ../shared/corpus/books beside the checkout")


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


def test_long_document_qa_returns_evidence_documents():
    chat = ChatLongDoc(**PARAMS, max_tokens=32)
    documents = [
        Document("Nothing to see on this page. " * 80, metadata={"source": "a.pdf", "page": 1}),
        Document(f"Words before. {NEEDLE_TEXT} Words after.", metadata={"source": "a.pdf", "page": 2}),
    ]
    out = LongDocQA(chat=chat).invoke({"documents": documents, "question": QUESTION_TEXT})
    assert VALUE in out["answer"]
    top = out["evidence"][0]
    assert NEEDLE_TEXT in top.page_content
    assert top.metadata["source"] == "a.pdf" and top.metadata["page"] == 2


@needs_books
def test_the_example_runs(capsys):
    spec = importlib.util.spec_from_file_location("langchain_chain", EXAMPLES / "langchain_chain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    answer, qa = module.main()
    assert VALUE in answer and VALUE in qa["answer"]
    assert any(NEEDLE_TEXT in d.page_content and d.metadata["source"].endswith("chapter-2.txt") for d in qa["evidence"])
    assert "chapter-2.txt" in capsys.readouterr().out
