"""Model profiles (longdoc.json): `longdoc tune` writes them, loading a model applies them, explicit options win."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_core import CONTEXT, QUESTION

from longdoc import GemFilter, LongDoc, LongDocError
from longdoc.profile import FILE_NAME, profile_path

ROOT = Path(__file__).resolve().parents[1]
NEEDLE_MODEL = ROOT / "examples" / "models" / "needle-tiny"
BOOKS = ROOT.parent / "shared" / "corpus" / "books"
if not BOOKS.is_dir():
    BOOKS = Path("/work/shared/corpus/books")


@pytest.fixture
def profiled(tiny_model_dirs, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    profile = {
        "methods": {
            "gemfilter": {
                "options": {"filter_layer": 1, "top_k": 48, "score": "softmax"},
                "accuracy": 0.75,
                "samples": 8,
            },
            "homer": {"options": {"calibration": "off"}},
        },
        "auto": {"within": "gemfilter"},
    }
    (folder / FILE_NAME).write_text(json.dumps(profile))
    return folder


def test_loading_a_model_applies_its_profile_and_says_so(profiled):
    doc = LongDoc.from_pretrained(str(profiled), device="cpu")
    assert doc.method.within == GemFilter(filter_layer=1, top_k=48, score="softmax")
    answer = doc.ask(CONTEXT, QUESTION, max_new_tokens=4)
    assert answer.stats.method == "gemfilter"
    assert any("needle accuracy 0.75 on 8 samples" in note and "filter_layer=1" in note for note in answer.stats.notes)
    assert doc.with_method("homer").method.calibration == "off"


def test_explicit_options_win_over_the_profile(profiled):
    doc = LongDoc.from_pretrained(str(profiled), "gemfilter", device="cpu", top_k=32)
    assert doc.method == GemFilter(filter_layer=1, top_k=32, score="softmax")
    auto = LongDoc.from_pretrained(str(profiled), device="cpu", top_k=32)
    assert auto.method.within.top_k == 32 and auto.method.within.filter_layer == 1
    plain = LongDoc.from_pretrained(str(profiled), GemFilter(top_k=16), device="cpu")  # an object is used as given
    assert plain.method == GemFilter(top_k=16)
    assert not any("profile" in note for note in plain.ask(CONTEXT, QUESTION, max_new_tokens=2).stats.notes)


def test_a_method_named_in_one_call_gets_the_profile_too(profiled):
    """`ask(..., method="gemfilter")` is parsed as a name given at loading is (the profile's options), and a method
    of another type is one LongDocError, not an AttributeError deep in the prefill."""
    doc = LongDoc.from_pretrained(str(profiled), "full", device="cpu")
    answer = doc.ask(CONTEXT, QUESTION, method="gemfilter", max_new_tokens=2)
    layout = doc.layout(CONTEXT, QUESTION)
    kept_context = answer.stats.tokens_kept - (len(layout) - layout.context_len)  # the prefix and suffix are kept
    assert answer.stats.method == "gemfilter" and kept_context == 48  # the profile's top_k
    assert doc.ask_prompt(f"{CONTEXT}\n\n{QUESTION}", method="full", max_new_tokens=2).stats.method == "full"
    with pytest.raises(LongDocError, match="method must be a Method or a method's name, not int"):
        doc.ask(CONTEXT, QUESTION, method=3)


def test_a_damaged_profile_is_one_line(profiled):
    (profiled / FILE_NAME).write_text("{not json")
    with pytest.raises(LongDocError, match="cannot read the model profile .* run longdoc tune again"):
        LongDoc.from_pretrained(str(profiled), device="cpu")


def test_a_hub_id_profile_lives_in_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert profile_path("org/model") == tmp_path / "longdoc" / "profiles" / "org--model" / FILE_NAME


@pytest.mark.parametrize("name", ["needle-small", "needle-tiny"])
def test_each_bundled_model_ships_a_profile_that_answers_the_readme_demo(name):
    """The README demo with no other flag: `longdoc ask examples/haystack.txt "<question>" --model needle-small`."""
    from longdoc.cli.main import app
    from typer.testing import CliRunner

    model = ROOT / "examples" / "models" / name
    profile = json.loads((model / FILE_NAME).read_text())
    assert profile["methods"]["gemfilter"]["accuracy"] > 0.5
    question = "What is the special magic number for beacon mentioned in the provided text?"
    result = CliRunner().invoke(app, ["ask", str(ROOT / "examples" / "haystack.txt"), question, "--model", str(model)])
    assert result.exit_code == 0, result.output
    assert "2867825" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not BOOKS.is_dir(), reason="needs the book corpus")
def test_tune_writes_a_profile_that_loading_applies(tmp_path):
    from longdoc.cli.main import app
    from typer.testing import CliRunner

    model = tmp_path / "needle"
    shutil.copytree(NEEDLE_MODEL, model, ignore=shutil.ignore_patterns(FILE_NAME, "longdoc-calibration.safetensors"))
    args = ["tune", str(model), "--books", str(BOOKS), "--samples", "2", "--lengths", "1024", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    profile = json.loads((model / FILE_NAME).read_text())
    gemfilter = profile["methods"]["gemfilter"]
    assert 0 <= gemfilter["grounded"] <= gemfilter["accuracy"] <= 1 and "filter_layer" in gemfilter["options"]
    assert gemfilter["needles"] == 4  # scored on haystacks of four needles: exact, and the needle the top evidence
    exact, grounded, score = (gemfilter[f"layer_{name}"]["1024"] for name in ("accuracy", "grounded", "score"))
    assert set(exact) == set(grounded) == set(score) == {str(i) for i in range(9)}
    assert all(score[k] == (exact[k] + grounded[k]) / 2 for k in score)  # exact and grounded answers, half each
    assert score[str(gemfilter["options"]["filter_layer"])] == max(score.values())
    homer = profile["methods"]["homer"]  # calibration on/off x chunks of half the window and of the whole window
    assert [(t["calibration"], t["max_chunk_len"]) for t in homer["trials"]] == [
        ("measured", 2048), ("off", 2048), ("measured", 4096), ("off", 4096),
    ]  # fmt: skip
    best = max(homer["trials"], key=lambda t: t["accuracy"])  # the first of equals, as tune keeps
    assert homer["accuracy"] == best["accuracy"]
    assert homer["options"].get("max_chunk_len", 2048) == best["max_chunk_len"]
    assert (homer["options"]["calibration"] == "off") == (best["calibration"] == "off")
    doc = LongDoc.from_pretrained(str(model), device="cpu")
    assert doc.method.within.filter_layer == gemfilter["options"]["filter_layer"]


def test_tune_scores_gemfilter_by_exact_and_grounded_answers_and_keeps_the_callers_options(monkeypatch):
    """A layer's score is exact answers and grounded ones (the asked needle the strongest evidence), half each; the
    best layer wins, the earliest of equals; an option the caller fixed (`-o score=softmax`) is never flipped."""
    from longdoc import tune

    def record(correct: bool, rank: int | None, layer: int) -> dict:
        return dict(correct=correct, evidence_rank=rank, length=1024, filter_layer=layer)

    # Layer 1: right but the needle ranked second (exact 1, grounded 0); layer 2: right and first once of two.
    cells = {0: [record(False, None, 0)] * 2, 1: [record(True, 1, 1)] * 2, 2: [record(True, 0, 2), record(True, 1, 2)]}
    assert [tune.score(cell) for cell in cells.values()] == [0.0, 0.5, 0.75]
    swept, flipped = [], []

    def sweep(base, haystacks, options, lengths, samples, seed, progress, needles, metric):
        swept.append(dict(options))
        assert needles == tune.NEEDLES and metric is tune.score
        return {1024: {k: metric(cell) for k, cell in cells.items()}}, [r for cell in cells.values() for r in cell]

    class Base:
        def with_method(self, name, **options):
            flipped.append(options)
            return self

    monkeypatch.setattr(tune, "sweep_filter_layer", sweep)
    monkeypatch.setattr(tune, "needle_records", lambda *args, **kwargs: [record(False, None, 2)])
    entry = tune.tune_gemfilter(Base(), None, {"score": "softmax"}, [1024], 2, 0, lambda *a: None)
    assert entry["options"]["filter_layer"] == 2 and entry["options"]["score"] == "softmax"
    assert (entry["score"], entry["accuracy"], entry["grounded"]) == (0.75, 1.0, 0.5)
    assert all(trial["score"] == "softmax" for trial in swept + flipped)
    assert [sorted(set(t) - {"filter_layer", "score"}) for t in flipped] == [["query_tokens"], ["pool_kernel"]]
