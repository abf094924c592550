"""`longdoc bench needle|layers|speed` end to end on tiny settings: valid JSON and PNG files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from longdoc.cli.main import app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "models" / "needle-tiny")
BOOKS = ROOT.parent / "shared" / "corpus" / "books"
PNG = b"\x89PNG\r\n\x1a\n"
needs_books = pytest.mark.skipif(not BOOKS.is_dir(), reason="needs ../shared/corpus/books beside the checkout")

runner = CliRunner()


def bench(*args: str):
    result = runner.invoke(app, ["bench", *args, "-q"])
    assert result.exit_code == 0, result.output
    return result


@needs_books
def test_needle_writes_records_heatmaps_and_summary(tmp_path):
    methods = "full,gemfilter,homer,snapkv,streaming,rag"
    result = bench(
        "needle", "--model", MODEL, "--books", str(BOOKS), "--methods", methods, "--lengths", "512,1024",
        "--depths", "0,1", "--samples", "2", "--top-k", "128", "-o", "gemfilter.score=softmax", "--out", str(tmp_path),
    )  # fmt: skip
    data = json.loads((tmp_path / "needle.json").read_text())
    assert len(data["records"]) == 6 * 2 * 2 * 2
    assert set(data["summary"]) == set(methods.split(","))
    assert data["options"]["gemfilter"] == {"top_k": 128, "score": "softmax"}
    assert data["options"]["homer"] == {}  # no top_k field: not passed
    assert data["books"] == ["the-scarlet-letter", "walden", "wuthering-heights"]
    record = data["records"][0]
    assert {"method", "length", "depth", "correct", "answer", "prefill_seconds"} <= set(record)
    for name in methods.split(","):
        assert (tmp_path / f"needle-{name}.png").read_bytes().startswith(PNG)
    assert "full" in result.stdout and "mean" in result.stdout


@needs_books
def test_layers_sweeps_every_layer_and_names_the_best(tmp_path):
    result = bench(
        "layers", "--model", MODEL, "--books", str(BOOKS), "--lengths", "512", "--samples", "2",
        "-o", "score=softmax", "-o", "pool_kernel=41", "--out", str(tmp_path),
    )  # fmt: skip
    data = json.loads((tmp_path / "layers.json").read_text())
    assert sorted(int(k) for k in data["accuracy"]["512 tokens"]) == list(range(9))
    assert 0 <= data["best_layer"] < 9 and data["needles"] == 4  # as tune: four needles, exact and grounded
    score = {int(k): v for k, v in data["score"].items()}
    assert data["best_layer"] == max(score, key=lambda layer: (score[layer], -layer))
    assert (tmp_path / "layers.png").read_bytes().startswith(PNG)
    assert f"best filter layer: {data['best_layer']}" in result.stderr


def test_speed_on_a_tiny_shape(tmp_path):
    bench(
        "speed", "--shape", "tiny", "--lengths", "256,1k", "--runs", "2", "--decode-tokens", "4", "--device", "cpu",
        "--top-k", "64", "--methods", "full,gemfilter,homer,snapkv,streaming", "-o", "homer.max_chunk_len=512",
        "--out", str(tmp_path),
    )  # fmt: skip
    data = json.loads((tmp_path / "speed.json").read_text())
    assert data["shape"] == "tiny" and data["versions"]["torch"]
    by = {(r["method"], r["length"]): r for r in data["records"]}
    assert len(by) == 12  # 5 methods and transformers' own forward, at 2 lengths
    assert by[("transformers", 1024)]["tokens_kept"] == 1024
    assert by[("full", 1024)]["tokens_kept"] == 1024
    assert by[("gemfilter", 1024)]["tokens_kept"] == 8 + 64 + 24  # prefix + top_k + suffix
    assert by[("full", 256)]["ttft_seconds"] > 0 and by[("full", 256)]["decode_tokens_per_second"] > 0
    # 4 chunks need more tree levels than the tiny shape has layers: homer now merges several levels at a layer
    assert "error" not in by[("homer", 1024)] and by[("homer", 1024)]["tokens_kept"] <= 512
    assert (tmp_path / "speed.png").read_bytes().startswith(PNG)


def test_bench_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["bench", "speed", "--shape", "gpt-9", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown shape 'gpt-9'" in result.stderr
    result = runner.invoke(app, ["bench", "speed", "--shape", "tiny", "--methods", "full", "-o", "nope=1"])
    assert result.exit_code == 2 and "no benchmarked method has an option 'nope'" in result.stderr


def test_without_matplotlib_the_benchmarks_refuse_before_they_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    for args in (["needle", "--model", MODEL], ["layers", "--model", MODEL], ["speed", "--shape", "tiny"]):
        result = runner.invoke(app, ["bench", *args, "--out", str(tmp_path), "-q"])
        assert result.exit_code == 2 and "pip install 'longdoc[bench]'" in result.stderr, result.output
    assert not any(tmp_path.iterdir())  # nothing ran


def test_speed_takes_the_field_rows(tmp_path):
    rows = "full,kivi-4,kivi-2,gemfilter,gemfilter+kv_bits=4,h2o"
    bench(
        "speed", "--shape", "tiny", "--lengths", "1k", "--runs", "1", "--decode-tokens", "4", "--device", "cpu",
        "--top-k", "256", "--methods", rows, "--no-reference", "--out", str(tmp_path),
    )  # fmt: skip
    by = {r["method"]: r for r in json.loads((tmp_path / "speed.json").read_text())["records"]}
    assert set(by) == set(rows.split(","))
    assert by["kivi-4"]["options"] == {} and by["gemfilter+kv_bits=4"]["options"] == {"kv_bits": "4", "top_k": 256}
    assert by["kivi-2"]["cache_bytes"] < by["kivi-4"]["cache_bytes"] < by["full"]["cache_bytes"] / 3
    # 288 kept tokens: the 128 oldest are quantized, the last 160 stay in full precision (KIVI's recent window)
    assert by["gemfilter+kv_bits=4"]["cache_bytes"] < by["gemfilter"]["cache_bytes"]
    assert by["h2o"]["tokens_kept"] == 8 + 256 + 24 and by["kivi-4"]["tokens_kept"] == 1024


def test_reading_bench_takes_quantized_readings(tmp_path):
    """`--questions` measures the reusable rows, a quantized reading (kv_bits) among them: read, ask, save and load."""
    rows = "full,kivi-4,gemfilter+kv_bits=4,h2o"
    bench(
        "speed", "--shape", "tiny", "--lengths", "1k", "--runs", "1", "--decode-tokens", "3", "--device", "cpu",
        "--top-k", "64", "--methods", rows, "--no-reference", "--questions", "1", "--out", str(tmp_path),
    )  # fmt: skip
    by = {r["method"]: r for r in json.loads((tmp_path / "reading.json").read_text())["records"]}
    assert set(by) == {"full", "kivi-4", "gemfilter+kv_bits=4"}  # h2o recomputes per question: not a reading row
    assert by["kivi-4"]["reading_bytes"] < by["full"]["reading_bytes"] / 2 and by["kivi-4"]["load_seconds"] >= 0
    assert 0 < by["gemfilter+kv_bits=4"]["reading_bytes"] < by["kivi-4"]["reading_bytes"]
