"""HOMER: exact single-chunk equivalence, the reference's formulas, depth-first memory, a consistent cache."""

from __future__ import annotations

import math

import pytest
import torch
from test_core import CONTEXT, QUESTION, greedy_ids, load
from tiny_models import build_model

from longdoc import LongDocError
from longdoc.methods.homer import layer_schedule


def test_single_chunk_reproduces_full(tiny_model_dirs, family):
    full = load(tiny_model_dirs[family], "full")
    ids_full, layout, prefilled_full = greedy_ids(full)
    homer = full.with_method("homer")
    ids_homer, _, prefilled = greedy_ids(homer)
    assert prefilled.details["chunks"] == 1
    assert ids_homer == ids_full
    torch.testing.assert_close(prefilled.last_logits, prefilled_full.last_logits, atol=0, rtol=0)
    assert prefilled.next_position == len(layout)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    return build_model("llama", tmp_path_factory.mktemp("deep") / "llama", num_hidden_layers=8)


def test_layer_schedule_matches_the_reference_example():
    # METHODS.md: 7B (32 layers), 32 chunks, 12 warm-up layers: leaves run 0-16, merges at 17, 20, 23, 26, 29.
    blocks = layer_schedule(32, 12, 5)
    assert blocks[0] == range(0, 17)
    assert [b.start for b in blocks[1:]] == [17, 20, 23, 26, 29]
    assert blocks[-1].stop == 32


@pytest.mark.parametrize("chunks, max_chunk_len", [(2, 400), (4, 220)])
def test_multi_chunk_counts_schedule_and_positions(deep_llama, chunks, max_chunk_len):
    doc = load(deep_llama, "homer", max_chunk_len=max_chunk_len, warmup_layers=2)
    layout = doc.layout(CONTEXT * 2, QUESTION)
    p, c, s = layout.prefix_len, layout.context_len, layout.suffix_len
    prefilled = doc.prefill(layout)
    details = prefilled.details

    # Worked out by hand from METHODS.md.
    eff = max_chunk_len - p - s
    assert details["chunks"] == chunks == 2 ** math.ceil(math.log2(math.ceil(c / eff)))
    chunk_len = math.ceil(c / chunks)
    assert details["chunk_context_len"] == chunk_len
    height = int(math.log2(chunks))
    per_level = (8 - 2) // (height + 1)
    leftover = (8 - 2) - per_level * (height + 1)
    first = 2 + leftover + per_level
    expected = [(0, first)] + [(first + i * per_level, first + (i + 1) * per_level) for i in range(height)]
    assert details["schedule"] == expected

    child_keep = eff // 2  # each child keeps P + eff//2 + S; the root keeps target_len = max_chunk_len
    root_context = min(2 * child_keep, max_chunk_len - p - s)  # the root merges two reduced children
    assert prefilled.tokens_kept == p + root_context + s
    positions = details["positions"]
    assert positions[:p] == list(range(p))
    assert positions[-s:] == list(range(p + chunk_len, p + chunk_len + s))  # suffix after one chunk, not renumbered
    assert max(positions) < max_chunk_len
    assert prefilled.next_position == p + chunk_len + s
    assert all(p <= q < p + chunk_len for q in positions[p:-s])  # every context position restarts at P

    lengths = {prefilled.cache.seq_length(i) for i in range(8)}
    assert lengths == {prefilled.tokens_kept}  # propagative refinement: the same tokens in every layer
    assert details["max_alive_states"] <= math.ceil(math.log2(chunks)) + 1


def test_alive_states_stay_logarithmic(deep_llama):
    doc = load(deep_llama, "homer", max_chunk_len=120, warmup_layers=1)
    prefilled = doc.prefill(doc.layout(CONTEXT * 2, QUESTION))
    chunks = prefilled.details["chunks"]
    assert chunks >= 8
    assert prefilled.details["max_alive_states"] <= math.ceil(math.log2(chunks)) + 1


def test_homer_decodes_on_gqa_families(tiny_model_dirs, family):
    doc = load(tiny_model_dirs[family], "homer", max_chunk_len=300, warmup_layers=1)
    answer = doc.ask(CONTEXT, QUESTION, max_new_tokens=5)
    assert answer.stats.tokens_kept < answer.stats.tokens_in
    assert answer.evidence


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_chunk_len": 20}, "leaves no room for context"),
        ({"max_chunk_len": 300, "target_len": 10}, "target_len 10 must exceed"),
        ({"warmup_layers": 4}, "warmup_layers 4 must be below"),
        ({"max_chunk_len": 0}, "max_chunk_len must be at least 1"),
        ({"max_chunk_len": 4096}, "exceeds the model's 2048-token window"),
    ],
)
def test_bad_configs(tiny_model_dirs, options, message):
    with pytest.raises(LongDocError, match=message):
        load(tiny_model_dirs["llama"], "homer", **options).ask(CONTEXT, QUESTION, max_new_tokens=2)


def test_more_tree_levels_than_layers_merge_several_levels_at_one_layer(tiny_model_dirs):
    """Issue 19: 4 layers, 3 warm-up, a tree of 3+ levels once refused; now levels share the last layer."""
    doc = load(tiny_model_dirs["llama"], "homer", max_chunk_len=60, warmup_layers=3)
    layout = doc.layout(CONTEXT, QUESTION)
    prefilled = doc.prefill(layout)
    schedule = [range(a, b) for a, b in prefilled.details["schedule"]]
    assert len(schedule) > 2 and schedule[0] == range(0, 3) and schedule[-1] == range(3, 4)
    assert all(not block for block in schedule[1:-1])  # the middle levels merge at layer 3 with the root
    assert any("merge at the layer of the level below" in note for note in prefilled.notes)
    lengths = {prefilled.cache.seq_length(i) for i in range(4)}
    assert lengths == {prefilled.tokens_kept} and prefilled.tokens_kept <= 60
    answer = doc.ask(CONTEXT, QUESTION, max_new_tokens=3)
    assert answer.stats.tokens_kept < answer.stats.tokens_in


def test_spread_schedule_gives_leaves_and_root_a_layer():
    # The bundled model on War and Peace: 9 layers, 3 warm-up, 512 chunks (10 levels) on 6 layers.
    blocks = layer_schedule(9, 3, 9)
    assert len(blocks) == 10 and blocks[0].start == 0 and blocks[-1].stop == 9
    assert blocks[0] and blocks[-1]
    assert [layer for block in blocks for layer in block] == list(range(9))  # each layer once, in order
    blocks = layer_schedule(6, 0, 9)  # no warm-up: the leaves still run layer 0
    assert blocks[0] == range(0, 1) and blocks[-1].stop == 6


def test_short_last_chunk_hands_its_unused_budget_to_its_left_sibling(deep_llama, monkeypatch):
    """The reference's rule: a last chunk shorter than half a chunk keeps all of itself, its left sibling the rest."""
    from longdoc.methods import homer

    blocks = []  # (first context index, context tokens entering the prune, tokens kept, is a leaf) of each block
    run_block = homer._Run.run_block

    def spy(self, state, layers, keep):
        first, before = int(state.context_index[0]), state.context_len
        run_block(self, state, layers, keep)
        blocks.append((first, before, state.context_len, layers.start == 0))

    monkeypatch.setattr(homer._Run, "run_block", spy)
    doc = load(deep_llama, "homer", max_chunk_len=100, warmup_layers=2)
    layout = doc.layout((CONTEXT * 2)[:1117], QUESTION)  # found by search: 8 leaves of 35 tokens, the last 28
    p, c, s = layout.prefix_len, layout.context_len, layout.suffix_len
    eff = 100 - p - s
    prefilled = doc.prefill(layout)
    chunk_len = prefilled.details["chunk_context_len"]
    last = c - 7 * chunk_len
    assert prefilled.details["chunks"] == 8 and 0 < last < eff // 2 < chunk_len
    leaves = {first: (before, after) for first, before, after, leaf in blocks if leaf}
    assert leaves[7 * chunk_len] == (last, last)  # the short leaf keeps all of itself
    assert leaves[6 * chunk_len] == (chunk_len, min(chunk_len, eff - last))  # its sibling keeps the rest
    assert leaves[0] == (chunk_len, eff // 2)  # every other leaf keeps half a chunk
    pair = next(before for first, before, _, leaf in blocks if first == 6 * chunk_len and not leaf)
    assert pair == min(chunk_len, eff - last) + last  # the merged pair holds up to a whole chunk, not eff//2 + last


def test_calibrate_writes_a_bias_that_homer_finds_and_reports(deep_llama, tmp_path):
    from longdoc.cli.main import app
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from longdoc.calibration import FILE_NAME

    text = tmp_path / "plain.txt"
    text.write_text(CONTEXT * 8, encoding="utf-8")
    result = CliRunner().invoke(
        app, ["calibrate", str(deep_llama), "--text", str(text), "--samples", "3", "--length", "96", "-q"]
    )
    assert result.exit_code == 0, result.output
    bias = load_file(str(deep_llama / FILE_NAME))["bias"]
    assert bias.shape == (8, 96) and torch.isfinite(bias).all()

    doc = load(deep_llama, "homer", max_chunk_len=96)
    layout = doc.layout(CONTEXT, QUESTION)
    calibrated = doc.prefill(layout)
    assert any("calibrated with" in note for note in calibrated.notes)
    plain = doc.with_method("homer", max_chunk_len=96, calibration="off").prefill(layout)
    assert any("uncalibrated" in note for note in plain.notes)
    (deep_llama / FILE_NAME).unlink()


def test_calibration_bias_is_subtracted_per_layer_and_distance(deep_llama, tmp_path):
    from safetensors.torch import save_file

    doc = load(deep_llama, "homer", max_chunk_len=96, calibration="off")
    layout = doc.layout(CONTEXT, QUESTION)
    plain = doc.prefill(layout)
    zeros = tmp_path / "zeros.safetensors"
    save_file({"bias": torch.zeros(8, 96)}, str(zeros))
    same = doc.with_method("homer", max_chunk_len=96, calibration=str(zeros)).prefill(layout)
    assert same.kept_context.tolist() == plain.kept_context.tolist()
    # A huge bias for the nearest 40 distances makes those tokens the least wanted at every pruning step.
    near = torch.zeros(8, 96)
    near[:, :40] = 1e6
    biased_file = tmp_path / "near.safetensors"
    save_file({"bias": near}, str(biased_file))
    biased = doc.with_method("homer", max_chunk_len=96, calibration=str(biased_file)).prefill(layout)
    assert biased.kept_context.tolist() != plain.kept_context.tolist()
    wrong = tmp_path / "wrong.safetensors"
    save_file({"bias": torch.zeros(3, 96)}, str(wrong))
    with pytest.raises(LongDocError, match="bias for 3 layers, this model has 8"):
        doc.with_method("homer", max_chunk_len=96, calibration=str(wrong)).prefill(layout)


def test_parking_subtrees_in_host_memory_changes_nothing(deep_llama):
    """offload=True moves finished left subtrees (8+ leaves) away and back; on CPU the path runs and must be exact."""
    doc = load(deep_llama, "homer", max_chunk_len=64, warmup_layers=0, offload=False)
    layout = doc.layout(CONTEXT * 3, QUESTION)
    plain = doc.prefill(layout)
    assert plain.details["chunks"] >= 16
    parked = doc.with_method("homer", max_chunk_len=64, warmup_layers=0, offload=True).prefill(layout)
    assert parked.kept_context.tolist() == plain.kept_context.tolist()
    torch.testing.assert_close(parked.last_logits, plain.last_logits, rtol=0, atol=0)
