"""Load a causal LM and its tokenizer from a hub id or a local folder."""

from __future__ import annotations

import importlib.util
import logging
import re

import torch
from safetensors import SafetensorError

from .attention import NAME as ATTENTION
from .attention import register as register_attention
from .errors import LongDocError
from .hub import first_line, resolve_source

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
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise LongDocError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LongDocError(f"device '{device}' was asked for but no CUDA GPU is visible; use device \"cpu\"")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise LongDocError(f"device '{device}' does not exist: {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """'auto' -> bfloat16 on a GPU that supports it (float16 otherwise), float32 on CPU; a torch.dtype as it is."""
    if isinstance(dtype, torch.dtype):
        return dtype
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
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    quantization_config=None,
):
    """Return (model, tokenizer) in eval mode. Weights load from safetensors only.

    The config and tokenizer load before the weights, so a folder without them fails in a moment.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source, local_only = resolve_source(name_or_path)  # before importing transformers: a missing model fails fast

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .arch import check_supported

    files = dict(trust_remote_code=trust_remote_code, local_files_only=local_only)
    try:
        config = AutoConfig.from_pretrained(source, **files)
    except (OSError, ValueError) as exc:
        raise LongDocError(f"cannot read the config.json of '{name_or_path}': {first_line(exc)}") from None
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
            device_map="auto" if multi_gpu else (device if quantization_config is not None else None),
            **({"quantization_config": quantization_config} if quantization_config is not None else {}),
            **files,
        )
    except (OSError, SafetensorError) as exc:
        raise LongDocError(
            f"could not load the weights of '{name_or_path}': {first_line(exc)}. longdoc loads safetensors "
            "weights only; pass a local folder that has them"
        ) from None
    if not multi_gpu and quantization_config is None:  # a quantized model is placed by from_pretrained
        model.to(device)
    model.eval()
    log.info("loaded %s (%s, %s, %s attention)", name_or_path, device, torch_dtype, attention)
    return model, tokenizer
