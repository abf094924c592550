"""Method options from the command line, shared by `ask` and `bench`, and library words put into flags.

Values stay strings here: `longdoc.parse_method` converts each by its field's declared type, so
`-o offload=false` is False and `-o top_k=2.5` is refused with the option's name.
"""

from __future__ import annotations

import json
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
    (r"pass its password \(password=\.\.\.\)", "pass --password"),
    (r"\bsmaller window length\b", "smaller --length"),
    (r"\bpoint model at\b", "point --model at"),
    (r'\buse device "cpu"', "use --device cpu"),
    (r"\bgive device or device_map\b", "give --device or --device-map"),
    (r"\bdevice_map\b", "--device-map"),
    (r"\brunner '(\w+)'", r"--runner \1"),
    (r"\bworkers=(\d+)", r"--workers \1"),
    (r"\bgpus_per_worker=", "--gpus-per-worker "),
    (r"\bgpus_per_worker\b", "--gpus-per-worker"),
    (r"\bray_address\b", "--ray-address"),
    (r"\bretry_failed\b", "--retry-failed"),
    (r"\bworkers must\b", "--workers must"),
]


def in_flags(message: str) -> str:
    """A library error message with option names replaced by the CLI's flags."""
    for pattern, flag in IN_FLAGS:
        message = re.sub(pattern, flag, message)
    return message


def method_options(method: str, **values) -> dict:
    """Map --top-k / --filter-layer / --chunk-len / --prefill-chunk onto the method's own fields."""
    from dataclasses import fields

    from longdoc.methods import METHODS, Auto, method_class

    cls = method_class(method)
    chosen = [Auto().within, Auto().beyond] if cls is Auto else [cls]
    accepted = {f.name for kind in chosen for f in fields(kind)}  # auto passes options on to the methods it picks
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


def command_options(method: str, pairs: list[str] | None, **flags) -> dict:
    """A command's method options: its named flags (`method_options`) plus every `-o KEY=VALUE`."""
    options = method_options(method, **flags)
    options.update(parse_options(pairs or []))
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
    """Options for each method row: `-o KEY=VALUE` goes to every row whose method has KEY, `-o METHOD.KEY=VALUE`
    to the rows of that method (or that one row).

    A row is a method name, an alias (kivi-4) or NAME+KEY=VALUE (gemfilter+kv_bits=4), whose options it starts
    with. `top_k` (the shared budget) goes to each method's budget option (snapkv: keys per KV head).
    """
    from dataclasses import fields

    from longdoc.methods import method_class, split_label

    result: dict[str, dict] = {m: split_label(m)[1] for m in methods}
    classes = {m: method_class(split_label(m)[0]) for m in methods}
    if top_k is not None:
        for method in methods:
            if classes[method].budget_option:
                result[method][classes[method].budget_option] = top_k
    for key, value in parse_options(pairs).items():
        target, _, field_name = key.rpartition(".")
        rows = [m for m in methods if target in (m, split_label(m)[0], classes[m].name)] if target else methods
        if not rows:
            raise LongDocError(f"-o {key}: '{target}' is not among the methods benchmarked")
        used = False
        for method in rows:
            if field_name in {f.name for f in fields(classes[method])}:
                result[method][field_name] = value
                used = True
        if not used:
            raise LongDocError(f"-o {key}: no benchmarked method has an option '{field_name}'")
    return result


DEVICE_MAP_EXAMPLE = '\'{"model.embed_tokens": 0, "model.layers.0": 0, "": 1}\''


def parse_device_map(text: str | None) -> str | dict | None:
    """--device-map: "auto", "none" (None: the model on --device) or a JSON object of module name -> device."""
    if text is None or text.strip().lower() == "none":
        return None
    if text.strip() == "auto":
        return "auto"
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LongDocError(f"--device-map is not valid JSON ({exc.msg} at character {exc.pos})") from None
        if isinstance(mapping, dict):
            return mapping
    raise LongDocError(
        f"--device-map takes auto, none or a JSON object of module name -> device such as {DEVICE_MAP_EXAMPLE}; "
        f"got '{text}'"
    )
