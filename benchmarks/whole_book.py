"""A whole book with one needle, asked through the default method (auto: homer past the window).

    python benchmarks/whole_book.py BOOK.txt [--model examples/models/needle-tiny] [--depth 0.5] [--out FILE.json]
Issue #19: HOMER at any length on any depth (War and Peace, ~950K tokens, on the 9-layer bundled model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longdoc import LongDoc  # noqa: E402
from longdoc.bench.needle import NEEDLE, QUESTION, strip_gutenberg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("book", type=Path)
    parser.add_argument("--model", default=str(ROOT / "examples" / "models" / "needle-tiny"))
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = strip_gutenberg(args.book.read_text(encoding="utf-8", errors="replace"))
    at = text.find(". ", int(len(text) * args.depth)) + 2
    key, value = "lantern", "4071936"
    text = text[:at] + NEEDLE.format(key=key, value=value) + " " + text[at:]
    doc = LongDoc.from_pretrained(args.model, device=args.device)
    start = time.perf_counter()
    answer = doc.ask(text, QUESTION.format(key=key), max_new_tokens=24)
    record = dict(
        book=args.book.name,
        depth=args.depth,
        tokens_in=answer.stats.tokens_in,
        tokens_kept=answer.stats.tokens_kept,
        method=answer.stats.method,
        prefill_seconds=round(answer.stats.prefill_seconds, 2),
        wall_seconds=round(time.perf_counter() - start, 2),
        peak_memory_bytes=answer.stats.peak_memory_bytes,
        answer=answer.text,
        correct=value in answer.text,
        notes=answer.stats.notes,
    )
    print(json.dumps(record, indent=1))
    if args.out:
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
