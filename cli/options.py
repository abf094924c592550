"""Method options from the command line, shared by `ask` and `bench`, and library words put into flags.

Values stay strings here: `longdoc.parse_method` converts each by its field's declared type, so
`-o offload=false` is False and `-o top_k=2.5` is refused with the option's name.
"""

from __future__ import annotations

import re

from longdoc.errors import LongDocError

# CLI flag -> the method fields it may set, first match wins.
METHOD_FLAGS = {
    "top_k": ("top_k", "keys_per_head"),
    "filter_layer": ("filter_layer",),
    "chunk_len": ("max_chunk_len",),
    "prefill_chunk": ("prefill_chunk",),
}

# Library words -> the flags a CLI user types (errors are written for Python users; the CLI translates).
IN_FLAGS = [
    (r"\bmethod Homer\(\)", "--method homer"),
    (r"\bmethod '(\w+)'", r"--method \1"),
    (r"\bset past_window=True", "pass -o past_window=true"),
    (r"\bmax_new_tokens\b", "--max-new-tokens"),
    (r"\btop_k\b", "--top-k"),
    (r"\bkeys_per_head\b", "--top-k"),
    (r"\bfilter_layer\b", "--filter-layer"),
    (r"\bmax_chunk_len\b", "--chunk-len"),
    (r"\bprefill_chunk\b", "--prefill-chunk"),
]


def in_flags(message: str) -> str:
    """A library error message with option names replaced by the CLI's flags."""
    for pattern, flag in IN_FLAGS:
        message = re.sub(pattern, flag, message)
    return message


def method_options(method: str, **values) -> dict:
    """Map --top-k / --filter-layer / --chunk-len / --prefill-chunk onto the method's own fields."""
    from dataclasses import fields

    from longdoc.methods import METHODS, Auto

    if method not in METHODS:
        raise LongDocError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    chosen = [Auto().within, Auto().beyond] if METHODS[method] is Auto else [METHODS[method]]
    accepted = {f.name for cls in chosen for f in fields(cls)}  # auto passes options on to the methods it picks
    options = {}
    for option, value in values.items():
        if value is None:
            continue
        target = next((name for name in METHOD_FLAGS[option] if name in accepted), None)
        if target is None:
            users = [m for m, cls in METHODS.items() if {f.name for f in fields(cls)} & set(METHOD_FLAGS[option])]
            raise LongDocError(f"--{option.replace('_', '-')} applies to {', '.join(users)}, not to '{method}'")
        options[target] = value
    return options


def parse_options(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE strings -> {KEY: VALUE}; the method converts the values by type."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LongDocError(f"--option takes KEY=VALUE, got '{pair}'")
        options[key.strip()] = value
    return options


def per_method_options(methods: list[str], pairs: list[str], top_k: int | None = None) -> dict[str, dict]:
    """Options for each method: `-o KEY=VALUE` goes to every method that has KEY, `-o METHOD.KEY=VALUE` to one.

    `top_k` (the shared budget) goes to each method's budget option (snapkv: keys per KV head).
    """
    from dataclasses import fields

    from longdoc.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LongDocError(f"unknown method '{unknown[0]}'; choose from: {', '.join(METHODS)}")
    result: dict[str, dict] = {m: {} for m in methods}
    if top_k is not None:
        for method in methods:
            if METHODS[method].budget_option:
                result[method][METHODS[method].budget_option] = top_k
    for key, value in parse_options(pairs).items():
        target, _, field_name = key.rpartition(".")
        used = False
        for method in [target] if target else methods:
            if method not in result:
                raise LongDocError(f"-o {key}: '{method}' is not among the methods benchmarked")
            if field_name in {f.name for f in fields(METHODS[method])}:
                result[method][field_name] = value
                used = True
        if not used:
            raise LongDocError(f"-o {key}: no benchmarked method has an option '{field_name}'")
    return result
