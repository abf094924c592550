"""Load a causal LM and its tokenizer from a hub id or a local folder."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from .attention import NAME as ATTENTION
from .attention import register as register_attention
from .errors import LongDocError

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT = 1.5  # seconds for the one look at the hub before a model is downloaded

DTYPES = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LongDocError(f"device '{device}' was asked for but no CUDA GPU is visible; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise LongDocError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> bfloat16 on a GPU that supports it (float16 otherwise), float32 on CPU."""
    if dtype not in DTYPES:
        raise LongDocError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_attention(device: str, requested: str | None = None) -> str:
    """flash_attention_2 when flash-attn imports on a GPU, otherwise longdoc's mask-free SDPA (attention.py)."""
    if requested:
        return requested
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return ATTENTION


def load_model(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
):
    """Return (model, tokenizer) in eval mode. Weights load from safetensors only.

    The config and tokenizer load before the weights, so a folder without them fails in a moment.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .arch import check_supported

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source, local_only = resolve_source(name_or_path)
    files = dict(trust_remote_code=trust_remote_code, local_files_only=local_only)
    try:
        config = AutoConfig.from_pretrained(source, **files)
    except (OSError, ValueError) as exc:
        raise LongDocError(f"cannot read the config.json of '{name_or_path}': {_first_line(exc)}") from None
    check_supported(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **files)
    except (OSError, ValueError) as exc:  # ValueError: no tokenizer.json and nothing to convert from
        raise LongDocError(
            f"could not load a tokenizer for '{name_or_path}' ({type(exc).__name__}); longdoc needs a fast "
            "tokenizer: put the model's tokenizer.json and tokenizer_config.json beside its config.json"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise LongDocError(f"'{name_or_path}' has no fast tokenizer (tokenizer.json); longdoc needs one for offsets")
    attention = pick_attention(device, attn_implementation)
    if attention == ATTENTION:
        register_attention()
    multi_gpu = device == "cuda" and torch.cuda.device_count() > 1
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation=attention,
            use_safetensors=True,
            device_map="auto" if multi_gpu else None,
            **files,
        )
    except (OSError, SafetensorError) as exc:
        raise LongDocError(
            f"could not load the weights of '{name_or_path}': {_first_line(exc)}. longdoc loads safetensors "
            "weights only; pass a local folder that has them"
        ) from None
    if not multi_gpu:
        model.to(device)
    model.eval()
    log.info("loaded %s (%s, %s, %s attention)", name_or_path, device, torch_dtype, attention)
    return model, tokenizer


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
                f"'{name_or_path}' is not a model folder (no config.json in it); point --model at a Hugging Face "
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
        raise LongDocError(f"the Hugging Face hub refused '{repo_id}': {_first_line(exc)}") from None
    except Exception as exc:  # the HTTP client's connect, DNS and timeout errors: the hub cannot be reached
        _not_available(repo_id, f"cannot be reached ({type(exc).__name__})")


def _not_available(repo_id: str, hub_state: str) -> None:
    raise LongDocError(
        f"model '{repo_id}' is neither a local folder nor in the Hugging Face cache, and the hub {hub_state}; "
        f"download it once while online (hf download {repo_id}), or pass a local folder with config.json, tokenizer "
        "files and *.safetensors (for example --model ./models/Llama-3.1-8B-Instruct)"
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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
