"""longdoc: let a local LLM read a whole document by compressing the prefill (GemFilter, HOMER).

    from longdoc import LongDoc, GemFilter
    doc = LongDoc.from_pretrained("meta-llama/Llama-3.1-8B-Instruct", method=GemFilter(top_k=1024))
    reading = doc.read("contract.pdf")       # once
    reading.ask("When can either party terminate?")

Names load on first use (PEP 562), so `import longdoc` and the CLI's --help stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "LongDoc": "api",
    "Reading": "api",
    "Answer": "api",
    "AnswerStream": "api",
    "Stats": "api",
    "LongDocError": "errors",
    "Evidence": "evidence",
    "Document": "documents",
    "GenerationConfig": "generate",
    "METHODS": "methods",
    "Method": "methods",
    "Auto": "methods",
    "Full": "methods",
    "GemFilter": "methods",
    "Homer": "methods",
    "SnapKV": "methods",
    "Streaming": "methods",
    "Rag": "methods",
    "H2O": "methods",
    "Lingua": "methods",
    "parse_method": "methods",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'longdoc' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
