"""`longdoc batch` / `longdoc.batch.run`: many documents each read once, in-process or on Ray Data, resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from longdoc.cli.main import app
from made_documents import write_blank_pdf, write_pdf
from typer.testing import CliRunner

from longdoc import GemFilter, LongDoc, LongDocError
from longdoc import batch as batching
from longdoc.batch import AnswerLog, Summary, read_jobs

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "models" / "needle-tiny")
sys.path.insert(0, str(ROOT / "examples"))
from needle_folder import NEEDLE_GEMFILTER  # noqa: E402  (the model card's settings)

HAYSTACK = (ROOT / "examples" / "haystack.txt").read_text()
BEACON = "What is the special magic number for beacon mentioned in the provided text?"
LANTERN = "What is the special magic number for lantern mentioned in the provided text?"
MAX_NEW_TOKENS = 12
RUN = dict(model=MODEL, method="gemfilter", options=NEEDLE_GEMFILTER, device="cpu", max_new_tokens=MAX_NEW_TOKENS)


def haystack_text(n: int) -> str:
    """800 characters of the haystack with a needle of its own in the middle."""
    text = HAYSTACK[n * 400 : n * 400 + 800]
    return f"{text[:400]} One of the special magic numbers for beacon is: {1000 + 37 * n}. {text[400:]}"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> list[dict]:
    """Six texts (one with its own method, one with its own top_k, one with two questions), a two-page PDF, then three
    bad documents."""
    folder = tmp_path_factory.mktemp("batch-docs")
    write_pdf(folder / "report.pdf", [[haystack_text(6)], [haystack_text(7)]])
    write_blank_pdf(folder / "scan.pdf")
    found = [{"id": f"text-{n}", "text": haystack_text(n), "questions": [BEACON]} for n in range(6)]
    found[3]["questions"].append(LANTERN)
    found[1]["method"] = "full"
    found[2]["options"] = {"top_k": 64}
    found.append({"id": 6, "files": [str(folder / "report.pdf")], "questions": [BEACON]})
    found.append({"id": "missing", "files": [str(folder / "nowhere.pdf")], "questions": [BEACON]})
    found.append({"id": "scanned", "files": [str(folder / "scan.pdf")], "questions": [BEACON]})
    found.append({"id": "empty", "text": "  ", "questions": [BEACON]})
    return found


BAD = {"missing": "file not found", "scanned": "looks scanned", "empty": "the text is empty"}


@pytest.fixture(scope="module")
def sequential(jobs) -> dict:
    """The reference: one engine, each document read once and its questions asked in a loop."""
    from longdoc.documents import Document, load_documents

    doc = LongDoc.from_pretrained(MODEL, method=GemFilter(**NEEDLE_GEMFILTER), device="cpu")
    expected = {}
    for job in jobs:
        if job["id"] in BAD:
            continue
        engine = doc
        if "method" in job:
            engine = doc.with_method(job["method"])
        elif "options" in job:
            engine = doc.with_method("gemfilter", **{**NEEDLE_GEMFILTER, **job["options"]})
        document = load_documents(job["files"]) if "files" in job else Document(job["text"], "text")
        reading = engine.read(document)
        expected[job["id"]] = [
            batching.answer_record(q, reading.ask(q, max_new_tokens=MAX_NEW_TOKENS), document) for q in job["questions"]
        ]
    return expected


def records_by_id(path: Path) -> dict:
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len({r["id"] for r in records}) == len(records), "an id was written twice"
    return {r["id"]: r for r in records}


def assert_same_answers(records: dict, expected: dict) -> None:
    """Text, evidence and how the reading was used equal the sequential loop's; timings differ."""
    for job_id, answers in expected.items():
        got = records[job_id]["answers"]
        assert records[job_id]["error"] is None
        assert [a["answer"] for a in got] == [a["answer"] for a in answers], job_id
        assert [a["evidence"] for a in got] == [a["evidence"] for a in answers], job_id
        assert [(a["stats"]["method"], a["stats"]["reading"]) for a in got] == [
            (a["stats"]["method"], a["stats"]["reading"]) for a in answers
        ]


def assert_bad_documents_are_errors(records: dict) -> None:
    for job_id, words in BAD.items():
        assert records[job_id]["answers"] == [] and words in records[job_id]["error"], records[job_id]


def test_in_process_equals_a_sequential_loop_and_records_bad_documents(tmp_path, jobs, sequential):
    out = tmp_path / "answers.jsonl"
    seen: list[int] = []
    summary = batching.run(jobs, out, runner="local", progress=lambda s: seen.append(s.handled), **RUN)
    records = records_by_id(out)
    assert_same_answers(records, sequential)
    assert_bad_documents_are_errors(records)
    assert {1, 2} >= {span["page"] for span in records[6]["answers"][0]["evidence"]} != set()
    assert [a["stats"]["reading"] for a in records["text-3"]["answers"]] == ["reused", "reused"]
    assert (summary.mode, summary.workers, summary.done, summary.failed, summary.skipped) == ("in-process", 1, 7, 3, 0)
    assert summary.questions == 8 and seen == list(range(11))  # a progress call at the start and after each line
    assert "batch in-process: 7 done, 3 failed, 0 skipped" in summary.line() and "documents/min" in summary.line()


def test_cli_resumes_after_a_crash_that_left_half_a_line(tmp_path, jobs, sequential):
    """Five lines written, then a crash in the middle of the sixth: the rerun keeps the five, drops the half line and
    answers the rest, each id once."""
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    out = tmp_path / "answers.jsonl"
    earlier = [{"id": job["id"], "answers": sequential[job["id"]], "skipped": [], "error": None} for job in jobs[:5]]
    whole = "".join(json.dumps(record) + "\n" for record in earlier)
    half = json.dumps({"id": jobs[5]["id"], "answers": sequential[jobs[5]["id"]], "error": None})[:50]
    out.write_text(whole + half)
    flags = ["--model", MODEL, "--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS), "--runner", "local"]
    flags += [
        "--method",
        "gemfilter",
        *("--top-k", "256", "--filter-layer", "7"),
        *("-o", "score=softmax", "-o", "pool_kernel=41"),
    ]
    result = CliRunner().invoke(app, ["batch", str(jobs_file), "--out", str(out), *flags, "-o", "query_tokens=16"])
    assert result.exit_code == 2, result.output  # three lines failed
    assert out.read_text().startswith(whole)
    records = records_by_id(out)
    assert list(records) == [job["id"] for job in jobs]
    assert_same_answers(records, sequential)
    assert_bad_documents_are_errors(records)
    assert "batch in-process: 2 done, 3 failed, 5 skipped (already answered)" in result.stderr
    assert "dropped a partial last line (50 bytes)" in result.stderr

    again = CliRunner().invoke(app, ["batch", str(jobs_file), "--out", str(out), *flags, "-o", "query_tokens=16"])
    assert again.exit_code == 0 and "0 done, 0 failed, 10 skipped" in again.stderr
    assert records_by_id(out) == records


def test_ray_local_mode_with_two_workers_equals_the_sequential_loop(tmp_path, jobs, sequential):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        settings = {**RUN, "method": GemFilter(**NEEDLE_GEMFILTER), "options": None}  # a Method object reaches workers
        summary = batching.run(jobs, tmp_path / "answers.jsonl", workers=2, **settings)
    finally:
        ray.shutdown()
    records = records_by_id(tmp_path / "answers.jsonl")
    assert_same_answers(records, sequential)
    assert_bad_documents_are_errors(records)
    assert (summary.mode, summary.workers, summary.done, summary.failed) == ("ray", 2, 7, 3)


# ----- without a model -----


def test_retry_failed_answers_the_errors_again_and_the_last_line_wins(tmp_path):
    out = tmp_path / "answers.jsonl"
    log = AnswerLog(out)
    log.append({"id": "a", "answers": [], "error": "file not found: a.pdf"})
    log.append({"id": "b", "answers": [], "error": None})
    again = AnswerLog(out)
    assert again.answered("a", retry_failed=False) and not again.answered("a", retry_failed=True)
    assert again.answered("b", retry_failed=True) and not again.answered("c", retry_failed=False)
    again.append({"id": "a", "answers": [], "error": None})
    assert AnswerLog(out).answered("a", retry_failed=True)


def test_a_damaged_line_in_the_middle_of_the_output_is_refused(tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text('{"id": 1, "answers": [], "error": null}\nnot json\n{"id": 2, "answers": [], "error": null}\n')
    with pytest.raises(LongDocError, match="line 2 is not an answer line"):
        AnswerLog(out)


@pytest.mark.parametrize(
    "line, message",
    [
        ("[1, 2]", "a job is a JSON object"),
        ('{"id": 1, "text": "t", "questions": ["q"], "question": "q"}', "unknown key question"),
        ('{"text": "t", "questions": ["q"]}', "give each job an id"),
        ('{"id": 1, "text": "t", "questions": []}', "questions must be a list of non-empty strings"),
        ('{"id": 1, "files": ["a.pdf"], "text": "t", "questions": ["q"]}', "either files"),
        ('{"id": 1, "files": "a.pdf", "questions": ["q"]}', "files must be a non-empty list"),
        ('{"id": 1, "text": "t", "questions": ["q"], "options": [1]}', "options must be an object"),
        ("{id: 1}", "is not JSON"),
    ],
)
def test_bad_job_lines_are_refused_before_any_model_loads(tmp_path, line, message):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"id": 0, "text": "t", "questions": ["q"]}\n' + line + "\n")
    with pytest.raises(LongDocError, match=message) as caught:
        read_jobs(path)
    assert "line 2" in str(caught.value) and "\n" not in str(caught.value)


def test_job_files_are_taken_from_the_jobs_file_folder_and_ids_are_unique(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"id": 1, "files": ["docs/a.pdf", "../b.pdf"], "questions": ["q"]}\n\n')
    assert read_jobs(path)[0].files == [str(tmp_path / "docs" / "a.pdf"), str(tmp_path.parent / "b.pdf")]
    with pytest.raises(LongDocError, match="job id 1 appears twice"):
        read_jobs([{"id": 1, "text": "t", "questions": ["q"]}] * 2)


def test_a_bad_generation_option_is_refused_before_any_job_runs(tmp_path):
    jobs = [{"id": 1, "text": "t", "questions": ["q"]}]
    with pytest.raises(LongDocError, match="max_new_tokens must be at least 1"):
        batching.run(jobs, tmp_path / "out.jsonl", model=MODEL, max_new_tokens=0, runner="local")
    assert not (tmp_path / "out.jsonl").exists()


def test_ray_options_without_ray_are_refused_not_ignored(monkeypatch):
    monkeypatch.setattr(batching, "ray_available", lambda: False)
    assert batching.choose_runner("auto", None, None, None) == "in-process"
    with pytest.raises(
        LongDocError, match=r"workers=2 needs Ray; Ray is not installed \(pip install 'longdoc\[batch\]'\)"
    ):
        batching.choose_runner("auto", 2, None, None)
    with pytest.raises(LongDocError, match="runner 'ray' needs Ray"):
        batching.choose_runner("ray", None, None, None)
    result = CliRunner().invoke(app, ["batch", "jobs.jsonl", "--out", "a.jsonl", "--ray-address", "auto"])
    assert result.exit_code == 2 and "--ray-address=auto needs Ray" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_summary_rates_and_eta():
    summary = Summary("ray", 2, jobs=12, skipped=2, done=4, failed=1, questions=10, seconds=30.0)
    assert summary.per_minute(summary.handled) == 10.0 and summary.per_minute(summary.questions) == 20.0
    assert summary.eta_seconds == 30.0  # 5 left at 10 a minute
    assert summary.throughput() == "10.0 documents/min, 20.0 questions/min, ETA 30.0s"
    assert summary.line().startswith("batch on Ray, 2 worker(s): 4 done, 1 failed, 2 skipped")
