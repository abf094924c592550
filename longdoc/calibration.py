"""HOMER's positional calibration: the mean last-token attention logit per layer and distance.

RoPE models give nearby tokens higher logits whatever they say. HOMER prunes by the last token's
logits, so it would keep recent tokens for their position alone. Measuring the mean score
(max over heads of q.k/sqrt(d), as HOMER scores) at each layer and distance on plain text, and
subtracting it, leaves what the token's content adds. The reference ships such bias files
without the code that makes them; `longdoc calibrate` makes them for any model.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import torch

from .arch import Arch
from .cache import KVCache
from .errors import LongDocError
from .progress import ProgressHook, no_progress
from .scores import last_token_logits

FILE_NAME = "longdoc-calibration.safetensors"


@torch.inference_mode()
def measure(arch: Arch, windows: list[list[int]], progress: ProgressHook = no_progress) -> torch.Tensor:
    """Mean score per (layer, distance) over token windows of equal length: (layers, length) float32."""
    length = len(windows[0])
    total = torch.zeros(arch.num_layers, length, device=arch.device)
    for done, ids in enumerate(windows, start=1):
        input_ids = torch.tensor([ids], device=arch.device)
        hidden = arch.embed(input_ids)
        position_embeddings = arch.rotary(hidden, torch.arange(length, device=arch.device)[None])
        cos, sin = position_embeddings
        cache = KVCache(arch.num_layers)
        queries = []  # each layer's last-token query, taken from its input by the forward pass's tap
        rows = (cos[:, -1:], sin[:, -1:])
        tap = partial(_last_query, arch, queries, rows)
        arch.forward(hidden, position_embeddings, cache, tap=tap)
        for i, query in enumerate(queries):
            scores = last_token_logits(query, cache.layer(i)[0])  # on layer i's device
            total[i] += scores.flip(0).to(total.device)  # index = distance from the last token
        progress("calibrate", done, len(windows))
    return (total / len(windows)).cpu()


def _last_query(arch: Arch, queries: list, rows, layer: int, layer_input: torch.Tensor) -> None:
    queries.append(arch.queries(layer, layer_input[:, -1:], rows))


def text_windows(tokenizer, texts: list[str], length: int, samples: int, seed: int = 0) -> list[list[int]]:
    """`samples` windows of `length` tokens from the texts (BOS first when the tokenizer has one)."""
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    need = length - len(bos)
    encoded = (tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] for t in texts)
    pools = [ids for ids in encoded if len(ids) >= need]
    if not pools:
        raise LongDocError(f"no text has {need} tokens; give a longer text or a smaller window length")
    windows = []
    for _ in range(samples):
        ids = rng.choice(pools)
        start = rng.randrange(0, len(ids) - need + 1)
        windows.append(bos + ids[start : start + need])
    return windows


def save(path: Path, bias: torch.Tensor, source: str, samples: int) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"bias": bias.contiguous()}, str(path), metadata={"source": source, "samples": str(samples)})
    return path


def load(path: Path, num_layers: int) -> torch.Tensor:
    """The (layers, distances) bias, checked against the model."""
    from safetensors.torch import load_file

    try:
        bias = load_file(str(path))["bias"]
    except Exception as exc:  # a damaged or foreign file
        raise LongDocError(
            f"cannot read the calibration file {path} ({type(exc).__name__}); run longdoc calibrate"
        ) from None
    if bias.ndim != 2 or bias.shape[0] != num_layers:
        raise LongDocError(
            f"{path} holds a bias for {bias.shape[0]} layers, this model has {num_layers}; run longdoc calibrate again"
        )
    return bias


def find(arch: Arch, explicit: str | None) -> Path | None:
    """The calibration file to use: the one given, else longdoc-calibration.safetensors in the model's folder."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise LongDocError(f"calibration file not found: {explicit}")
        return path
    folder = Path(str(getattr(arch.config, "_name_or_path", "")))
    candidate = folder / FILE_NAME
    return candidate if folder.is_dir() and candidate.is_file() else None
