"""LlamaIndex, no retrieval: read a whole folder with SimpleDirectoryReader and ask about it.

    python examples/llama_index_query.py [FOLDER]

Without FOLDER, a folder with a needle in a held-out corpus book is written to a temp dir.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from llama_index.core import SimpleDirectoryReader
from longdoc.integrations.llama_index import LongDocLLM, LongDocQueryEngine

from longdoc import LongDoc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from needle_folder import DEMO_MODEL, QUESTION_TEXT, require_books, write_folder  # noqa: E402


def main(folder: Path | None = None) -> object:
    if folder is None:
        require_books()
    engine = LongDoc.from_pretrained(str(DEMO_MODEL), method="gemfilter", device="cpu")  # settings: its longdoc.json
    llm = LongDocLLM(engine=engine, model=str(DEMO_MODEL), max_new_tokens=32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = folder or write_folder(Path(tmp) / "docs", engine.tokenizer)
        documents = SimpleDirectoryReader(str(folder)).load_data()
        query_engine = LongDocQueryEngine.from_documents(documents, llm=llm)
        response = query_engine.query(QUESTION_TEXT)
    print(f"Q: {QUESTION_TEXT}\nA: {response.response}")
    for source in response.source_nodes[:3]:
        node = source.node
        where = f"{node.metadata['file_name']} [{node.start_char_idx}:{node.end_char_idx}]"
        print(f"  {where} score {source.score:.3f}: {node.metadata['quote']}")
    return response


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
