"""CUDA-only checks (skipped on CPU): the mask-free attention kernel path and HOMER's host-memory parking on a GPU."""

from __future__ import annotations

import pytest
import torch
from test_core import CONTEXT, QUESTION
from tiny_models import build_model

from longdoc import LongDoc
from longdoc.attention import chunk_after_cache, cudnn_attention_with_lse, cudnn_lse_usable, math_attention_with_lse

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_doc(path, method, attn=None, **options) -> LongDoc:
    return LongDoc.from_pretrained(
        str(path), method=method, device="cuda", dtype="float32", attn_implementation=attn, **options
    )


@pytest.mark.parametrize("method, options", [("full", {"prefill_chunk": 37}), ("gemfilter", {"top_k": 30})])
def test_mask_free_attention_on_cuda_matches_transformers_sdpa(tiny_model_dirs, family, method, options):
    ours = cuda_doc(tiny_model_dirs[family], method, **options)
    assert ours.arch.attn_implementation == "longdoc_sdpa"
    reference = cuda_doc(tiny_model_dirs[family], method, attn="sdpa", **options)
    a = ours.ask(CONTEXT, QUESTION, max_new_tokens=12)
    b = reference.ask(CONTEXT, QUESTION, max_new_tokens=12)
    assert a.text == b.text


def test_homer_parking_on_cuda_is_exact(tmp_path):
    path = build_model("llama", tmp_path / "deep", num_hidden_layers=8)
    doc = cuda_doc(path, "homer", max_chunk_len=64, warmup_layers=0, offload=False)
    layout = doc.layout(CONTEXT * 3, QUESTION)
    plain = doc.prefill(layout)
    parked = doc.with_method("homer", max_chunk_len=64, warmup_layers=0, offload=True).prefill(layout)
    assert plain.details["chunks"] >= 16
    assert parked.kept_context.tolist() == plain.kept_context.tolist()
    torch.testing.assert_close(parked.last_logits, plain.last_logits, rtol=0, atol=0)


@pytest.mark.parametrize("heads, kv_heads, head_dim, q, kv", [(32, 8, 128, 512, 4096), (4, 2, 16, 37, 300)])
def test_cudnn_join_runs_and_matches_the_math(heads, kv_heads, head_dim, q, kv):
    """bf16 attention shapes take the cuDNN path; the joined output is the exact softmax's, also on cache views."""
    query = torch.randn(1, heads, q, head_dim, device="cuda", dtype=torch.bfloat16)
    buffer = torch.randn(2, 1, kv_heads, kv + 64, head_dim, device="cuda", dtype=torch.bfloat16)
    key, value = buffer[0, :, :, :kv], buffer[1, :, :, :kv]  # strided like KVCache's preallocated rows
    assert cudnn_lse_usable(query, key)
    got = chunk_after_cache(query, key, value, head_dim**-0.5, cudnn_attention_with_lse)
    want = chunk_after_cache(query.double(), key.double(), value.double(), head_dim**-0.5, math_attention_with_lse)
    torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=1e-2)


BF16_CASES = [("full", {"prefill_chunk": 37}), ("gemfilter", {"top_k": 30, "prefill_chunk": 37})]


@pytest.mark.parametrize("method, options", BF16_CASES)
def test_bf16_cuda_attention_is_as_accurate_as_transformers_sdpa(tiny_model_dirs, family, method, options):
    """bf16 on CUDA (the cuDNN-joined path) errs from the float32 result no more than transformers' masked SDPA does."""
    path = str(tiny_model_dirs[family])

    def last_logits(dtype, attn=None):
        doc = LongDoc.from_pretrained(
            path, method=method, device="cuda", dtype=dtype, attn_implementation=attn, **options
        )
        return doc.prefill(doc.layout(CONTEXT, QUESTION)).last_logits.float()

    truth = last_logits("float32", "sdpa")
    ours = (last_logits("bfloat16") - truth).abs().max().item()
    reference = (last_logits("bfloat16", "sdpa") - truth).abs().max().item()
    assert ours <= 2 * reference + 1e-2, (ours, reference)
