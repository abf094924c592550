"""Method options from the command line, shared by `ask` and `bench`."""

from __future__ import annotations

from longdoc import LongDocError

# CLI option -> the method config fields it sets, first match wins.
METHOD_OPTIONS = {
    "top_k": ("top_k",),
    "filter_layer": ("filter_layer",),
    "chunk_len": ("max_chunk_len", "chunk_size"),
}


def method_options(method: str, **values) -> dict:
    """Map --top-k / --filter-layer / --chunk-len onto the method's own config fields."""
    from dataclasses import fields

    from longdoc.methods import METHODS

    if method not in METHODS:
        raise LongDocError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    accepted = {f.name for f in fields(METHODS[method])}
    options = {}
    for option, value in values.items():
        if value is None:
            continue
        target = next((name for name in METHOD_OPTIONS[option] if name in accepted), None)
        if target is None:
            users = [m for m, cls in METHODS.items() if {f.name for f in fields(cls)} & set(METHOD_OPTIONS[option])]
            raise LongDocError(f"--{option.replace('_', '-')} applies to {', '.join(users)}, not to '{method}'")
        options[target] = value
    return options


def parse_options(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> options; integers and floats are converted, anything else stays text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LongDocError(f"--option takes KEY=VALUE, got '{pair}'")
        for convert in (int, float):
            try:
                options[key.strip()] = convert(value)
                break
            except ValueError:
                continue
        else:
            options[key.strip()] = value
    return options


def per_method_options(methods: list[str], pairs: list[str], **common) -> dict[str, dict]:
    """Options for each method: `-o KEY=VALUE` goes to every method that has KEY, `-o METHOD.KEY=VALUE` to one.

    `common` (such as top_k) likewise goes to every method that has the field.
    """
    from dataclasses import fields

    from longdoc.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LongDocError(f"unknown method '{unknown[0]}'; choose from: {', '.join(METHODS)}")
    parsed = parse_options(pairs)
    result: dict[str, dict] = {m: {} for m in methods}
    used = set()
    for key, value in {**{k: v for k, v in common.items() if v is not None}, **parsed}.items():
        target, _, field_name = key.rpartition(".")
        for method in [target] if target else methods:
            if method not in result:
                raise LongDocError(f"-o {key}: '{method}' is not among the methods benchmarked")
            if field_name in {f.name for f in fields(METHODS[method])}:
                result[method][field_name] = value
                used.add(key)
        if key in parsed and key not in used:
            raise LongDocError(f"-o {key}: no benchmarked method has an option '{field_name}'")
    return result
