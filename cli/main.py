"""`longdoc ask FILE... QUESTION` (or `-q Q1 -q Q2`), `longdoc chat FILE...` and `longdoc info`."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from longdoc import LongDocError
from longdoc.documents import SUPPORTED

from .bench import bench_app
from .console import StageStatus, err, fail, out, progress_bar
from .options import command_options, in_flags, parse_device_map, parse_options

FILE_TYPES = " ".join(SUPPORTED)  # the loader's own list

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ask a local LLM about a whole document.")
app.add_typer(bench_app, name="bench")

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


CACHE_HELP = (
    "Folder for the document's reading: loaded from there if it holds one for this model, method and document "
    "(no re-reading); otherwise the document is read and the reading saved there (replacing one that does not fit)."
)
JSON_HELP = "One JSON object per question, one per line: {question, answer, evidence, stats}."
Cache = Annotated[Path | None, typer.Option(help=CACHE_HELP)]
# Options `ask` and `chat` share: the model, the method and its options, generation, loading.
ModelOption = Annotated[str, typer.Option(help="Hugging Face hub id or local model folder.")]
METHOD_HELP = "Prefill method (see `longdoc info`); auto: gemfilter within the trained window, homer past it."
MethodOption = Annotated[str, typer.Option(help=METHOD_HELP)]
TopK = Annotated[int | None, typer.Option(help="Context tokens kept by gemfilter and the budgeted baselines.")]
FilterLayer = Annotated[int | None, typer.Option(help="GemFilter: the selecting layer (default: known or 0.4 depth).")]
ChunkLen = Annotated[int | None, typer.Option(help="homer: most tokens per chunk (max_chunk_len).")]
PrefillChunk = Annotated[int | None, typer.Option(help="Tokens per forward chunk of the prefill (memory vs speed).")]
MethodOptions = Annotated[
    list[str] | None,
    typer.Option("--option", "-o", help="Any other method option as KEY=VALUE, e.g. -o score=softmax."),
]
MaxNewTokens = Annotated[int, typer.Option(help="Most tokens to generate.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DEVICE_MAP_HELP = (
    "Spread a model too large for one GPU: auto (accelerate balances its layers over the GPUs), or a JSON object "
    'of module name -> device, e.g. \'{"model.layers.40": 1, "": 0}\' ("cpu": weights in host memory, run on a '
    "GPU). Default none: the model on --device (with --device auto, one GPU when it fits, else auto)."
)
DeviceMap = Annotated[str | None, typer.Option("--device-map", help=DEVICE_MAP_HELP, show_default=False)]
Dtype = Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")]
Password = Annotated[str | None, typer.Option(help="Password of an encrypted PDF.")]
AsJson = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress on stderr.")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Run the model repo's own code (off by default).")]
CompileDecode = Annotated[
    bool,
    typer.Option(
        "--compile-decode",
        help="On a GPU, decode through torch.compile: ~1.4x the tokens/s after about half a minute of compiling.",
    ),
]


@app.command()
def ask(
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="FILE_OR_QUESTION",
            help=f"Files ({FILE_TYPES}), folders, or - for stdin, then the question. "
            "With --question every argument is a file.",
            show_default=False,
        ),
    ],
    question: Annotated[
        list[str] | None,
        typer.Option("--question", "-q", help="A question; repeat for several, answered from one reading."),
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    method: MethodOption = "auto",
    top_k: TopK = None,
    filter_layer: FilterLayer = None,
    chunk_len: ChunkLen = None,
    prefill_chunk: PrefillChunk = None,
    option: MethodOptions = None,
    max_new_tokens: MaxNewTokens = 256,
    device: Device = "auto",
    device_map: DeviceMap = None,
    dtype: Dtype = "auto",
    password: Password = None,
    cache: Cache = None,
    as_json: AsJson = False,
    evidence: bool = typer.Option(True, "--evidence/--no-evidence", help="Show the kept spans under the answer."),
    quiet: Quiet = False,
    strict: bool = typer.Option(False, help="Fail on a folder's unreadable or unsupported file; default: skip it."),
    trust_remote_code: TrustRemoteCode = False,
    compile_decode: CompileDecode = False,
) -> None:
    """Answer questions about FILE...; answers stream to stdout, progress goes to stderr.

    `longdoc ask FILE... QUESTION`, or `longdoc ask FILE... -q Q1 -q Q2` for several questions from one reading.
    """
    try:
        files, questions = split_arguments(args, question or [])
        options = command_options(
            method, option, top_k=top_k, filter_layer=filter_layer, chunk_len=chunk_len, prefill_chunk=prefill_chunk
        )
        request = AskRequest(
            files, model, method, options, max_new_tokens, device, dtype, password, trust_remote_code, strict,
            device_map=parse_device_map(device_map), compile_decode=compile_decode,
        )  # fmt: skip
        output = Output(as_json, evidence, quiet)
        document, reading = open_reading(request, cache, quiet)
        for number, text in enumerate(questions, 1):
            label = f"question {number}" if len(questions) > 1 else "question"
            answer_question(reading, document, text, request, output, label, echo=len(questions) > 1)
    except LongDocError as exc:
        fail(in_flags(str(exc)))


def split_arguments(args: list[str], questions: list[str]) -> tuple[list[str], list[str]]:
    """With --question every argument is a file; without, the last argument is the one question."""
    if not questions:
        if len(args) < 2:
            raise LongDocError("give FILE... QUESTION, or FILE... --question Q (repeatable)")
        args, questions = args[:-1], args[-1:]
    for text in questions:
        if not text.strip():
            raise LongDocError("the question is empty; ask something about the document")
    return args, questions


@dataclass
class AskRequest:
    files: list[str]
    model: str
    method: str
    options: dict
    max_new_tokens: int
    device: str
    dtype: str
    password: str | None
    trust_remote_code: bool = False
    strict: bool = False
    device_map: str | dict | None = None
    compile_decode: bool = False

    def __post_init__(self) -> None:
        from longdoc.generate import GenerationConfig

        GenerationConfig(max_new_tokens=self.max_new_tokens)  # a bad value fails before the model loads


@dataclass
class Output:
    as_json: bool
    show_evidence: bool
    quiet: bool


def load_engine(request: AskRequest, quiet: bool):
    """The documents and the model, behind a spinner: (Document, LongDoc)."""
    from longdoc.documents import load_documents
    from longdoc.hub import resolve_source

    with StageStatus(quiet) as status:
        status.update("reading")
        document = load_documents(request.files, request.password, strict=request.strict)
        for skipped in document.skipped:
            err.print(f"skipped: {skipped.reason}")
        status.update(f"loading {request.model}")
        resolve_source(request.model)  # a missing or unreachable model fails now, not after torch has loaded
        from longdoc import LongDoc
        from longdoc.model import quiet_transformers

        quiet_transformers()
        doc = LongDoc.from_pretrained(
            request.model,
            method=request.method,
            device=request.device,
            device_map=request.device_map,
            dtype=request.dtype,
            trust_remote_code=request.trust_remote_code,
            compile_decode=request.compile_decode,
            **request.options,
        )
    return document, doc


def open_reading(request: AskRequest, cache: Path | None, quiet: bool):
    """Load the model once and read the documents once (or load the reading saved in `cache`): (Document, Reading)."""
    document, doc = load_engine(request, quiet)
    reading = _load_cached(doc, document, cache, quiet) if cache is not None else None
    if reading is None:
        reading = read_document(doc, document, quiet)
        if _per_question(reading):
            picked = " (auto's pick)" if request.method == "auto" else ""
            note(quiet, f"{reading.tokens} tokens; {reading.method.name}{picked} reads them anew for each question")
        else:
            note(quiet, f"read {reading.tokens} tokens in {_seconds(reading)}, {_held(reading)}")
        if cache is not None:
            _save_cached(reading, cache, quiet)
    return document, reading


def read_document(doc, document, quiet: bool):
    """doc.read with its progress (running out of memory is the library's one-line LongDocError)."""
    with staged_progress(quiet, "reading") as progress:
        return doc.read(document, progress=progress)


def _load_cached(doc, document, cache: Path, quiet: bool):
    """The reading saved in `cache`, or None (nothing there, or one refused: said on stderr, then read again)."""
    from longdoc.reading import META

    if not (cache / META).is_file():
        return None
    try:
        reading = doc.load_reading(cache, source=document)
    except LongDocError as exc:
        # The library's advice (read again, save one) is what the CLI does next, and says so.
        reason = re.sub(r"; (read the document again|save one with reading\.save).*$", "", str(exc))
        note(quiet, f"not using the saved reading: {reason}; reading again and saving over it", always=True)
        return None
    note(quiet, f"loaded the saved reading from {cache}: {reading.tokens} tokens, {_held(reading)}")
    return reading


def _save_cached(reading, cache: Path, quiet: bool) -> None:
    if _per_question(reading):
        note(quiet, f"--method {reading.method.name} recomputes per question: no reading to save in {cache}")
        return
    reading.save(cache)
    note(quiet, f"saved the reading to {cache} ({_mib(reading.nbytes)})")


def _per_question(reading) -> bool:
    """Nothing is read ahead of the questions: the method's work depends on each question."""
    return reading.cache is None or reading.cache.cache is None


def _seconds(reading) -> str:
    return f"{reading.cache.seconds:.2f}s" if reading.cache is not None else "0s"


def _held(reading) -> str:
    if _per_question(reading):
        return f"--method {reading.method.name} recomputes per question"
    return f"{_mib(reading.nbytes)} held on {reading.cache.device}"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def note(quiet: bool, text: str, always: bool = False) -> None:
    """A line on stderr, unless --quiet (a refused saved reading is said even then)."""
    if always or not quiet:
        err.print(text, soft_wrap=True)


@contextmanager
def staged_progress(quiet: bool, label: str) -> Iterator:
    """A progress hook whose bars are named `label: stage` (the reading and each question apart)."""
    bar = progress_bar(quiet, transient=True)
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(f"{label}: {stage}", total=total)
        bar.update(tasks[stage], completed=done, total=total)

    with bar:
        yield progress


def answer_question(
    reading, document, question: str, request: AskRequest, output: Output, label: str, echo: bool = False
) -> None:
    """Stream one answer from the reading to stdout (or one JSON line), its evidence, and a summary on stderr;
    `echo` heads the answer with its question (several questions on one command line)."""
    if echo and not output.as_json:
        out.print(Text.assemble((f"{label}: ", "bold"), question), soft_wrap=True)
    with staged_progress(output.quiet, label) as progress:
        stream = reading.stream(question, progress=progress, max_new_tokens=request.max_new_tokens)
    for piece in stream:
        if not output.as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    answer = stream.answer
    from longdoc.batch import answer_record

    record = answer_record(question, answer, document)
    spans = record["evidence"]
    if output.as_json:
        print(json.dumps(record), flush=True)
    else:
        sys.stdout.write("\n")
        if output.show_evidence and spans:
            print_evidence(spans, several_files=len(document.files) > 1)
        sys.stdout.flush()
    note(output.quiet, summary(answer.stats))


def print_evidence(spans: list[dict], several_files: bool) -> None:
    out.print(Text.assemble("\n", ("Evidence", "bold"), " (kept spans, strongest first):"))
    for span in spans[:5]:
        where = Path(span["file"]).name + " " if several_files else ""
        where += f"p.{span['page']} " if span["page"] else ""
        out.print(f"  {where}[{span['start']}:{span['end']}] {span['quote']}", soft_wrap=True)


def summary(s) -> str:
    """One line per question: what was kept, whether the reading was reused, its size and where it is held."""
    reading = f"reading {s.reading}"
    if s.reading != "none":
        reading += f" ({s.reused_tokens} tokens reused, {_mib(s.reading_bytes)} on {s.reading_device})"
    return (
        f"{s.method}: kept {s.tokens_kept}/{s.tokens_in} tokens, {reading}, prefill {s.prefill_seconds:.2f}s, "
        f"{s.tokens_out} tokens in {s.decode_seconds:.2f}s"
    )


@app.command()
def chat(
    files: Annotated[
        list[str],
        typer.Argument(metavar="FILE", help=f"Files ({FILE_TYPES}), folders.", show_default=False),
    ],
    model: ModelOption = DEFAULT_MODEL,
    method: MethodOption = "auto",
    top_k: TopK = None,
    filter_layer: FilterLayer = None,
    chunk_len: ChunkLen = None,
    prefill_chunk: PrefillChunk = None,
    option: MethodOptions = None,
    max_new_tokens: MaxNewTokens = 256,
    device: Device = "auto",
    device_map: DeviceMap = None,
    dtype: Dtype = "auto",
    password: Password = None,
    cache: Cache = None,
    as_json: AsJson = False,
    evidence: bool = typer.Option(True, "--evidence/--no-evidence", help="Show the kept spans under each answer."),
    quiet: Quiet = False,
    trust_remote_code: TrustRemoteCode = False,
    compile_decode: CompileDecode = False,
) -> None:
    """Read FILE... once, then answer questions typed at the prompt, one per line; /quit or end of input stops.

    Works from a pipe too: `printf 'Q1\\nQ2\\n' | longdoc chat FILE`.
    """
    try:
        if "-" in files:
            raise LongDocError("chat reads its questions from stdin; give the document as a file, not -")
        options = command_options(
            method, option, top_k=top_k, filter_layer=filter_layer, chunk_len=chunk_len, prefill_chunk=prefill_chunk
        )
        request = AskRequest(
            files, model, method, options, max_new_tokens, device, dtype, password, trust_remote_code,
            device_map=parse_device_map(device_map), compile_decode=compile_decode,
        )  # fmt: skip
        document, reading = open_reading(request, cache, quiet)
    except LongDocError as exc:
        fail(in_flags(str(exc)))
    failed = converse(reading, document, request, Output(as_json, evidence, quiet))
    if failed:
        raise typer.Exit(2)


QUIT = {"/quit", "/exit"}


def converse(reading, document, request: AskRequest, output: Output) -> bool:
    """Answer each line of stdin from the reading; a refused question is one error line and the chat goes on.
    True if any question was refused (the exit code says so)."""
    interactive = sys.stdin.isatty()
    failed, number = False, 0
    while True:
        if interactive:
            err.print("> ", end="")
        line = sys.stdin.readline()
        if not line or line.strip() in QUIT:
            return failed
        if not line.strip():
            continue
        number += 1
        try:
            answer_question(reading, document, line.strip(), request, output, label=f"question {number}")
        except LongDocError as exc:
            err.print(Text.assemble(("error:", "bold red"), " ", in_flags(str(exc))), soft_wrap=True)
            failed = True
        if interactive and not output.as_json:
            sys.stdout.write("\n")


BATCH_JOBS_HELP = (
    'JSON Lines, one document a line: {"id", "files": [...] or "text", "questions": [...], "method"?, "options"?}; '
    "relative files are taken from this file's folder."
)
Runner = Annotated[str, typer.Option(help="auto (Ray when installed), ray, or local (this process, one worker).")]
Workers = Annotated[int | None, typer.Option(help="Ray workers, one loaded model each (default: one per GPU, or 1).")]
GpusPerWorker = Annotated[float | None, typer.Option(help="GPUs each Ray worker holds (default: 1 with GPUs, else 0).")]
RayAddress = Annotated[str | None, typer.Option(help="Join this running Ray cluster (e.g. auto); default: start one.")]


@app.command()
def batch(
    jobs: Annotated[Path, typer.Argument(help=BATCH_JOBS_HELP, show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Answers, one JSON line per document, appended to.")],
    model: ModelOption = DEFAULT_MODEL,
    method: MethodOption = "auto",
    top_k: TopK = None,
    filter_layer: FilterLayer = None,
    chunk_len: ChunkLen = None,
    prefill_chunk: PrefillChunk = None,
    option: MethodOptions = None,
    max_new_tokens: MaxNewTokens = 256,
    device: Device = "auto",
    device_map: DeviceMap = None,
    dtype: Dtype = "auto",
    password: Password = None,
    runner: Runner = "auto",
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    ray_address: RayAddress = None,
    retry_failed: bool = typer.Option(False, help="Answer again the ids whose last line in --out is an error."),
    quiet: Quiet = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Answer many documents' questions, each document read once; resumable: ids already in --out are skipped.

    Progress (documents and questions per minute, ETA) and a summary go to stderr; exit code 2 if a line failed.
    """
    from longdoc import batch as batching

    try:
        options = command_options(
            method, option, top_k=top_k, filter_layer=filter_layer, chunk_len=chunk_len, prefill_chunk=prefill_chunk
        )
        placement = parse_device_map(device_map)
        from longdoc.model import quiet_transformers

        quiet_transformers()
        with progress_bar(quiet) as bar:
            task = bar.add_task("batch", total=None)

            def show(summary: batching.Summary) -> None:
                described = f"batch ({summary.mode}): {summary.throughput()}"
                bar.update(task, completed=summary.handled, total=summary.pending, description=described)

            summary = batching.run(
                jobs,
                out,
                model=model,
                method=method,
                options=options,
                device=device,
                device_map=placement,
                dtype=dtype,
                max_new_tokens=max_new_tokens,
                password=password,
                trust_remote_code=trust_remote_code,
                runner=runner,
                workers=workers,
                gpus_per_worker=gpus_per_worker,
                ray_address=ray_address,
                retry_failed=retry_failed,
                progress=show,
            )
    except LongDocError as exc:
        fail(in_flags(str(exc)))
    except KeyboardInterrupt:
        err.print(f"interrupted: the lines in {out} are whole; run the same command again to go on")
        raise typer.Exit(130) from None
    err.print(summary.line())
    if summary.failed:
        raise typer.Exit(2)


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
        fail(in_flags(str(exc)))


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
def tune(
    model: str = typer.Argument(..., help="Hub id or local model folder."),
    books: Annotated[Path, typer.Option(help="Folder of .txt books: needles are hidden in them.")] = Path(
        "../shared/corpus/books"
    ),
    samples: int = typer.Option(8, help="Needles asked per setting (more: slower, surer)."),
    lengths: str = typer.Option("", help="Haystack lengths in tokens, comma-separated (default: half the window)."),
    top_k: int = typer.Option(256, help="GemFilter's context tokens kept while tuning."),
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="A GemFilter option held fixed, KEY=VALUE.")
    ] = None,
    device: str = typer.Option("auto"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Measure MODEL's best GemFilter settings and HOMER's calibration; write them to its profile (longdoc.json)."""
    try:
        _tune(model, books, samples, lengths, top_k, option or [], device, quiet)
    except LongDocError as exc:
        fail(in_flags(str(exc)))


def _tune(model, books, samples, lengths, top_k, pairs, device, quiet) -> None:
    from longdoc import LongDoc
    from longdoc.bench.needle import Haystacks, load_books
    from longdoc.profile import profile_path, write_profile
    from longdoc.tune import tune as measure_profile

    if samples < 1:
        raise LongDocError(f"--samples must be at least 1, got {samples}")
    chosen = load_books(books, held_out=True) if books.is_dir() else {}
    chosen = chosen or (load_books(books) if books.is_dir() else {})
    if not chosen:
        raise LongDocError(f"no .txt books in {books}; pass --books DIR")
    base = LongDoc.from_pretrained(model, method="full", device=device)
    window = base.arch.trained_window or 4096
    length_list = [int(n) for n in lengths.split(",") if n.strip()] if lengths.strip() else [window // 2]
    options = {"top_k": top_k, **parse_options(pairs)}
    path = profile_path(model)
    with staged_progress(quiet, "tune") as progress:
        data = measure_profile(
            base, Haystacks(chosen, base.tokenizer), list(chosen.values()), path.parent,
            samples=samples, lengths=length_list, options=options, progress=progress,
        )  # fmt: skip
    write_profile(path, data)
    gemfilter, homer = data["methods"]["gemfilter"], data["methods"]["homer"]
    settings = ", ".join(f"{k}={v}" for k, v in gemfilter["options"].items())
    err.print(
        f"gemfilter: {settings} (exact {gemfilter['accuracy']:.2f}, grounded {gemfilter['grounded']:.2f} with"
        f" {gemfilter['needles']} needles a haystack)",
        soft_wrap=True,
    )
    err.print(f"homer: calibration={homer['options']['calibration']} (needle accuracy {homer.get('accuracy', 0):.2f})")
    err.print(f"wrote {path}", soft_wrap=True)


@app.command()
def info() -> None:
    """Versions, devices, methods and supported model families."""
    import torch
    import transformers

    import longdoc
    from longdoc.arch import FAMILY_NAMES
    from longdoc.methods import ALIASES, METHODS

    out.print(f"longdoc {longdoc.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out.print(f"device cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        out.print("device: cpu (no CUDA GPU visible)")
    out.print(f"methods: {', '.join(METHODS)}")
    named = (
        f"{alias} = {name} with {', '.join(f'{k}={v}' for k, v in preset.items())}"
        for alias, (name, preset) in ALIASES.items()
    )
    out.print(f"method aliases: {'; '.join(named)}")
    out.print(f"model families: {', '.join(FAMILY_NAMES.values())}")
    out.print(f"default model: {DEFAULT_MODEL}")


if __name__ == "__main__":
    app()
