"""Many documents, each read once and asked its questions: `longdoc batch JOBS.jsonl --out ANSWERS.jsonl`.

Jobs are JSON Lines, one document a line: `{"id", "files": [...] | "text", "questions": [...], "method"?,
"options"?}`. Each answer line is `{"id", "answers": [{question, answer, evidence, stats}], "skipped", "error"}`.

Ray Data distributes the work when it is installed (`pip install 'longdoc[batch]'`): an actor pool whose
workers each hold one loaded model (one worker per GPU by default), locally or on a running cluster. Without
Ray the same jobs run in this process, one after another. Either way only this process writes the output:
each line in one write, flushed and fsynced, so a crash or Ctrl-C leaves at most a partial last line, which
the next run drops before it skips the ids already answered.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import LongDocError
from .generate import GenerationConfig
from .methods import Method, parse_method
from .model import check_device_map, quiet_transformers

INSTALL_HINT = "pip install 'longdoc[batch]'"
RUNNERS = ("auto", "ray", "local")
WORKER_ERROR = "longdoc.errors.LongDocError: "  # how Ray's traceback text names our error
JOB_KEYS = {"id", "files", "text", "questions", "method", "options"}


@dataclass(frozen=True)
class Job:
    """One input line: a document (files or inline text) and the questions to answer from one reading of it."""

    id: str | int
    questions: list[str]
    files: list[str] | None = None
    text: str | None = None
    method: str | None = None
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    """What every worker loads and how it answers; a job's own method and options replace the defaults."""

    model: str
    method: str | Method = "auto"
    options: dict = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = 256
    password: str | None = None
    trust_remote_code: bool = False
    device_map: str | dict | None = None  # "auto" or a dict: each worker spreads its model over its GPUs

    def __post_init__(self) -> None:
        GenerationConfig(max_new_tokens=self.max_new_tokens)  # a bad value fails before any job starts


@dataclass
class Summary:
    """How a run went; rates count the documents handled by this run over its whole time, model loading included."""

    mode: str  # "ray" or "in-process"
    workers: int
    jobs: int  # lines in the input
    skipped: int  # already in the output
    done: int = 0
    failed: int = 0
    questions: int = 0  # answered by this run
    seconds: float = 0.0
    dropped_bytes: int = 0  # a partial last line left by an interrupted run, removed from the output

    @property
    def handled(self) -> int:
        return self.done + self.failed

    @property
    def pending(self) -> int:
        return self.jobs - self.skipped

    def per_minute(self, count: int) -> float:
        return 60.0 * count / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.handled / self.seconds if self.seconds > 0 else 0.0
        return (self.pending - self.handled) / rate if rate > 0 else None

    def throughput(self) -> str:
        eta = self.eta_seconds
        return (
            f"{self.per_minute(self.handled):.1f} documents/min, {self.per_minute(self.questions):.1f} questions/min"
            + (f", ETA {clock_time(eta)}" if eta is not None and self.handled < self.pending else "")
        )

    def line(self) -> str:
        where = "in-process" if self.mode == "in-process" else f"on Ray, {self.workers} worker(s)"
        return (
            f"batch {where}: {self.done} done, {self.failed} failed, {self.skipped} skipped (already answered); "
            f"{self.questions} questions in {clock_time(self.seconds)}, {self.throughput()}"
            + (f"; dropped a partial last line ({self.dropped_bytes} bytes)" if self.dropped_bytes else "")
        )


def clock_time(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:.1f}s"


# ----- jobs -----


def read_jobs(jobs: str | Path | Iterable[dict]) -> list[Job]:
    """Every job, checked before any model is loaded: a JSONL path (files relative to its folder) or dicts."""
    if isinstance(jobs, (str, Path)):
        path = Path(jobs)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise LongDocError(f"cannot read the jobs file {path}: {exc.strerror or exc}") from None
        raw = [(f"{path} line {n}", _json_line(line, f"{path} line {n}")) for n, line in enumerate(lines, 1)]
        parsed = [parse_job(item, where, path.parent) for where, item in raw if item is not None]
    else:
        parsed = [parse_job(item, f"job {n}", None) for n, item in enumerate(jobs, 1)]
    seen: set = set()
    for job in parsed:
        if job.id in seen:
            raise LongDocError(f"job id {job.id!r} appears twice; ids key the answers, so each must be unique")
        seen.add(job.id)
    return parsed


def _json_line(line: str, where: str) -> object | None:
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise LongDocError(f"{where} is not JSON ({exc.msg}); write one job object per line") from None


def parse_job(item: object, where: str, base: Path | None) -> Job:
    """A job from its dict, every field checked; the message names the line."""
    if not isinstance(item, dict):
        raise LongDocError(f"{where}: a job is a JSON object with id, files or text, and questions")
    unknown = set(item) - JOB_KEYS
    if unknown:
        keys = ", ".join(sorted(JOB_KEYS))
        raise LongDocError(f"{where}: unknown key {', '.join(sorted(unknown))}; a job has {keys}")
    job_id = item.get("id")
    if isinstance(job_id, bool) or not isinstance(job_id, (str, int)):
        raise LongDocError(f"{where}: give each job an id (a string or an integer)")
    questions = item.get("questions")
    if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise LongDocError(f"{where}: questions must be a list of non-empty strings")
    method, options = item.get("method"), item.get("options", {})
    if method is not None and not isinstance(method, str):
        raise LongDocError(f"{where}: method must be a method's name")
    if not isinstance(options, dict):
        raise LongDocError(f"{where}: options must be an object of method options")
    files, text = _job_document(item, where, base)
    return Job(job_id, questions, files, text, method, options)


def _job_document(item: dict, where: str, base: Path | None) -> tuple[list[str] | None, str | None]:
    """(files, text), exactly one given; relative files are taken from `base` and made absolute, so that a
    worker started in another folder finds them."""
    files, text = item.get("files"), item.get("text")
    if (files is None) == (text is None):
        raise LongDocError(f"{where}: give either files (a list of paths) or text, not both or neither")
    if text is not None:
        if not isinstance(text, str):
            raise LongDocError(f"{where}: text must be a string")
        return None, text
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise LongDocError(f"{where}: files must be a non-empty list of paths")
    return [os.path.abspath((base or Path()) / f) for f in files], None  # "docs/../a.pdf" as "a.pdf": normalised


# ----- the output -----


class AnswerLog:
    """The output file: the ids it holds, and whole lines appended durably (one write, flush, fsync)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dropped_bytes = self._drop_partial_line()
        self.errors: dict[str | int, str | None] = self._recorded()  # id -> error of its last line

    def answered(self, job_id: str | int, retry_failed: bool) -> bool:
        if job_id not in self.errors:
            return False
        return not (retry_failed and self.errors[job_id] is not None)

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.errors[record["id"]] = record["error"]

    def _drop_partial_line(self) -> int:
        """A last line without its newline was cut short by a crash: truncate it away, return its size."""
        if not self.path.is_file():
            return 0
        with open(self.path, "rb+") as file:
            data = file.read()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                file.truncate(keep)
                file.flush()
                os.fsync(file.fileno())
        return len(data) - keep

    def _recorded(self) -> dict[str | int, str | None]:
        if not self.path.is_file():
            return {}
        errors = {}
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or "id" not in record:
                raise LongDocError(
                    f"{self.path} line {n} is not an answer line; give --out a new file or remove that line"
                )
            errors[record["id"]] = record.get("error")
        return errors


# ----- answering -----


def answer_record(question: str, answer, document) -> dict:
    """One answer as JSON: text, evidence placed in its file and page (scores to 4 places), stats."""
    spans = [{**span, "score": round(span["score"], 4)} for span in document.locate_evidence(answer.evidence)]
    return {"question": question, "answer": answer.text, "evidence": spans, "stats": asdict(answer.stats)}


class Answerer:
    """One loaded model answering whole jobs: this process's, or each Ray worker's (`RayAnswerer`)."""

    def __init__(self, settings: Settings) -> None:
        from .api import LongDoc

        self.settings = s = settings
        self.engine = LongDoc.from_pretrained(
            s.model, s.method, device=s.device, device_map=s.device_map, dtype=s.dtype,
            trust_remote_code=s.trust_remote_code, **s.options,
        )  # fmt: skip

    def answer(self, job: Job) -> dict:
        """Read the document once, answer every question from that reading; a LongDocError is the line's error."""
        import torch

        answers: list[dict] = []
        skipped: list[str] = []
        try:
            document = self._document(job)
            skipped = [s.reason for s in document.skipped]
            reading = self._engine_for(job).read(document)
            for question in job.questions:
                answer = reading.ask(question, max_new_tokens=self.settings.max_new_tokens)
                answers.append(answer_record(question, answer, document))
            error = None
        except LongDocError as exc:
            error = str(exc)
        except torch.OutOfMemoryError:
            error = "out of GPU memory on this document; try method Homer(), a smaller top_k, or more GPU memory"
        finally:
            # Another job's document will not share this reading: free its memory now rather than let the store
            # move it to host memory and keep it there.
            self.engine.store.clear()
        return {"id": job.id, "answers": answers, "skipped": skipped, "error": error}

    def _document(self, job: Job):
        from .documents import Document, load_documents

        if job.files is not None:
            return load_documents(job.files, self.settings.password)
        if not job.text.strip():
            raise LongDocError("the text is empty; give the document's text or its files")
        return Document(text=job.text, source="text")

    def _engine_for(self, job: Job):
        """This worker's model with the job's method: its own options if it names one, else the defaults' plus its."""
        if job.method is None and not job.options:
            return self.engine
        if job.method is not None:
            return self.engine.with_method(job.method, **job.options)
        s = self.settings
        if isinstance(s.method, Method):
            return self.engine.with_method(s.method.name, **{**s.method.options(), **job.options})
        return self.engine.with_method(s.method, **{**s.options, **job.options})


class RayAnswerer(Answerer):
    """An Answerer in a Ray worker process: transformers kept quiet there, jobs and answer lines as JSON columns."""

    def __init__(self, settings: Settings) -> None:
        quiet_transformers()
        super().__init__(settings)

    def __call__(self, batch: dict) -> dict:
        records = [self.answer(Job(**json.loads(text))) for text in batch["job"]]
        return {"record": [json.dumps(record, ensure_ascii=False) for record in records]}


def answer_in_process(jobs: list[Job], settings: Settings) -> Iterator[dict]:
    """The jobs one after another on one model loaded here (no Ray)."""
    answerer = Answerer(settings)
    for job in jobs:
        yield answerer.answer(job)


# ----- Ray -----


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


@contextmanager
def ray_connection(address: str | None) -> Iterator:
    """Use Ray as already initialised by the caller, or start a local one (or join `address`) and shut it after."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def ray_pool_size(ray, workers: int | None, gpus_per_worker: float | None) -> tuple[int, float]:
    """(workers, GPUs each): by default one worker per GPU of the cluster, or one on CPU; refused if it cannot fit."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    per_worker = gpus_per_worker if gpus_per_worker is not None else (1.0 if gpus else 0.0)
    if per_worker < 0:
        raise LongDocError("gpus_per_worker must be 0 or more")
    count = workers if workers is not None else (max(1, int(gpus // per_worker)) if per_worker else 1)
    if count < 1:
        raise LongDocError("workers must be 1 or more")
    if count * per_worker > gpus:
        raise LongDocError(
            f"workers={count} with gpus_per_worker={per_worker:g} need {count * per_worker:g} GPUs; the Ray cluster "
            f"has {gpus:g}"
        )
    if count > cpus:
        raise LongDocError(f"workers={count} need a CPU each; the Ray cluster has {cpus:g}")
    return count, per_worker


def answer_on_ray(ray, jobs: list[Job], settings: Settings, workers: int, gpus_per_worker: float) -> Iterator[dict]:
    """An actor pool of `workers`, each holding one model; answer lines stream back here as they finish."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan and timing lines are not the user's business
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours are on the driver's stderr
    context.enable_operator_progress_bars = False
    items = [{"job": json.dumps(asdict(job), ensure_ascii=False)} for job in jobs]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        RayAnswerer,
        fn_constructor_kwargs={"settings": settings},  # pickled whole: a Method object stays one
        batch_size=1,  # one document per call: each answer line is written as soon as it exists
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
        num_gpus=gpus_per_worker or None,
    )
    try:
        for row in dataset.iter_rows():
            yield json.loads(row["record"])
    except ray.exceptions.RayError as exc:  # a worker that could not start (model, device): say why in one line
        said = [line for line in str(exc).splitlines() if line.startswith(WORKER_ERROR)]
        if not said:
            raise
        raise LongDocError(f"a Ray worker failed: {said[-1][len(WORKER_ERROR) :]}") from None


# ----- the run -----


def run(
    jobs: str | Path | Iterable[dict],
    out: str | Path,
    *,
    model: str,
    method: str | Method = "auto",
    options: dict | None = None,
    device: str = "auto",
    device_map: str | dict | None = None,
    dtype: str = "auto",
    max_new_tokens: int = 256,
    password: str | None = None,
    trust_remote_code: bool = False,
    runner: str = "auto",
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    ray_address: str | None = None,
    retry_failed: bool = False,
    progress: Callable[[Summary], None] | None = None,
) -> Summary:
    """Answer every job not yet in `out`, appending one line per job; returns the run's summary.

    runner: "ray" (Ray Data actor pool), "local" (this process, one worker) or "auto" (ray when installed).
    `device_map` ("auto" or a dict of module name -> device) spreads each worker's model over the GPUs it holds.
    Ids already in `out` are skipped; with `retry_failed`, those whose last line is an error are answered again
    (a new line for the id follows the old one: the last line of an id is its answer).
    """
    started = time.perf_counter()
    check_device_map(device_map)  # fails now, not in every worker
    mode = choose_runner(runner, workers, gpus_per_worker, ray_address)
    job_list = read_jobs(jobs)
    settings = Settings(
        _model_path(model), method, dict(options or {}), device, dtype, max_new_tokens, password, trust_remote_code,
        device_map,
    )  # fmt: skip
    parse_method(method, settings.options)  # a bad default method fails now, not in every worker
    log = AnswerLog(Path(out))
    pending = [job for job in job_list if not log.answered(job.id, retry_failed)]
    summary = Summary(mode, 1, len(job_list), len(job_list) - len(pending), dropped_bytes=log.dropped_bytes)
    if not pending:
        summary.seconds = time.perf_counter() - started
        return summary
    if mode == "in-process":
        _write(answer_in_process(pending, settings), log, summary, started, progress)
        return summary
    with ray_connection(ray_address) as ray:
        summary.workers, per_worker = ray_pool_size(ray, workers, gpus_per_worker)
        _write(answer_on_ray(ray, pending, settings, summary.workers, per_worker), log, summary, started, progress)
    return summary


def choose_runner(runner: str, workers: int | None, gpus_per_worker: float | None, ray_address: str | None) -> str:
    """ "ray" or "in-process"; Ray's options without Ray are refused, never ignored."""
    if runner not in RUNNERS:
        raise LongDocError(f"unknown runner '{runner}'; choose one of: {', '.join(RUNNERS)}")
    if runner == "ray" and not ray_available():
        raise LongDocError(f"runner 'ray' needs Ray: {INSTALL_HINT}")
    if runner == "ray" or (runner == "auto" and ray_available()):
        return "ray"
    ray_options = {"workers": workers, "gpus_per_worker": gpus_per_worker, "ray_address": ray_address}
    asked = [f"{name}={value}" for name, value in ray_options.items() if value is not None]
    if asked:
        why = "runner 'local' is" if runner == "local" else f"Ray is not installed ({INSTALL_HINT}), so this run is"
        need = "needs" if len(asked) == 1 else "need"
        raise LongDocError(f"{', '.join(asked)} {need} Ray; {why} one worker in this process")
    return "in-process"


def _model_path(model: str) -> str:
    """A local model folder as an absolute path, so workers started elsewhere find it; a hub id as it is. A model
    that is neither fails here, before workers start (the path must then hold on every worker too)."""
    from .hub import resolve_source

    resolve_source(model)
    local = Path(model).expanduser()
    return str(local.absolute()) if local.exists() else model


def _write(records: Iterator[dict], log: AnswerLog, summary: Summary, started: float, progress) -> None:
    if progress is not None:
        progress(summary)
    for record in records:
        log.append(record)
        if record["error"] is None:
            summary.done += 1
        else:
            summary.failed += 1
        summary.questions += len(record["answers"])
        summary.seconds = time.perf_counter() - started
        if progress is not None:
            progress(summary)
    summary.seconds = time.perf_counter() - started
