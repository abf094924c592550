"""Read once, ask five on CPU with the bundled needle model at ~3.5K tokens: first vs follow-up prefill.

    python benchmarks/cpu_reading.py [--out benchmarks/results/reading-cpu-needle-tiny.json]
Issue #16's CPU target: a follow-up's prefill at most 0.3 of the first question's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from needle_folder import BOOKS, MODEL, NEEDLE_GEMFILTER  # noqa: E402

from longdoc import Full, GemFilter, LongDoc  # noqa: E402
from longdoc.bench.needle import KEYS, QUESTION, Haystacks, is_correct, load_books  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--questions", type=int, default=5)
    args = parser.parse_args()
    doc = LongDoc.from_pretrained(str(MODEL), method=Full(), device="cpu")
    haystacks = Haystacks(load_books(BOOKS, held_out=True), doc.tokenizer)
    sample = haystacks.sample(random.Random(0), 3500)
    others = [QUESTION.format(key=key) for key in KEYS if key != sample.key][: args.questions - 1]
    questions = [sample.question, *others]  # the needle's question first, then keys the haystack does not hold
    rows = []
    for method in (Full(), GemFilter(**NEEDLE_GEMFILTER)):
        engine = doc.with_method(method)
        engine.store.clear()
        answers = [engine.ask(sample.context, q, max_new_tokens=24) for q in questions]
        first, follow = answers[0].stats, [a.stats for a in answers[1:]]
        rows.append(
            dict(
                method=method.name,
                tokens=first.tokens_in,
                first_prefill_seconds=first.prefill_seconds,
                follow_up_prefill_seconds=statistics.median(s.prefill_seconds for s in follow),
                ratio=statistics.median(s.prefill_seconds for s in follow) / first.prefill_seconds,
                readings=[a.stats.reading for a in answers],
                reading_bytes=first.reading_bytes,
                first_answer_correct=is_correct(answers[0].text, sample),
            )
        )
        print(json.dumps(rows[-1]))
    if args.out:
        args.out.write_text(json.dumps(dict(command=" ".join(sys.argv), rows=rows), indent=1))


if __name__ == "__main__":
    main()
