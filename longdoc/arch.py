"""The one place that knows model families.

Every prefill method drives the model's own modules through `Arch`: the embeddings, the
decoder layers (called as modules, with their own attention implementation), the rotary
embedding, the final norm and the LM head. Scoring needs the queries and keys exactly as the
attention sees them (after projections, q/k norms and RoPE); `queries_and_keys` rebuilds them
per family from the layer's own weights and its module's `apply_rotary_pos_emb`.

A model too large for one GPU is placed by accelerate (`device_map`): each decoder layer runs on its own
device. `Arch` reads where each module runs once, at load (`module_device`), and `forward` moves the hidden
states to each layer's device as it goes, and the position embeddings and mask once per device and pass, so
a layer's keys and values are made, and cached, on that layer's device.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

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


def as_device(device: torch.device | str | int) -> torch.device:
    """A torch.device with its index: accelerate names GPUs by number, and "cuda" means the current one."""
    if isinstance(device, int):
        return torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def module_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device when it has one (the weights of a module
    offloaded to host memory are meta tensors there, brought over at each call), else its first weight's."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        device = getattr(one, "execution_device", None)
        if device is not None:
            return as_device(device)
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def check_hooks(layer: nn.Module) -> None:
    """Refuse a layer whose accelerate hook would move the cache argument: it would hand the attention a copy of
    longdoc's cache at every call, and what the layer appends would be lost (transformers' own dispatch skips it)."""
    hook = getattr(layer, "_hf_hook", None)
    for one in getattr(hook, "hooks", (hook,)):
        if one is None or not hasattr(one, "skip_keys"):
            continue
        skipped = [one.skip_keys] if isinstance(one.skip_keys, str) else list(one.skip_keys or ())
        if "past_key_values" not in skipped:
            raise LongDocError(
                'the model\'s layers were dispatched by accelerate without skip_keys="past_key_values", so each '
                "layer would get a copy of longdoc's cache; load it with device_map=..., or pass "
                "skip_keys=model._skip_keys_device_placement to dispatch_model"
            )


def offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps some of this module's weights off its execution device (host memory or disk)."""
    return any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in module.modules())


@contextmanager
def weights_at_hand(module: nn.Module) -> Iterator[None]:
    """Within: `module`'s own weights are real tensors on its execution device, also when accelerate offloaded
    them (read directly, not through a call, as the fused qkv projection's rows are)."""
    if getattr(getattr(module, "_hf_hook", None), "offload", False):
        from accelerate.utils import align_module_device

        with align_module_device(module):
            yield
    else:
        yield


class FusedLayer(NamedTuple):
    """One decoder layer's input projections as single matrices: q|k|v rows, then gate|up rows."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None


def plain_weights(*linears: nn.Linear) -> bool:
    """Dense tensors of one dtype and device (not quantized parameter types, not offloaded meta tensors)."""
    weights = [linear.weight for linear in linears]
    return all(type(w.data) is torch.Tensor and w.device.type != "meta" for w in weights) and (
        len({(w.dtype, w.device) for w in weights}) == 1
    )


@torch.no_grad()
def share_storage(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One matrix of the linears' rows stacked, each linear's weight (and bias) re-pointed at its own rows of it.

    The modules compute as before, from views; the stacked copy replaces the separate ones, so memory stays as it
    was (one layer's worth more while it is made).
    """
    with torch.inference_mode(False):
        weight = torch.cat([linear.weight for linear in linears])
        biases = [linear.bias for linear in linears]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None
        if any(b is not None for b in biases) and bias is None:
            raise ValueError("some projections have a bias and some do not")
        start = 0
        for linear in linears:
            rows = linear.weight.shape[0]
            linear.weight.data = weight[start : start + rows]
            if bias is not None:
                linear.bias.data = bias[start : start + rows]
            start += rows
    return weight, bias


def _placed(tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in tensors)


class PerDevice:
    """Tensors (a pass's position embeddings) copied to each device once, when a layer there first asks.

    On one device nothing is copied; on a split model, once per device and pass, not once per layer.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        self.tensors = tensors
        self.copies: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __call__(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self.copies:
            self.copies[device] = _placed(self.tensors, device)
        return self.copies[device]


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
        # Where each part runs, read once (placement does not change after loading; a per-call look-up would
        # cost every decoding step a walk over the modules).
        for layer in self.layers:
            check_hooks(layer)
        self.layer_devices = [module_device(layer) for layer in self.layers]
        self.input_device = module_device(self.decoder.embed_tokens)
        self.rotary_device = module_device(self.decoder.rotary_emb)
        self.norm_device = module_device(self.decoder.norm)
        self.head_device = module_device(self.model.lm_head)
        self._fused: list[FusedLayer] | None | bool = False  # not made yet (fused_layers)

    # ----- facts about the model -----
    @property
    def device(self) -> torch.device:
        """Where token ids and positions go in (the embedding's device); each layer's work is on its own."""
        return self.input_device

    @property
    def devices(self) -> list[torch.device]:
        """Every device the model computes on, in the order a pass visits them (embedding, layers, head)."""
        seen = [self.input_device, *self.layer_devices, self.norm_device, self.head_device]
        return list(dict.fromkeys(seen))

    @property
    def split(self) -> bool:
        """Whether the model's parts run on more than one device (a device_map across GPUs)."""
        return len(self.devices) > 1

    @property
    def offloaded(self) -> bool:
        """Whether accelerate streams some weights in from host memory at each call (a device_map with "cpu")."""
        return offloaded(self.model)

    def placement(self) -> str:
        """Which layers run where, for logs and notes: "cuda:0 (layers 0-39), cuda:1 (layers 40-79)"."""
        spans: list[tuple[torch.device, int, int]] = []
        for i, device in enumerate(self.layer_devices):
            if spans and spans[-1][0] == device and spans[-1][2] == i - 1:
                spans[-1] = (device, spans[-1][1], i)
            else:
                spans.append((device, i, i))
        return ", ".join(f"{d} (layers {a}-{b})" if a != b else f"{d} (layer {a})" for d, a, b in spans)

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
        return self.decoder.embed_tokens(input_ids.to(self.input_device))

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of `position_ids`, on the rotary module's device; `forward` takes them to each layer's.

        The module reads only the dtype and device of `hidden`, so hidden states that a split model left on
        another device are not copied over for it.
        """
        device = self.rotary_device
        like = hidden if hidden.device == device else hidden[:, :0].to(device)
        return self.decoder.rotary_emb(like, position_ids.to(device))

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

    def run_layer(
        self, index: int, hidden, position_embeddings, cache=None, mask=None, visible_keys=None
    ) -> torch.Tensor:
        """Decoder layer `index` over `hidden`; every tensor given must already be on that layer's device.

        `visible_keys` reaches the attention function as a keyword (the model's attention modules pass their extra
        keywords through): longdoc_sdpa then attends to that many slots of a static buffer (`forward`).
        """
        extra = {} if visible_keys is None else {"visible_keys": visible_keys}
        out = self.layers[index](
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            past_key_values=cache,
            use_cache=cache is not None,
            **extra,
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
        visible_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run decoder `layers` (all by default) over `hidden` (1, q, d), the one loop every pass goes through.

        The new rows attend to what `cache` already holds at each layer, causally. `tap(i, layer_input)` is
        called before layer i runs, for passes that need a layer's queries (SnapKV, HOMER, calibration).
        `mask` replaces the causal one (graph decoding hides a static buffer's unwritten slots with it), and
        `visible_keys`, a (1,) device tensor, says how many slots that is to longdoc_sdpa, which then reads no others.

        On a split model the hidden states move to each layer's device as the pass reaches it, and the position
        embeddings and mask once per device for the whole pass, not once per layer. The result is on the last
        layer's device; `tap` sees each layer's input on that layer's device.
        """
        layers = range(self.num_layers) if layers is None else layers
        if mask is None:
            past = cache.seq_length(layers[0]) if cache is not None else 0
            q_len = hidden.shape[1]
            mask = self.attention_mask(q_len, past + q_len, hidden.dtype, hidden.device)
        rows = PerDevice(tuple(position_embeddings))
        masks = PerDevice((mask,)) if mask is not None else None
        visible = PerDevice((visible_keys,)) if visible_keys is not None else None
        for i in layers:
            device = self.layer_devices[i]
            if hidden.device != device:
                hidden = hidden.to(device)
            if tap is not None:
                tap(i, hidden)
            layer_mask = masks(device)[0] if masks is not None else None
            if visible is not None and self._fused:  # stacked by fused_layers(), which StaticDecoder calls first
                hidden = self.decode_layer(i, hidden, rows(device), cache, visible(device)[0])
            else:
                layer_visible = visible(device)[0] if visible is not None else None
                hidden = self.run_layer(i, hidden, rows(device), cache, layer_mask, layer_visible)
        return hidden

    def fused_layers(self) -> list[FusedLayer] | None:
        """Every layer's q|k|v and gate|up as one matrix each, for `decode_layer`; None where decoding keeps the
        model's own layers (another attention implementation, quantized or offloaded weights, a split model).

        Made on first use by re-pointing the projections' weights at rows of one stacked matrix (`share_storage`):
        the model computes as before, with no second copy of its weights. Why: one token's matrix products are
        memory-bound, and the small ones read their weights far below the bandwidth (H200, Llama-3.1-8B shape, one
        row in a CUDA graph: k_proj and v_proj 30 %, q_proj 61 %, q|k|v stacked 78 %; gate_proj and up_proj 92 %,
        stacked 99 %; `benchmarks/decode_profile.py`), which left graph decoding at 68 % of its floor.
        """
        if self._fused and self._fused[0].qkv.data_ptr() != self._first_projection().weight.data_ptr():
            self._fused = False  # the weights were replaced since (the model moved or cast): stack them again
        if self._fused is not False:
            return self._fused
        self._fused = None
        if self.attn_implementation != ATTENTION or self.split or self.offloaded:
            return None
        projections = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            inputs = [attn.qkv_proj] if self.style == "fused" else [attn.q_proj, attn.k_proj, attn.v_proj]
            hidden = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
            if not plain_weights(*inputs, *hidden):
                return None
            projections.append((inputs, hidden))
        fused = []
        for inputs, hidden in projections:
            qkv, qkv_bias = (inputs[0].weight, inputs[0].bias) if len(inputs) == 1 else share_storage(*inputs)
            gate_up, gate_up_bias = (hidden[0].weight, hidden[0].bias) if len(hidden) == 1 else share_storage(*hidden)
            fused.append(FusedLayer(qkv, qkv_bias, gate_up, gate_up_bias))
        self._fused = fused
        return fused

    def _first_projection(self) -> nn.Linear:
        attn = self.layers[0].self_attn
        return attn.qkv_proj if self.style == "fused" else attn.q_proj

    def decode_layer(
        self, index: int, hidden: torch.Tensor, position_embeddings, cache, visible_keys: torch.Tensor
    ) -> torch.Tensor:
        """Decoder layer `index` for one token of graph decoding: the model's own layer, step by step as its
        modeling code writes it, except that q|k|v and gate|up are one matrix product each (`fused_layers`).

        The norms, q/k norms, rotary, output and down projections and the activation are the model's own modules;
        attention is the static cache's `attend` over its first `visible_keys` slots (longdoc_sdpa's `decode_attention`,
        or for a KIVI cache a kernel that reads the codes where they lie).
        """
        layer, fused = self.layers[index], self._fused[index]
        attn, mlp = layer.self_attn, layer.mlp
        d = self.head_dim
        residual = hidden
        qkv = nn.functional.linear(layer.input_layernorm(hidden), fused.qkv, fused.qkv_bias)
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        q, k, v = q.view(1, 1, -1, d), k.view(1, 1, -1, d), v.view(1, 1, -1, d)
        if self.style == "qk_norm":
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self._apply_rope(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)
        out = cache.attend(index, q, k, v.transpose(1, 2), visible_keys, attn.scaling)
        hidden = residual + attn.o_proj(out.transpose(1, 2).reshape(1, 1, -1))
        residual = hidden
        gate, up = nn.functional.linear(
            layer.post_attention_layernorm(hidden), fused.gate_up, fused.gate_up_bias
        ).chunk(2, dim=-1)
        activation = mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn
        return residual + mlp.down_proj(activation(gate) * up)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the last row, (1, vocab): final norm and LM head on that row only."""
        return self.logits(self.final_norm(hidden[:, -1:]))[:, -1]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.norm(hidden.to(self.norm_device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits in float32 for the given (already normed) hidden states, on the head's device."""
        return self.model.lm_head(hidden.to(self.head_device)).float()

    # ----- queries and keys as the attention sees them -----
    def _project(self, index: int, x: torch.Tensor, part: str) -> torch.Tensor:
        """q or k projection of normed input x, as (batch, heads, rows, head_dim), q/k norm applied."""
        attn = self.layers[index].self_attn
        d = self.head_dim
        if self.style == "fused":
            q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
            rows = slice(0, q_size) if part == "q" else slice(q_size, q_size + kv_size)
            with weights_at_hand(attn.qkv_proj):  # only the rows asked for are multiplied
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
        `position_embeddings` the (cos, sin) of the same rows; both are taken to the layer's device, where
        the result is.
        """
        device = self.layer_devices[index]
        q = self._project(index, self.layers[index].input_layernorm(layer_input.to(device)), "q")
        cos, sin = _placed(position_embeddings, device)
        # apply_rotary_pos_emb rotates a pair; the unused member is a one-head slice to save work.
        return self._apply_rope(q, q[:, :1], cos, sin)[0]

    def keys(self, index: int, layer_input: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Keys of decoder layer `index` for every row of its input, after norms and RoPE, on its device."""
        device = self.layer_devices[index]
        k = self._project(index, self.layers[index].input_layernorm(layer_input.to(device)), "k")
        cos, sin = _placed(position_embeddings, device)
        return self._apply_rope(k[:, :1], k, cos, sin)[1]
