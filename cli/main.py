"""`longdoc ask FILE... QUESTION` and `longdoc info`."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from longdoc import LongDocError

from .bench import bench_app
from .console import StageStatus, err, fail, out, progress_bar
from .options import method_options, parse_options

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ask a local LLM about a whole document.")
app.add_typer(bench_app, name="bench")

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@app.command()
def ask(
    files: Annotated[
        list[str],
        typer.Argument(help="Files (.pdf .docx .epub .html .md .txt), folders, or - for stdin.", show_default=False),
    ],
    question: str = typer.Argument(..., help="The question about the documents.", show_default=False),
    model: str = typer.Option(DEFAULT_MODEL, help="Hugging Face hub id or local model folder."),
    method: str = typer.Option("gemfilter", help="Prefill method (see `longdoc info`)."),
    top_k: int | None = typer.Option(None, help="Context tokens kept by gemfilter and the budgeted baselines."),
    filter_layer: int | None = typer.Option(None, help="GemFilter: the selecting layer (default: known or 0.4 depth)."),
    chunk_len: int | None = typer.Option(None, help="homer: max tokens per chunk; full/gemfilter: prefill chunk."),
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="Any other method option as KEY=VALUE, e.g. -o score=softmax."),
    ] = None,
    max_new_tokens: int = typer.Option(256, help="Most tokens to generate."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="auto, bfloat16, float16 or float32."),
    password: str | None = typer.Option(None, help="Password of an encrypted PDF."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    evidence: bool = typer.Option(True, "--evidence/--no-evidence", help="Show the kept spans under the answer."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
    strict: bool = typer.Option(False, help="Fail on a folder's unreadable or unsupported file; default: skip it."),
    trust_remote_code: bool = typer.Option(False, help="Run the model repo's own code (off by default)."),
) -> None:
    """Answer QUESTION about FILE...; the answer streams to stdout, progress goes to stderr."""
    try:
        options = method_options(method, top_k=top_k, filter_layer=filter_layer, chunk_len=chunk_len)
        options.update(parse_options(option or []))
        request = AskRequest(files, question, model, method, options, max_new_tokens, device, dtype, password, strict)
        _ask(request, as_json, evidence, quiet, trust_remote_code)
    except LongDocError as exc:
        fail(str(exc))


@dataclass
class AskRequest:
    files: list[str]
    question: str
    model: str
    method: str
    options: dict
    max_new_tokens: int
    device: str
    dtype: str
    password: str | None
    strict: bool = False


def _ask(request: AskRequest, as_json: bool, show_evidence: bool, quiet: bool, trust_remote_code: bool) -> None:
    from longdoc.documents import load_documents
    from longdoc.hub import resolve_source

    if not request.question.strip():
        raise LongDocError("the question is empty; ask something about the document")
    with StageStatus(quiet) as status:
        status.update("reading")
        document = load_documents(request.files, request.password, strict=request.strict)
        for skipped in document.skipped:
            err.print(f"skipped: {skipped.reason}")
        status.update(f"loading {request.model}")
        resolve_source(request.model)  # a missing or unreachable model fails now, not after torch has loaded
        from longdoc import LongDoc

        logging.getLogger("transformers").setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        doc = LongDoc.from_pretrained(
            request.model,
            method=request.method,
            device=request.device,
            dtype=request.dtype,
            trust_remote_code=trust_remote_code,
            **request.options,
        )
    bar = progress_bar(quiet, transient=True)
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    answer = None
    with bar:
        pieces = doc.stream_answer(
            document.text, request.question, progress=progress, max_new_tokens=request.max_new_tokens
        )
        first = next(pieces)
    for piece in _chain(first, pieces):
        if isinstance(piece, str):
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        else:
            answer = piece
    spans = [{**span, "score": round(span["score"], 4)} for span in document.locate_evidence(answer.evidence)]
    if as_json:
        print(json.dumps({"answer": answer.text, "evidence": spans, "stats": asdict(answer.stats)}, indent=2))
        return
    sys.stdout.write("\n")
    if show_evidence and spans:
        out.print(Text.assemble("\n", ("Evidence", "bold"), " (kept spans, strongest first):"))
        several = len(document.files) > 1
        for span in spans[:5]:
            where = Path(span["file"]).name + " " if several else ""
            where += f"p.{span['page']} " if span["page"] else ""
            out.print(f"  {where}[{span['start']}:{span['end']}] {span['quote']}", soft_wrap=True)
    s = answer.stats
    if not quiet:
        err.print(
            f"{s.method}: kept {s.tokens_kept}/{s.tokens_in} tokens, prefill {s.prefill_seconds:.2f}s, "
            f"{s.tokens_out} tokens in {s.decode_seconds:.2f}s"
        )


def _chain(first, rest):
    yield first
    yield from rest


@app.command()
def calibrate(
    model: str = typer.Argument(..., help="Hub id or local model folder."),
    text: Annotated[list[Path] | None, typer.Option(help="Plain-text files to measure on (default: --books).")] = None,
    books: Annotated[Path, typer.Option(help="Folder of .txt books, used without --text.")] = Path(
        "../shared/corpus/books"
    ),
    samples: int = typer.Option(16, help="Text windows averaged."),
    length: int | None = typer.Option(None, help="Window in tokens (default: HOMER's chunk, min(window/2, 4096))."),
    out: Annotated[
        Path | None, typer.Option(help="Output file (default: longdoc-calibration.safetensors in MODEL).")
    ] = None,
    device: str = typer.Option("auto"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Measure HOMER's positional calibration for MODEL and save it; HOMER then uses it on its own."""
    try:
        _calibrate(model, text or [], books, samples, length, out, device, quiet)
    except LongDocError as exc:
        fail(str(exc))


def _calibrate(model, texts, books, samples, length, out, device, quiet) -> None:
    from longdoc import LongDoc
    from longdoc.bench.needle import strip_gutenberg
    from longdoc.calibration import FILE_NAME, measure, save, text_windows
    from longdoc.methods.homer import default_chunk_len

    if out is None:
        if not Path(model).is_dir():
            raise LongDocError(f"'{model}' is not a local folder; pass --out FILE and give HOMER -o calibration=FILE")
        out = Path(model) / FILE_NAME
    paths = list(texts) or sorted(books.glob("*.txt"))
    if not paths:
        raise LongDocError(f"no text to measure on: {books} has no .txt files; pass --text FILE")
    for path in paths:
        if not path.is_file():
            raise LongDocError(f"file not found: {path}")
    doc = LongDoc.from_pretrained(model, method="full", device=device)
    length = length or default_chunk_len(doc.arch)
    corpus = [strip_gutenberg(p.read_text(encoding="utf-8", errors="replace")) for p in paths]
    windows = text_windows(doc.tokenizer, corpus, length, samples)
    with progress_bar(quiet) as bar:
        task = bar.add_task("calibrate", total=samples)
        bias = measure(doc.arch, windows, lambda stage, done, total: bar.update(task, completed=done))
    save(out, bias, source=", ".join(p.name for p in paths[:20]), samples=samples)
    err.print(f"saved {tuple(bias.shape)} layer x distance bias to {out}")


@app.command()
def info() -> None:
    """Versions, devices, methods and supported model families."""
    import torch
    import transformers

    import longdoc
    from longdoc.arch import FAMILY_NAMES
    from longdoc.methods import METHODS

    out.print(f"longdoc {longdoc.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out.print(f"device cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        out.print("device: cpu (no CUDA GPU visible)")
    out.print(f"methods: {', '.join(METHODS)}")
    out.print(f"model families: {', '.join(FAMILY_NAMES.values())}")
    out.print(f"default model: {DEFAULT_MODEL}")


if __name__ == "__main__":
    app()
