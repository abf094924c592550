"""Load a causal LM and its tokenizer from a hub id or a local folder, on one device or spread over several.

A model whose weights do not fit one GPU is spread by accelerate (`device_map`): "auto" balances the decoder
layers over the visible GPUs (then host memory), a dict places each module by name. `arch.py` reads where
each layer landed and every method follows it.
"""

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


FIT_FRACTION = 0.9  # weights up to this share of a GPU's memory go on it whole; beyond, device_map "auto"


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


def check_device_map(device_map) -> str | dict[str, int | str] | None:
    """None, "auto", or a dict of module name -> device checked and written as accelerate takes it (a GPU's
    number, or "cpu"); anything else is refused in one line."""
    if device_map is None or device_map == "auto":
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise LongDocError(
            f'device_map takes "auto", a dict of module name -> device (such as {{"model.layers.40": 1}}) '
            f"or None, got {device_map!r}"
        )
    checked: dict[str, int | str] = {}
    for name, device in device_map.items():
        if not isinstance(name, str):
            raise LongDocError(f'device_map keys are module names (such as "model.layers.0"), got {name!r}')
        checked[name] = map_device(name, device)
    return checked


def map_device(name: str, device) -> int | str:
    """One device_map value as accelerate takes it: a visible GPU's number, or "cpu" (host memory)."""
    if isinstance(device, torch.device):
        device = str(device)
    if isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise LongDocError(f"device_map puts '{name}' on GPU {device}; GPU numbers start at 0")
        device = f"cuda:{device}"
    if device == "disk":
        raise LongDocError(
            f"device_map puts '{name}' on disk; longdoc does not offload to disk: put it on \"cpu\" (host memory)"
        )
    if not isinstance(device, str):
        raise LongDocError(f'device_map puts \'{name}\' on {device!r}; use a GPU number, "cuda:N" or "cpu"')
    try:
        resolved = resolve_device(device)
    except LongDocError as exc:
        raise LongDocError(f"device_map puts '{name}' on a device that cannot be used: {exc}") from None
    if resolved == "cpu":
        return "cpu"
    return int(resolved[5:]) if resolved.startswith("cuda:") else torch.cuda.current_device()


def uses_gpu(device_map: str | dict) -> bool:
    """Whether a checked device_map computes on a GPU ("cpu" entries of a map with GPUs run there too)."""
    if device_map == "auto":
        return torch.cuda.is_available()
    return any(isinstance(device, int) for device in device_map.values())


def empty_model(config, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model built from its config on the meta device: its modules and weight shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def weight_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """The bytes the model's weights take in `dtype` (a weight tied to another counts once)."""
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def check_covered(device_map: dict, model: torch.nn.Module) -> None:
    """Refuse a dict that leaves weights unplaced (transformers would put them in host memory unasked)."""

    def placed(name: str) -> bool:
        return any(key == "" or name == key or name.startswith(key + ".") for key in device_map)

    missing = sorted({name.rsplit(".", 1)[0] for name, _ in model.named_parameters() if not placed(name)})
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise LongDocError(
            f"device_map places no device for {shown}; name every module (as model.hf_device_map lists them), "
            'or give "" a device for the rest'
        )


def pick_attention(device: str, requested: str | None = None) -> str:
    """flash_attention_2 when flash-attn imports on a GPU, otherwise longdoc's mask-free SDPA (attention.py)."""
    if requested:
        return requested
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return ATTENTION


def quiet_transformers() -> None:
    """No transformers warnings or weight-loading bars among longdoc's own lines (the CLI, batch workers).
    Through its own API: importing transformers sets its loggers' level, so a level set before would be lost."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(
    name_or_path: str,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    quantization_config=None,
    device_map: str | dict | None = None,
):
    """Return (model, tokenizer) in eval mode. Weights load from safetensors only.

    `device_map` ("auto" or a dict of module name -> device) spreads the model over several devices; None puts
    it on `device`, and with device "auto" or "cuda" on one GPU when its weights fit it, else as "auto" does.
    The config and tokenizer load before the weights, so a folder without them fails in a moment.
    """
    device_map = check_device_map(device_map)
    if device_map is not None and device != "auto":
        raise LongDocError(
            f"give device or device_map, not both: device_map places the model itself (got device '{device}')"
        )
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise LongDocError("device_map needs accelerate: pip install accelerate")
    asked = device
    device = resolve_device(device) if device_map is None else ("cuda" if uses_gpu(device_map) else "cpu")
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
    if isinstance(device_map, dict):
        check_covered(device_map, empty_model(config, trust_remote_code))
    if device_map is None and quantization_config is None and asked in ("auto", "cuda") and device == "cuda":
        device_map = spread_if_too_large(config, torch_dtype, trust_remote_code)
    placement = device_map if device_map is not None else (device if quantization_config is not None else None)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation=attention,
            use_safetensors=True,
            device_map=placement,
            **({"quantization_config": quantization_config} if quantization_config is not None else {}),
            **files,
        )
    except (OSError, SafetensorError) as exc:
        raise LongDocError(
            f"could not load the weights of '{name_or_path}': {first_line(exc)}. longdoc loads safetensors "
            "weights only; pass a local folder that has them"
        ) from None
    except ValueError as exc:
        if device_map is None:
            raise
        raise LongDocError(f"device_map {device_map!r} was refused: {first_line(exc)}") from None
    if placement is None:  # a quantized or mapped model is placed by from_pretrained
        model.to(device)
    model.eval()
    where = f"device_map {getattr(model, 'hf_device_map', device_map)}" if device_map is not None else device
    log.info("loaded %s (%s, %s, %s attention)", name_or_path, where, torch_dtype, attention)
    return model, tokenizer


def spread_if_too_large(config, dtype: torch.dtype, trust_remote_code: bool) -> str | None:
    """device_map "auto" (said in the log) when the weights take more than FIT_FRACTION of the GPU, else None."""
    need = weight_bytes(empty_model(config, trust_remote_code), dtype)
    room = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if need <= FIT_FRACTION * room:
        return None
    if importlib.util.find_spec("accelerate") is None:
        raise LongDocError(
            f"the weights ({need / 2**30:.1f} GiB) do not fit one GPU ({room / 2**30:.1f} GiB); spreading them "
            "needs accelerate: pip install accelerate"
        )
    log.warning(
        "the weights (%.1f GiB) do not fit one GPU (%.1f GiB): spreading them with device_map 'auto' over %d GPU(s)%s",
        need / 2**30, room / 2**30, torch.cuda.device_count(),
        " and host memory" if torch.cuda.device_count() == 1 else "",
    )  # fmt: skip
    return "auto"
