"""The one place that knows model families.

Every prefill method drives the model's own modules through `Arch`: the embeddings, the
decoder layers (called as modules, with their own attention implementation), the rotary
embedding, the final norm and the LM head. Scoring needs the queries and keys exactly as the
attention sees them (after projections, q/k norms and RoPE); `queries_and_keys` rebuilds them
per family from the layer's own weights and its module's `apply_rotary_pos_emb`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .attention import NAME as ATTENTION
from .errors import LongDocError

# model_type -> how the attention projects queries and keys.
#   "separate": q_proj / k_proj (Llama 2/3.x, Mistral, Qwen2)
#   "qk_norm":  q_proj / k_proj followed by per-head RMSNorm (Qwen3)
#   "fused":    one qkv_proj, queries first (Phi-3 / Phi-3.5)
FAMILIES: dict[str, str] = {
    "llama": "separate",
    "mistral": "separate",
    "qwen2": "separate",
    "qwen3": "qk_norm",
    "phi3": "fused",
}

FAMILY_NAMES = {
    "llama": "Llama (2, 3, 3.1, 3.2, 3.3)",
    "mistral": "Mistral (v0.2+, Nemo)",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3 (dense)",
    "phi3": "Phi-3 / Phi-3.5",
}


def check_supported(config) -> str:
    """Return the family's projection style, or fail early with the list of supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(FAMILY_NAMES.values())
        raise LongDocError(
            f"model type '{model_type}' is not supported; longdoc supports {supported}. "
            "Gemma 2/3 (sliding-window and soft-capped attention) are not supported yet."
        )
    return FAMILIES[model_type]


@dataclass
class Arch:
    """A loaded causal LM seen through the parts the prefill methods need."""

    model: nn.Module

    def __post_init__(self) -> None:
        self.config = self.model.config
        self.style = check_supported(self.config)
        self.decoder = self.model.model
        self.layers = self.decoder.layers
        first_attn = self.layers[0].self_attn
        self._apply_rope = sys.modules[type(first_attn).__module__].apply_rotary_pos_emb
        self.num_layers = len(self.layers)
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = getattr(self.config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = first_attn.head_dim
        self.attn_implementation = getattr(self.config, "_attn_implementation", None) or "eager"

    # ----- facts about the model -----
    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    @property
    def trained_window(self) -> int:
        """Positions the model was trained (or rope-scaled) for: `max_position_embeddings`."""
        return int(getattr(self.config, "max_position_embeddings", 0) or 0)

    @property
    def sliding_window(self) -> int | None:
        """The attention span when the config slides its window, else None."""
        window = getattr(self.config, "sliding_window", None)
        if window is None or getattr(self.config, "use_sliding_window", True) is False:
            return None
        return int(window)

    def check_span(self, length: int) -> None:
        """Refuse a full-attention pass longer than a sliding window: it would not match the model."""
        window = self.sliding_window
        if window is not None and length > window:
            raise LongDocError(
                f"this model uses sliding-window attention ({window} tokens) and longdoc drives full causal "
                f"attention; a {length}-token pass would not match the model. Use a model without a sliding "
                "window (for example Mistral v0.2+), or a shorter input."
            )

    # ----- the model's own modules -----
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.rotary_emb(hidden, position_ids)

    def attention_mask(self, q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device):
        """The mask for `q_len` new queries after `kv_len - q_len` cached keys.

        None where the attention implementation's own causal flag is right (SDPA and flash with no
        history; a single query). Otherwise an additive (1, 1, q, kv) mask: 0 where allowed.
        """
        past = kv_len - q_len
        if q_len == 1:
            return None
        if self.attn_implementation.startswith("flash") or self.attn_implementation == ATTENTION:
            return None  # flash-attn and longdoc_sdpa align causality bottom-right, which is right with a cache
        if past == 0 and self.attn_implementation == "sdpa":
            return None
        q_pos = torch.arange(q_len, device=device)[:, None] + past
        kv_pos = torch.arange(kv_len, device=device)[None, :]
        mask = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
        mask.masked_fill_(kv_pos > q_pos, torch.finfo(dtype).min)
        return mask[None, None]

    def run_layer(self, index: int, hidden, position_embeddings, cache=None, mask=None) -> torch.Tensor:
        out = self.layers[index](
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return out[0] if isinstance(out, tuple) else out

    def forward(
        self,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache=None,
        layers: range | None = None,
        tap: Callable[[int, torch.Tensor], None] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run decoder `layers` (all by default) over `hidden` (1, q, d), the one loop every pass goes through.

        The new rows attend to what `cache` already holds at each layer, causally. `tap(i, layer_input)` is
        called before layer i runs, for passes that need a layer's queries (SnapKV, HOMER, calibration).
        `mask` replaces the causal one (graph decoding hides a static buffer's unwritten slots with it).
        """
        layers = range(self.num_layers) if layers is None else layers
        if mask is None:
            past = cache.seq_length(layers[0]) if cache is not None else 0
            q_len = hidden.shape[1]
            mask = self.attention_mask(q_len, past + q_len, hidden.dtype, hidden.device)
        for i in layers:
            if tap is not None:
                tap(i, hidden)
            hidden = self.run_layer(i, hidden, position_embeddings, cache, mask)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the last row, (1, vocab): final norm and LM head on that row only."""
        return self.logits(self.final_norm(hidden[:, -1:]))[:, -1]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits in float32 for the given (already normed) hidden states."""
        return self.model.lm_head(hidden).float()

    # ----- queries and keys as the attention sees them -----
    def _project(self, index: int, x: torch.Tensor, part: str) -> torch.Tensor:
        """q or k projection of normed input x, as (batch, heads, rows, head_dim), q/k norm applied."""
        attn = self.layers[index].self_attn
        d = self.head_dim
        if self.style == "fused":
            q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
            rows = slice(0, q_size) if part == "q" else slice(q_size, q_size + kv_size)
            bias = attn.qkv_proj.bias
            out = nn.functional.linear(x, attn.qkv_proj.weight[rows], None if bias is None else bias[rows])
        else:
            out = (attn.q_proj if part == "q" else attn.k_proj)(x)
        out = out.view(*x.shape[:-1], -1, d)
        if self.style == "qk_norm":
            out = (attn.q_norm if part == "q" else attn.k_norm)(out)
        return out.transpose(1, 2)

    def queries(self, index: int, layer_input: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Queries of decoder layer `index` for the given rows of its input, after norms and RoPE.

        `layer_input` is the hidden state entering the layer (before its input norm) and
        `position_embeddings` the (cos, sin) of the same rows.
        """
        q = self._project(index, self.layers[index].input_layernorm(layer_input), "q")
        cos, sin = position_embeddings
        # apply_rotary_pos_emb rotates a pair; the unused member is a one-head slice to save work.
        return self._apply_rope(q, q[:, :1], cos, sin)[0]

    def keys(self, index: int, layer_input: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Keys of decoder layer `index` for every row of its input, after norms and RoPE."""
        k = self._project(index, self.layers[index].input_layernorm(layer_input), "k")
        cos, sin = position_embeddings
        return self._apply_rope(k[:, :1], k, cos, sin)[1]
