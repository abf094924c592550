"""Load a causal LM and its tokenizer from a hub id or a local folder."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from .attention import NAME as ATTENTION
from .errors import LongDocError

log = logging.getLogger(__name__)

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
    """Return (model, tokenizer) in eval mode. Weights load from safetensors only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .arch import check_supported

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    local = Path(name_or_path).expanduser()
    source = str(local) if local.exists() else name_or_path
    if local.exists() and not (local / "config.json").exists():
        raise LongDocError(
            f"'{name_or_path}' is a folder without config.json; point --model at a Hugging Face model folder"
        )
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LongDocError(
            f"model '{name_or_path}' is neither a local folder nor available from the Hugging Face cache or hub "
            f"({type(exc).__name__}); download it once, or pass a local folder with config.json, tokenizer files "
            "and *.safetensors (for example --model ./models/Llama-3.1-8B-Instruct)"
        ) from None
    check_supported(config)
    attention = pick_attention(device, attn_implementation)
    multi_gpu = device == "cuda" and torch.cuda.device_count() > 1
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation=attention,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            device_map="auto" if multi_gpu else None,
        )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise LongDocError(
            f"could not load weights or tokenizer of '{name_or_path}': {exc}. longdoc loads safetensors weights "
            "only; pass a local folder that has them"
        ) from None
    if not multi_gpu:
        model.to(device)
    if not getattr(tokenizer, "is_fast", False):
        raise LongDocError(f"'{name_or_path}' has no fast tokenizer (tokenizer.json); longdoc needs one for offsets")
    model.eval()
    log.info("loaded %s (%s, %s, %s attention)", name_or_path, device, torch_dtype, attention)
    return model, tokenizer
