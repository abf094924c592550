"""Read once, ask many from the CLI: `ask -q -q`, `chat` through stdin, `--cache DIR` across runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from longdoc.cli.main import app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "models" / "needle-tiny")
HAYSTACK = str(ROOT / "examples" / "haystack.txt")
QUESTION = "What is the special magic number for beacon mentioned in the provided text?"  # the README's
OTHER = "What is the special magic number for lantern mentioned in the provided text?"  # not in the haystack
VALUE = "2867825"
sys.path.insert(0, str(ROOT / "examples"))
from needle_folder import NEEDLE_GEMFILTER as GEMFILTER_OPTIONS  # noqa: E402  (the model card's settings)

NAMED_FLAGS = {"filter_layer": "--filter-layer", "top_k": "--top-k"}
NEEDLE = [
    "--model",
    MODEL,
    "--device",
    "cpu",
    "--max-new-tokens",
    "24",
    *(
        arg
        for key, value in GEMFILTER_OPTIONS.items()
        for arg in ((NAMED_FLAGS[key], str(value)) if key in NAMED_FLAGS else ("-o", f"{key}={value}"))
    ),
]

runner = CliRunner()


def run(*args: str, input: str | None = None):
    result = runner.invoke(app, [*args, *NEEDLE], input=input)
    assert result.exit_code == 0, result.output
    return result


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_ask_several_questions_from_one_reading_as_json_lines():
    result = run("ask", HAYSTACK, "-q", QUESTION, "--question", OTHER, "-q", QUESTION, "--json")
    records = json_lines(result.stdout)
    assert [r["question"] for r in records] == [QUESTION, OTHER, QUESTION]
    assert VALUE in records[0]["answer"] and records[2]["answer"] == records[0]["answer"]  # exact reuse
    assert records[2]["evidence"] == records[0]["evidence"]
    assert result.stderr.count("read 1500 tokens") == 1  # one reading, then every question from it
    for record in records:
        stats = record["stats"]
        assert stats["reading"] == "reused" and stats["reused_tokens"] == 1500
        assert stats["reading_bytes"] > 0 and stats["reading_device"] == "cpu"
    assert result.stderr.count("gemfilter: kept 285/1526 tokens, reading reused (1500 tokens reused") == 3


def test_several_questions_in_plain_text_are_headed_by_each_question():
    result = run("ask", HAYSTACK, "-q", QUESTION, "-q", OTHER, "--no-evidence")
    first, second = result.stdout.split(f"question 2: {OTHER}")
    assert first.startswith(f"question 1: {QUESTION}") and VALUE in first


def test_chat_answers_each_line_of_stdin_until_quit():
    result = run("chat", HAYSTACK, input=f"{QUESTION}\n\n{OTHER}\n/quit\n{QUESTION}\n")
    assert result.stdout.count(VALUE) >= 1
    assert result.stdout.count("Evidence (kept spans") == 2  # two questions: the blank line skipped, none after /quit
    assert result.stderr.count("reading reused") == 2
    assert "> " not in result.stdout + result.stderr  # a pipe gets no prompt


def test_chat_ends_at_end_of_input():
    result = run("chat", HAYSTACK, "--json", "--quiet", input=QUESTION)
    [record] = json_lines(result.stdout)
    assert VALUE in record["answer"] and result.stderr == ""


def test_cache_saves_then_loads_and_reads_again_over_a_damaged_one(tmp_path):
    cache = str(tmp_path / "reading")
    first = run("ask", HAYSTACK, QUESTION, "--cache", cache, "--json")
    assert "read 1500 tokens" in first.stderr and f"saved the reading to {cache}" in first.stderr
    second = run("ask", HAYSTACK, QUESTION, "--cache", cache, "--json")
    assert f"loaded the saved reading from {cache}: 1500 tokens" in second.stderr
    assert "read 1500 tokens" not in second.stderr
    [a], [b] = json_lines(first.stdout), json_lines(second.stdout)
    assert VALUE in a["answer"] and b["answer"] == a["answer"] and b["evidence"] == a["evidence"]

    (tmp_path / "reading" / "reading.safetensors").write_bytes(b"not a safetensors file")
    third = run("ask", HAYSTACK, QUESTION, "--cache", cache, "--json")
    assert "not using the saved reading" in third.stderr and "damaged" in third.stderr
    assert f"saved the reading to {cache}" in third.stderr
    assert json_lines(third.stdout)[0]["answer"] == a["answer"]


def test_cache_of_another_method_is_read_again(tmp_path):
    cache = str(tmp_path / "reading")
    full = ["--method", "full", "--model", MODEL, "--device", "cpu", "--max-new-tokens", "4", "--quiet"]
    assert runner.invoke(app, ["ask", HAYSTACK, QUESTION, "--cache", cache, *full]).exit_code == 0
    result = run("ask", HAYSTACK, QUESTION, "--cache", cache)  # gemfilter: the saved full reading is refused
    assert "not using the saved reading" in result.stderr and "made with method 'full'" in result.stderr
    assert "read the document again" not in result.stderr  # the CLI says what it does instead
    assert f"saved the reading to {cache}" in result.stderr and VALUE in result.stdout


def _expect_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_argument_errors_are_one_line():
    _expect_error(runner.invoke(app, ["ask", HAYSTACK]), "give FILE... QUESTION")
    _expect_error(runner.invoke(app, ["ask", HAYSTACK, "-q", "What?", "-q", " "]), "the question is empty")
    _expect_error(runner.invoke(app, ["chat", "-"]), "give the document as a file")
    _expect_error(runner.invoke(app, ["chat", HAYSTACK, "--method", "magic"]), "unknown --method magic")
