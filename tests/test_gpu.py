"""CUDA-only checks (skipped on CPU): the mask-free attention kernel path and HOMER's host-memory parking on a GPU."""

from __future__ import annotations

import pytest
import torch
from test_core import CONTEXT, QUESTION
from tiny_models import build_model

from longdoc import LongDoc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_doc(path, method, attn=None, **options) -> LongDoc:
    return LongDoc.from_pretrained(
        str(path), method=method, device="cuda", dtype="float32", attn_implementation=attn, **options
    )


@pytest.mark.parametrize("method, options", [("full", {"chunk_size": 37}), ("gemfilter", {"top_k": 30})])
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
