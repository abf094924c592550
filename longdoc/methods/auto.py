"""The default method: one method for prompts that fit the model's trained window, another past it.

Full attention past the trained window gives garbage, and HOMER's merging loses detail a prompt that
fits does not need to lose. `Auto` holds both choices (GemFilter and HOMER unless a model profile or
the caller says otherwise) and the engine picks one per prompt by its length, before the prefill,
so stats, readings and evidence are the chosen method's own; the stats' notes say which and why.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..arch import Arch
from ..errors import LongDocError
from ..progress import ProgressHook, no_progress
from .base import Method, Prefill
from .gemfilter import GemFilter
from .homer import Homer


@dataclass(frozen=True)
class Auto(Method):
    """`within` for prompts that fit the trained window, `beyond` (which must read past it) for longer ones."""

    within: Method = GemFilter()
    beyond: Method = Homer()

    name = "auto"
    reads_past_window = True

    def __post_init__(self) -> None:
        for field_name in ("within", "beyond"):
            if isinstance(getattr(self, field_name), Auto):
                raise LongDocError(f"auto's {field_name} must be another method, not auto")
        if not self.beyond.reads_past_window:
            raise LongDocError(f"auto's beyond method '{self.beyond.name}' cannot read past the trained window")

    def pick(self, arch: Arch, tokens: int) -> Method:
        """The method for a prompt of `tokens` tokens (`within` when the model does not say its window)."""
        window = arch.trained_window
        return self.beyond if window and tokens > window else self.within

    def why(self, arch: Arch, tokens: int) -> str:
        chosen = self.pick(arch, tokens)
        window = arch.trained_window
        if not window:
            return f"auto: {chosen.name} (the model does not say its trained window)"
        relation = "exceed" if chosen is self.beyond else "fit"
        return f"auto: {chosen.name}, the prompt's {tokens} tokens {relation} the model's {window}-token window"

    def prefill(self, arch: Arch, layout, progress: ProgressHook = no_progress, reading=None) -> Prefill:
        """For callers outside the engine; the engine picks first (api.py), so readings are the chosen method's."""
        chosen = self.pick(arch, len(layout))
        prefill = chosen.prefill(arch, layout, progress, reading=reading)
        prefill.notes.insert(0, self.why(arch, len(layout)))
        return prefill

    def describe(self) -> str:
        return f"Auto(within={self.within.describe()}, beyond={self.beyond.describe()})"

    @classmethod
    def from_options(cls, options: dict, parse) -> Auto:
        """Options for auto go to its methods: `within`/`beyond` name them, `METHOD.KEY` sets one method's
        option, a plain KEY every one of the two that has it (so `--top-k` sets gemfilter's budget)."""
        options = dict(options)
        given = {"within": options.pop("within", "gemfilter"), "beyond": options.pop("beyond", "homer")}
        chosen = {role: parse(value) for role, value in given.items()}  # checks the names
        names = {role: method.name for role, method in chosen.items()}
        per_method: dict[str, dict] = {role: {} for role in names}
        for key, value in options.items():
            target, _, field_name = key.rpartition(".")
            roles = [role for role in names if names[role] == target] if target else list(names)
            used = [role for role in roles if field_name in {f.name for f in fields(chosen[role])}]
            if not used:
                raise LongDocError(
                    f"method 'auto' has no option {key}: neither {names['within']} nor {names['beyond']} has it"
                )
            for role in used:
                per_method[role][field_name] = value
        return cls(**{role: parse(given[role], per_method[role]) for role in names})
