"""Prefill methods: one frozen dataclass each (`Auto`, `Full`, `GemFilter`, `Homer`, `SnapKV`, `Streaming`, `Rag`,
`H2O`, `Lingua`).

In Python a method is an object: `GemFilter(top_k=1024)`. At the edges (CLI, framework integrations,
benchmarks) a name and string options become one through `parse_method`, which converts each value
by the field's declared type. The registry holds each name once.
"""

from __future__ import annotations

import types
import typing
import warnings
from dataclasses import fields

from ..errors import LongDocError
from ..quantized import check_bits
from .auto import Auto
from .base import Method, Prefill
from .full import Full
from .gemfilter import GemFilter
from .h2o import H2O
from .homer import Homer
from .lingua import Lingua
from .rag import Rag
from .snapkv import SnapKV
from .streaming import Streaming

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        Auto,
        Full,
        GemFilter,
        Homer,
        # Peer baselines, on the same engine so comparisons are like for like.
        SnapKV,
        Streaming,
        Rag,
        H2O,
        Lingua,
    )
}

# Names the benchmark paper gives to a method with settings; each means exactly this.
ALIASES: dict[str, tuple[str, dict]] = {
    "kivi-4": ("full", {"kv_bits": 4}),  # KIVI: the full prefill, its cache quantized to 4 bits
    "kivi-2": ("full", {"kv_bits": 2}),
}

# Old option names, accepted with a warning for one release (0.2): one word, one meaning.
RENAMED = {
    "chunk_size": "prefill_chunk",  # every method: tokens per forward chunk (HOMER's chunks are max_chunk_len)
}
RENAMED_IN = {"snapkv": {"top_k": "keys_per_head"}}  # snapkv's budget is per KV head and layer
TRUE, FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def parse_method(name: str | Method, options: dict | None = None) -> Method:
    """A method from its name and options; string values are converted by each field's declared type.

    Booleans take true/false/yes/no/1/0, integers refuse "2.5" and "1e3", optional fields take "none".
    A Method object is returned as it is (options then must be empty).
    """
    options = dict(options or {})
    if isinstance(name, Method):
        if options:
            raise LongDocError(f"options {', '.join(sorted(options))} given beside a {type(name).__name__} object")
        check_bits(name.kv_bits)
        return name
    if name in ALIASES:
        name, preset = ALIASES[name]
        clash = {key: value for key, value in options.items() if key in preset}
        if clash:
            raise LongDocError(f"{', '.join(clash)} is set by the method's name; use '{name}' to choose it")
        options = {**preset, **options}
    cls = method_class(name)
    if cls is Auto:  # its options belong to the two methods it chooses between
        return Auto.from_options(options, parse_method)
    renamed = {**RENAMED, **RENAMED_IN.get(name, {})}
    types_by_field = typing.get_type_hints(cls)
    accepted = [f.name for f in fields(cls)]
    values = {}
    for key, value in options.items():
        if key in renamed and renamed[key] in accepted:
            warnings.warn(
                f"{name} option '{key}' is now '{renamed[key]}'; the old name goes in 0.2", DeprecationWarning, 2
            )
            key = renamed[key]
        if key not in accepted:
            raise LongDocError(f"method '{name}' has no option {key}; its options are: {', '.join(sorted(accepted))}")
        values[key] = convert(key, value, types_by_field[key])
    check_bits(values.get("kv_bits"))
    return cls(**values)


def method_class(name: str) -> type[Method]:
    """The class behind a method name or alias."""
    if name in ALIASES:
        name = ALIASES[name][0]
    if name not in METHODS:
        raise LongDocError(f"unknown method '{name}'; choose one of: {', '.join([*METHODS, *ALIASES])}")
    return METHODS[name]


def split_label(label: str) -> tuple[str, dict[str, str]]:
    """A benchmark row 'NAME' or 'NAME+KEY=VALUE+...' (e.g. 'gemfilter+kv_bits=4') -> (name, options)."""
    name, *pairs = label.split("+")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LongDocError(f"a method row takes NAME+KEY=VALUE, got '{label}'")
        options[key] = value
    return name, options


def convert(key: str, value, annotation):
    """`value` as the field's type; strings (from a command line or a config) are parsed."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = typing.get_args(annotation) if union else (annotation,)
    optional = type(None) in kinds
    kind = next(k for k in kinds if k is not type(None))
    if value is None or (optional and isinstance(value, str) and value.strip().lower() == "none"):
        if optional:
            return None
        raise LongDocError(f"{key} cannot be none; give a {kind.__name__}")
    if isinstance(value, str):
        text = value.strip()
        if kind is bool:
            if text.lower() in TRUE | FALSE:
                return text.lower() in TRUE
            raise LongDocError(f"{key} takes true or false, got '{value}'")
        if kind is int:
            try:
                return int(text)
            except ValueError:
                raise LongDocError(f"{key} takes a whole number, got '{value}'") from None
        if kind is float:
            try:
                return float(text)
            except ValueError:
                raise LongDocError(f"{key} takes a number, got '{value}'") from None
        return text
    if kind is bool and not isinstance(value, bool):
        raise LongDocError(f"{key} takes true or false, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise LongDocError(f"{key} takes a whole number, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise LongDocError(f"{key} takes a number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise LongDocError(f"{key} takes text, got {value!r}")
    return value


__all__ = [
    "METHODS",
    "ALIASES",
    "Auto",
    "Full",
    "GemFilter",
    "H2O",
    "Homer",
    "Lingua",
    "Method",
    "Prefill",
    "Rag",
    "SnapKV",
    "Streaming",
    "convert",
    "method_class",
    "parse_method",
    "split_label",
]
