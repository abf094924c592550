"""LangChain, no retrieval: stuff a whole folder into a chain and ask; then the same with evidence (LongDocQA).

    python examples/langchain_chain.py

A folder with a needle in a held-out corpus book is written to a temp dir.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from longdoc.integrations.langchain import ChatLongDoc, LongDocQA

sys.path.insert(0, str(Path(__file__).resolve().parent))
from needle_folder import DEMO_MODEL, QUESTION_TEXT, require_books, write_folder  # noqa: E402


def main() -> tuple[str, dict]:
    require_books()
    chat = ChatLongDoc(model=str(DEMO_MODEL), method="gemfilter", max_tokens=32)  # settings: the model's longdoc.json
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp) / "docs", chat._engine({})[0].tokenizer)
        documents = [
            Document(p.read_text(encoding="utf-8"), metadata={"source": str(p)}) for p in sorted(folder.iterdir())
        ]
    # 1. A plain chain: the documents are the system message (the context), the question the human message.
    prompt = ChatPromptTemplate.from_messages([("system", "{context}"), ("human", "{question}")])
    chain = prompt | chat | StrOutputParser()
    context = "\n\n".join(d.page_content for d in documents)
    answer = chain.invoke({"context": context, "question": QUESTION_TEXT})
    print(f"chain:      {answer}")
    # 2. LongDocQA: the same, with the kept spans as evidence documents.
    qa = LongDocQA(chat=chat).invoke({"documents": documents, "question": QUESTION_TEXT})
    print(f"LongDocQA:  {qa['answer']}")
    for evidence in qa["evidence"][:3]:
        meta = evidence.metadata
        print(f"  {Path(meta['source']).name} [{meta['start']}:{meta['end']}] {meta['quote']}")
    return answer, qa


if __name__ == "__main__":
    main()
