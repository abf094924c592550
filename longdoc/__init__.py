"""longdoc: let a local LLM read a whole document by compressing the prefill (GemFilter, HOMER)."""

from .api import Answer, LongDoc, Stats
from .errors import LongDocError
from .evidence import Evidence
from .generate import GenerationConfig
from .methods import METHODS, FullConfig, GemFilterConfig

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Answer",
    "Evidence",
    "FullConfig",
    "GemFilterConfig",
    "GenerationConfig",
    "LongDoc",
    "LongDocError",
    "Stats",
    "__version__",
]
