"""`longdoc ask` and `longdoc info` through typer's CliRunner: a needle on a known PDF page, JSON, every error path."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from longdoc.cli.console import LineProgress, StageStatus
from longdoc.cli.main import app
from made_documents import write_blank_pdf, write_pdf
from typer.testing import CliRunner

from longdoc.bench.needle import NEEDLE, QUESTION, Haystacks, load_books
from longdoc.errors import LongDocError
from longdoc.methods import GemFilter

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "models" / "needle-tiny")
BOOKS = ROOT.parent / "shared" / "corpus" / "books"
PDFS = ROOT.parent / "shared" / "corpus" / "pdf"
sys.path.insert(0, str(ROOT / "examples"))
from needle_folder import NEEDLE_GEMFILTER as GEMFILTER_OPTIONS  # noqa: E402  (the model card's settings)

# The same settings as `longdoc ask` flags: the two named options, the rest as -o KEY=VALUE.
NAMED_FLAGS = {"filter_layer": "--filter-layer", "top_k": "--top-k"}
NEEDLE_GEMFILTER = [
    arg
    for key, value in GEMFILTER_OPTIONS.items()
    for arg in ((NAMED_FLAGS[key], str(value)) if key in NAMED_FLAGS else ("-o", f"{key}={value}"))
]

runner = CliRunner()


def ask(*args: str, input: str | None = None):
    return runner.invoke(app, ["ask", *args], input=input)


@pytest.fixture(scope="module")
def needle_pdf(tmp_path_factory):
    """A 5-page PDF cut from a held-out book, the needle alone on page 3."""
    if not BOOKS.is_dir():
        pytest.skip("needs ../shared/corpus/books beside the checkout")
    from transformers import AutoTokenizer

    haystacks = Haystacks(load_books(BOOKS, held_out=True), AutoTokenizer.from_pretrained(MODEL))
    text = haystacks.cut(random.Random("pdf-needle"), 2200)
    words = text.split()
    pages = [" ".join(words[i * len(words) // 5 : (i + 1) * len(words) // 5]) for i in range(5)]
    needle = NEEDLE.format(key="lantern", value="4071936")
    half = len(pages[2]) // 2
    cut = pages[2].find(". ", half) + 1 or half
    layout = [[p] for p in pages]
    layout[2] = [pages[2][:cut] + " " + needle + " " + pages[2][cut:].strip()]  # inside a paragraph
    path = write_pdf(tmp_path_factory.mktemp("pdf") / "report.pdf", layout)
    return path, QUESTION.format(key="lantern"), "4071936"


def test_needle_on_page_three_is_answered_with_that_page_as_evidence(needle_pdf):
    path, question, value = needle_pdf
    result = ask(str(path), question, "--model", MODEL, "--device", "cpu", "--json", *NEEDLE_GEMFILTER)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert value in out["answer"]
    # The span that holds the needle maps back to page 3 of this file. (With the bundled model it is not
    # always the strongest: its filter layer also favours the document's last lines; see the model card.)
    span = next(e for e in out["evidence"] if value in e["quote"])
    assert span["page"] == 3 and span["file"] == str(path)
    assert all(set(e) >= {"file", "page", "start", "end", "quote"} for e in out["evidence"])
    stats = out["stats"]
    assert stats["method"] == "gemfilter" and stats["tokens_kept"] < stats["tokens_in"]


def test_text_answer_streams_with_evidence_and_stats(needle_pdf):
    path, question, value = needle_pdf
    result = ask(str(path), question, "--model", MODEL, "--device", "cpu", *NEEDLE_GEMFILTER)
    assert result.exit_code == 0, result.output
    answer, _, evidence = result.stdout.partition("Evidence")
    assert value in answer
    assert "p.3" in evidence
    assert "gemfilter: kept" in result.stderr


def test_transformers_warnings_stay_off_stderr_in_a_fresh_process(tmp_path):
    """In-process tests import transformers first, which hides the order this depends on (its import resets levels)."""
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text to read.")
    command = [sys.executable, "-m", "longdoc.cli.main", "ask", str(doc), "word " * 5000, "--model", MODEL]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "more than the model's 4096-token window" in result.stderr
    assert "Token indices" not in result.stderr, result.stderr  # transformers' own warning about the same


def test_a_method_that_reads_per_question_says_so(needle_pdf):
    path, question, _ = needle_pdf
    result = ask(
        str(path), question, "--model", MODEL, "--device", "cpu", "--method", "snapkv", "--max-new-tokens", "4"
    )
    assert result.exit_code == 0, result.output
    assert "tokens; snapkv reads them anew for each question" in result.stderr
    assert not any(line.startswith("read ") for line in result.stderr.splitlines())


def test_stdin_and_full_method(needle_pdf):
    text = "Some words before. " + NEEDLE.format(key="tiger", value="5550123") + " Some words after."
    result = ask("-", QUESTION.format(key="tiger"), "--model", MODEL, "--method", "full", "--quiet", input=text)
    assert result.exit_code == 0, result.output
    assert "5550123" in result.stdout
    assert result.stderr == ""


def test_info_lists_methods_and_families():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0
    assert "gemfilter" in result.stdout and "homer" in result.stdout and "Llama" in result.stdout
    assert "kivi-4 = full with kv_bits=4" in result.stdout


def _expect_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda d: d / "missing.pdf", [], "file not found"),
        (lambda d: (d / "notes.xyz").write_text("x") and d / "notes.xyz", [], "unsupported file type '.xyz'"),
        (lambda d: write_blank_pdf(d / "scan.pdf"), [], "looks scanned"),
        (lambda d: (d / "empty.txt").write_text(" ") and d / "empty.txt", [], "has no text"),
        (lambda d: (d / "b.txt").write_bytes(b"\x00\x01\x02") and d / "b.txt", [], "looks binary"),
    ],
)
def test_bad_documents(tmp_path, make, extra, message):
    _expect_error(ask(str(make(tmp_path)), "What?", "--model", MODEL, *extra), message)


@pytest.mark.skipif(not PDFS.is_dir(), reason="needs ../shared/corpus/pdf beside the checkout")
def test_encrypted_pdf_without_or_with_wrong_password():
    path = str(PDFS / "libreoffice-writer-password.pdf")
    _expect_error(ask(path, "What?", "--model", MODEL), "it is encrypted; pass --password")
    _expect_error(ask(path, "What?", "--model", MODEL, "--password", "nope"), "the password is wrong")


def test_bad_requests(tmp_path, monkeypatch):
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text to read.")
    _expect_error(ask(str(doc), "  ", "--model", MODEL), "the question is empty")
    _expect_error(ask(str(doc), "What?", "--model", MODEL, "--method", "magic"), "unknown --method magic")
    _expect_error(ask(str(doc), "What?", "--method", "full", "--top-k", "5"), "--top-k applies to gemfilter")
    _expect_error(ask(str(doc), "What?", "-o", "novalue"), "--option takes KEY=VALUE")
    _expect_error(ask(str(doc), "What?", "--model", MODEL, "-o", "nope=1"), "has no option nope")
    # Before any model loads: a model that does not exist is not reached.
    _expect_error(ask(str(doc), "What?", "--model", "/nowhere", "--max-new-tokens", "0"), "--max-new-tokens must be")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _expect_error(ask(str(doc), "What?", "--model", "nobody/no-such-model"), "is neither a local folder")


@pytest.mark.parametrize("step", ["read", "prefill"])  # reading the document once, or a question over it
def test_out_of_memory_names_the_ways_out(tmp_path, monkeypatch, step):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(GemFilter, step, out_of_memory)
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text to read.")
    result = ask(str(doc), "What?", "--model", MODEL, "--device", "cpu", "--quiet")
    _expect_error(result, "out of GPU memory")
    assert "--method homer" in result.stderr and "--top-k" in result.stderr


def test_errors_are_printed_literally(tmp_path, monkeypatch):
    _expect_error(ask("br[acket]/nope[1].txt", "What?", "--model", MODEL), "file not found: br[acket]/nope[1].txt")

    def bracketed(*args, **kwargs):
        raise LongDocError("needs bm25s: pip install 'longdoc[bench]' [bold]not markup[/bold]")

    monkeypatch.setattr("longdoc.documents.load_documents", bracketed)
    _expect_error(ask("-", "What?", input="text"), "pip install 'longdoc[bench]' [bold]not markup[/bold]")


def test_folder_lists_the_files_it_skipped_and_strict_fails_on_them(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("Some words. " + NEEDLE.format(key="tiger", value="5550123") + " More words.")
    (folder / "b[1].txt").write_bytes(b"\x00\x01\x02binary")
    result = ask(str(folder), QUESTION.format(key="tiger"), "--model", MODEL, "--method", "full", "--quiet")
    assert result.exit_code == 0, result.output
    assert "5550123" in result.stdout
    assert result.stderr.splitlines() == [
        f"skipped: {folder / 'b[1].txt'} looks binary, not text; give a document "
        "(.docx, .epub, .htm, .html, .markdown, .md, .pdf, .rst, .text, .txt, .xhtml)"
    ]
    _expect_error(ask(str(folder), "What?", "--model", MODEL, "--strict"), "b[1].txt looks binary")


def test_model_folder_without_tokenizer_files_is_one_line(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ["config.json", "generation_config.json", "model.safetensors"]:
        shutil.copy(Path(MODEL) / name, folder / name)
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text to read.")
    _expect_error(ask(str(doc), "What?", "--model", str(folder)), "could not load a tokenizer")
    _expect_error(ask(str(doc), "What?", "--model", str(doc)), "is not a model folder (no config.json in it)")


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr("longdoc.cli.console.PLAIN_INTERVAL", 0.0)  # this run is quick: let every update print
    doc = tmp_path / "doc.txt"
    doc.write_text("Some words before. " + NEEDLE.format(key="tiger", value="5550123") + " Some words after.")
    result = ask(str(doc), QUESTION.format(key="tiger"), "--model", MODEL, "--method", "full", "--no-evidence")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    # Spinner stages print only when they took 2 s or more; every progress line is "label: stage done/total (time)".
    spinner = [line for line in lines if re.fullmatch(r"(reading|loading .*) \(\d+\.\ds\)", line)]
    counted = [line for line in lines if re.fullmatch(r"(reading|question): [a-z]+ \d+/\d+ \(\d+\.\ds\)", line)]
    summaries = [line for line in lines if line.startswith("read ") or line.startswith("full: kept")]
    assert len(spinner) + len(counted) + len(summaries) == len(lines), lines  # nothing but plain lines
    assert {line.split()[1] for line in counted if line.startswith("question:")} >= {"tokenizing", "prefill"}
    assert lines[-1].startswith("full: kept")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_is_throttled_and_ends_with_the_final_state(capsys):
    clock = FakeClock()
    with LineProgress(interval=2.0, clock=clock) as bar:
        layers = bar.add_task("filter", total=100)
        for done in range(1, 101):  # 100 updates over 10 s
            clock.now += 0.1
            bar.update(layers, completed=done)
        bar.add_task("generating", total=256)  # begun, no progress: no line
        quick = bar.add_task("tokenizing", total=1)
        bar.update(quick, completed=1)  # done at once: no line
    lines = capsys.readouterr().err.splitlines()
    assert 4 <= len(lines) <= 6, lines  # one every 2 s, not 100
    assert all(line.startswith("filter ") for line in lines)
    assert lines[-1] == "filter 100/100 (10.0s)"


def test_slow_stage_gets_a_line_once_done_and_a_quick_one_none(capsys):
    clock = FakeClock()
    with StageStatus(quiet=False, clock=clock) as status:
        status.update("reading")
        clock.now += 0.1
        status.update("loading needle-tiny")
        clock.now += 3.0
    assert capsys.readouterr().err == "loading needle-tiny (3.0s)\n"


def test_device_map_flag_passes_a_json_map_through_and_refuses_in_flags(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 4815162. Remember it. " * 20)
    common = [str(doc), "What is the pass key?", "--model", MODEL, "--method", "full", "--max-new-tokens", "4"]
    plain = ask(*common, "--device", "cpu", "--json", "--quiet")
    mapped = ask(*common, "--device-map", '{"": "cpu"}', "--json", "--quiet")
    assert mapped.exit_code == 0, mapped.output
    assert json.loads(mapped.stdout)["answer"] == json.loads(plain.stdout)["answer"]
    assert ask(*common, "--device-map", "none", "--json", "--quiet").exit_code == 0
    _expect_error(ask(*common, "--device-map", "nope"), "--device-map takes auto, none or a JSON object")
    _expect_error(ask(*common, "--device-map", "{nope"), "--device-map is not valid JSON")
    _expect_error(ask(*common, "--device-map", '{"": "disk"}'), "--device-map puts '' on disk")
    _expect_error(ask(*common, "--device", "cpu", "--device-map", "auto"), "give --device or --device-map, not both")
    _expect_error(runner.invoke(app, ["chat", str(doc), "--device-map", "[0]"]), "--device-map takes auto, none")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": 1, "text": "t", "questions": ["q"]}\n')
    out = str(tmp_path / "a.jsonl")
    batch = runner.invoke(app, ["batch", str(jobs), "--out", out, "--runner", "local", "--device-map", '{"x": -1}'])
    _expect_error(batch, "--device-map puts 'x' on GPU -1; GPU numbers start at 0")


def test_compile_decode_flag_reaches_the_model_and_changes_no_cpu_answer(tmp_path, monkeypatch):
    """--compile-decode is handed to LongDoc; on the CPU decoding stays eager, so the answer is the same."""
    from longdoc import LongDoc

    seen = []
    original = LongDoc.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        seen.append(kwargs.get("compile_decode"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LongDoc, "from_pretrained", classmethod(recording))
    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 4815162. Remember it. " * 20)
    common = [str(doc), "What is the pass key?", "--model", MODEL, "--method", "full", "--max-new-tokens", "4"]
    plain = ask(*common, "--json", "--quiet")
    compiled = ask(*common, "--compile-decode", "--json", "--quiet")
    assert compiled.exit_code == 0, compiled.output
    assert seen == [False, True]
    assert json.loads(compiled.stdout)["answer"] == json.loads(plain.stdout)["answer"]
