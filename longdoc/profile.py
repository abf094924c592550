"""Model profiles: the settings `longdoc tune` measured as best for one model, applied when it is loaded.

GemFilter's filter layer and scoring, and HOMER's calibration, depend on the model: the bundled
needle model answers wrong with the defaults and right with the tuned settings. A profile is
`longdoc.json` beside a local model (or in the user's cache directory for a hub id):

    {"model": ..., "longdoc": "0.1.0",
     "methods": {"gemfilter": {"options": {...}, "score": 0.92, "accuracy": 0.95, "grounded": 0.9, "needles": 4,
                               "samples": 16, "lengths": [2048], ...},
                 "homer": {"options": {"calibration": "longdoc-calibration.safetensors"}, ...}},
     "auto": {"within": "gemfilter"}}

A method named by string gets its profile's options under the caller's (explicit options win);
a Method object is used as given. The stats' notes say which settings came from the profile.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LongDocError

FILE_NAME = "longdoc.json"


def profile_path(model: str) -> Path:
    """longdoc.json beside a local model; for a hub id, in the user's cache directory (XDG_CACHE_HOME)."""
    if Path(model).is_dir():
        return Path(model) / FILE_NAME
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "longdoc" / "profiles" / model.replace("/", "--") / FILE_NAME


@dataclass
class Profile:
    path: Path
    data: dict

    def options(self, method: str) -> dict:
        """The profile's options for `method`; a calibration file name is taken relative to the profile."""
        options = dict(self.data.get("methods", {}).get(method, {}).get("options", {}))
        if method == "homer" and options.get("calibration") not in (None, "off"):
            options["calibration"] = str(self.path.parent / options["calibration"])
        return options

    def auto_within(self) -> str:
        return self.data.get("auto", {}).get("within", "gemfilter")

    def describe(self, method: str) -> str | None:
        """One line for the stats' notes: what the profile set for `method` and how it measured."""
        entry = self.data.get("methods", {}).get(method)
        if not entry:
            return None
        settings = ", ".join(f"{k}={v}" for k, v in entry.get("options", {}).items()) or "defaults"
        measured = ""
        if "grounded" in entry:  # tune's GemFilter entry: grounded = exact, with the needle as the strongest evidence
            measured = (
                f" (grounded answers {entry['grounded']:.2f}, exact {entry['accuracy']:.2f}, on"
                f" {entry.get('samples', '?')} haystacks of {entry.get('needles', '?')} needles)"
            )
        elif "accuracy" in entry:
            measured = f" (needle accuracy {entry['accuracy']:.2f} on {entry.get('samples', '?')} samples)"
        return f"profile {self.path}: {method} {settings}{measured}; explicit options win"


def load_profile(model: str) -> Profile | None:
    """The model's profile, or None when it has none; a damaged one is refused with one line."""
    path = profile_path(model)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data.get("methods", {}), dict):
            raise ValueError("methods is not an object")
    except (OSError, ValueError, AttributeError) as exc:
        raise LongDocError(f"cannot read the model profile {path} ({exc}); run longdoc tune again") from None
    return Profile(path, data)


def configure(method, options: dict, profile: Profile | None) -> tuple[dict, dict[str, str]]:
    """(options for parse_method, {method name: note}): the profile's options for a method named by string,
    under `options`."""
    if profile is None or not isinstance(method, str):
        return dict(options), {}
    if method == "auto":
        within = options.get("within", profile.auto_within())
        names = [within if isinstance(within, str) else within.name, "homer"]
        merged = {"within": within} if "within" not in options and within != "gemfilter" else {}
        for name in names:
            # Qualified (METHOD.KEY) and first: a plain explicit KEY given after it overrides it.
            merged.update({f"{name}.{key}": value for key, value in profile.options(name).items()})
        merged.update(options)
        notes = {name: profile.describe(name) for name in names}
        return merged, {name: note for name, note in notes.items() if note}
    note = profile.describe(method)
    return {**profile.options(method), **options}, {method: note} if note else {}


def write_profile(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
