"""needle-small's training recipe (scripts/train_needle_small.py): its tokenizer, examples and attention loss."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longdoc.bench.needle import NEEDLE, Haystacks

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "examples" / "haystack.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("train_needle_small", ROOT / "scripts" / "train_needle_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer(recipe):
    return recipe.train_tokenizer({"haystack": TEXT}, 400)


def test_digits_are_grouped_by_three_left_to_right(tokenizer):
    """Llama 3's `\\p{N}{1,3}`: every 1-10 digit value is ceil(n / 3) tokens, whatever the books' numbers were."""
    rng = random.Random("digits")
    for _ in range(300):
        digits = rng.randint(1, 10)
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        text = NEEDLE.format(key="velvet harbor", value=value)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = [tokenizer.decode([i]) for i in ids]
        groups = [value[i : i + 3] for i in range(0, len(value), 3)]
        at = pieces.index(groups[0])
        assert pieces[at : at + len(groups)] == groups, pieces
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("framed", [0.0, 1.0])
def test_examples_mark_the_asked_needle_and_the_lookup_token(recipe, tokenizer, framed):
    """In longdoc's layout and in framework-style templates (text around the document and after the question)."""
    hay = Haystacks({"haystack": TEXT}, tokenizer)
    rng = random.Random("examples")
    words = ["velvet", "harbor", "quill", "saffron", "lagoon", "bramble", "tinsel", "orchid"]
    for _ in range(20):
        example = recipe.make_example(hay, tokenizer, rng, 400, words, framed=framed)
        needle = tokenizer.decode(example.ids[slice(*example.needle)])
        answer = tokenizer.decode(example.ids[slice(*example.first)]).removesuffix(".<|end|>")
        assert needle.startswith(("One of the", "The pass key")), needle  # one whole needle sentence
        assert f" {answer}." in needle, (needle, answer)  # the asked one: it holds the answer
        assert tokenizer.decode(example.ids[example.first[0] - 1]) == "\n"  # the lookup: the assistant header's end


def test_the_attention_loss_is_head_zeros_attention_at_the_lookup(recipe):
    """LookupAttention recomputes head 0's attention of one row per example; eager attention must agree."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, attn_implementation="eager",
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    lookup = recipe.LookupAttention(model, first=1)
    ids = torch.randint(10, 300, (2, 40))
    query = torch.tensor([30, 17])
    needle = torch.zeros(2, 40, dtype=torch.bool)
    needle[0, 3:9] = True
    needle[1, 5:7] = True
    attentions = model(input_ids=ids, output_attentions=True).attentions
    expected = 0.0
    for layer in lookup.layers:
        for row in range(2):
            probs = attentions[layer][row, 0, query[row]]
            count = needle[row].sum()
            expected += (-probs[needle[row]].log().sum() / count - count.float().log()) / 2
    assert torch.allclose(lookup.loss(query, needle), expected / len(lookup.layers), atol=1e-5)
