"""Documents per hour through `longdoc.batch.run` on one GPU, with and without reading reuse.

The model is Llama-3.1-8B's shape with random weights (saved once to a folder, with the bundled model's tokenizer,
whose ids all fit the larger vocabulary), so nothing is downloaded. Documents are `--tokens` long, cut from the
haystack text; each has `--questions` questions. With reuse, one job per document (read once, every question from
the reading); without, one job per question (each reads the document again). Rates are given over the whole run
(model loading included) and over the steady part (first answer line to last), since loading an 8B model is a
large share of a short run.

    python benchmarks/batch_throughput.py OUT [--documents 40] [--tokens 32768] [--questions 5]
    python benchmarks/batch_throughput.py OUT --model examples/models/needle-tiny --device cpu --tokens 1024 \\
        --documents 3 --questions 2 --top-k 256                        # a quick check of the script on CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from longdoc import batch
from longdoc.bench.shapes import random_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "models" / "needle-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def model_folder(folder: Path, shape: str) -> Path:
    """Random weights of `shape` in bf16 safetensors, plus the bundled tokenizer; kept for later runs."""
    if (folder / "config.json").is_file():
        return folder
    model = random_model(shape, torch.device("cuda"), torch.bfloat16, "sdpa")
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY / name, folder / name)
    return folder


def documents(count: int, tokens: int) -> list[str]:
    """`count` different texts of about `tokens` tokens of the bundled tokenizer (haystack repeated, rotated)."""
    from transformers import AutoTokenizer

    haystack = (ROOT / "examples" / "haystack.txt").read_text()
    per_char = len(AutoTokenizer.from_pretrained(TINY)(haystack)["input_ids"]) / len(haystack)
    length = int(tokens / per_char)
    texts = []
    for n in range(count):
        rotated = haystack[n * 97 % len(haystack) :] + " " + haystack
        texts.append((rotated * (length // len(rotated) + 1))[:length])
    return texts


def timed_run(jobs: list[dict], out: Path, **settings) -> dict:
    if out.exists():
        out.unlink()
    stamps: list[float] = []
    started = time.perf_counter()
    summary = batch.run(jobs, out, progress=lambda s: stamps.append(time.perf_counter()), **settings)
    seconds = time.perf_counter() - started
    steady = stamps[-1] - stamps[1] if len(stamps) > 2 else 0.0  # stamps[0]: before the first line
    lines = len(stamps) - 1
    return dict(
        summary=summary.line(),
        mode=summary.mode,
        lines=lines,
        questions=summary.questions,
        failed=summary.failed,
        seconds=seconds,
        steady_seconds=steady,
        lines_per_hour_steady=3600 * (lines - 1) / steady if steady else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--method", default="gemfilter")
    parser.add_argument("--runner", default="auto")
    parser.add_argument("--top-k", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", type=Path, help="A model folder instead of the random-weights shape.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or model_folder(args.out / f"random-{args.shape}", args.shape)
    texts = documents(args.documents, args.tokens)
    questions = [f"Question {q}: what is said about the garden, and by whom?" for q in range(args.questions)]
    reuse = [{"id": d, "text": text, "questions": questions} for d, text in enumerate(texts)]
    no_reuse = [{"id": f"{d}-{q}", "text": text, "questions": [question]} for d, text in enumerate(texts)
                for q, question in enumerate(questions)]  # fmt: skip
    settings = dict(model=str(model), method=args.method, device=args.device, runner=args.runner)
    settings.update(options={"top_k": args.top_k}, max_new_tokens=args.max_new_tokens)
    timed_run(reuse[:1], args.out / "answers-warm-up.jsonl", **settings)  # first-use costs fall on neither side
    with_reuse = timed_run(reuse, args.out / "answers-reuse.jsonl", **settings)
    without = timed_run(no_reuse, args.out / "answers-no-reuse.jsonl", **settings)
    result = dict(
        model=str(args.model) if args.model else f"random {args.shape}",
        device=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        documents=args.documents,
        tokens=args.tokens,
        questions=args.questions,
        max_new_tokens=args.max_new_tokens,
        method=args.method,
        with_reuse={**with_reuse, "documents_per_hour": 3600 * args.documents / with_reuse["seconds"],
                    "documents_per_hour_steady": with_reuse["lines_per_hour_steady"]},
        without_reuse={**without, "documents_per_hour": 3600 * args.documents / without["seconds"],
                       "documents_per_hour_steady": (without["lines_per_hour_steady"] or 0) / args.questions},
    )  # fmt: skip
    (args.out / "batch-throughput.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
