"""Where a model comes from: a local folder, the Hugging Face cache, or the hub after one quick look.

No torch or transformers here, so the CLI can tell a missing or unreachable model in a moment, before the
seconds those imports take.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from .errors import LongDocError

HUB_PROBE_TIMEOUT = 1.5  # seconds for the one look at the hub before a model is downloaded


def resolve_source(name_or_path: str) -> tuple[str, bool]:
    """(what `from_pretrained` loads, whether it may read local files only).

    A hub id held in the Hugging Face cache loads from there without touching the network. One that is not
    gets one quick look at the hub first: without a network the hub client retries for about 23 s before
    it gives up, and the user should hear at once that the model has to be downloaded or given as a folder.
    """
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise LongDocError(
                f"'{name_or_path}' is not a model folder (no config.json in it); point model at a Hugging Face "
                "model folder or hub id"
            )
        return str(local), True
    if not _is_hub_id(name_or_path):
        raise LongDocError(f"model '{name_or_path}' is neither a local folder nor a Hugging Face hub id (org/name)")
    if _in_hub_cache(name_or_path):
        return name_or_path, True
    if hub_offline():
        _not_available(name_or_path, "is switched off (HF_HUB_OFFLINE)")
    check_hub(name_or_path)
    return name_or_path, False


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (the hub client reads them once, at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.is_offline_mode() or any(flag.upper() in constants.ENV_VARS_TRUE_VALUES for flag in flags)


@lru_cache  # a success holds for the process: the CLI's early check and the load then ask once
def check_hub(repo_id: str, timeout: float = HUB_PROBE_TIMEOUT) -> None:
    """One request for the repo's config.json, no retries: reachable and allowed, or a LongDocError now."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=timeout, retry_on_errors=False)
    except GatedRepoError:
        raise LongDocError(
            f"'{repo_id}' is gated on the Hugging Face hub: accept its license on its page, log in (hf auth login) "
            "and run again, or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise LongDocError(
            f"no model '{repo_id}' on the Hugging Face hub (or it is private and you are not logged in); check the "
            "id, or pass a local folder"
        ) from None
    except HfHubHTTPError as exc:
        raise LongDocError(f"the Hugging Face hub refused '{repo_id}': {first_line(exc)}") from None
    except Exception as exc:  # the HTTP client's connect, DNS and timeout errors: the hub cannot be reached
        _not_available(repo_id, f"cannot be reached ({type(exc).__name__})")


def _not_available(repo_id: str, hub_state: str) -> None:
    raise LongDocError(
        f"model '{repo_id}' is neither a local folder nor in the Hugging Face cache, and the hub {hub_state}; "
        f"download it once while online (hf download {repo_id}), or pass a local folder with config.json, tokenizer "
        "files and *.safetensors (for example ./models/Llama-3.1-8B-Instruct)"
    )


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _in_hub_cache(repo_id: str) -> bool:
    """The config, the tokenizer and the weights (one file or the shard index) are in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)

    weights = cached("model.safetensors") or cached("model.safetensors.index.json")
    return cached("config.json") and cached("tokenizer.json") and weights


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
