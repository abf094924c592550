"""Evaluate a needle model on haystacks cut from the held-out books; print a table, write JSON.

    python scripts/eval_needle_model.py --model examples/models/needle-tiny --books ../shared/corpus/books \
        --samples 200 --out benchmarks/results/needle-tiny-eval.json

Rows: `full` inside the 4096-token window with 1 and 4 needles and the pass key; GemFilter
(top_k 256) for every filter layer (a sweep) and for the best one on all samples; with --beyond, full and
HOMER past the window. Keys are the bench's KEYS (needle-small never saw them in training). GemFilter and
HOMER rows also record where the asked needle ranks among the evidence spans (0: the strongest).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longdoc import LongDoc  # noqa: E402
from longdoc.bench.evaluate import needle_records  # noqa: E402
from longdoc.bench.needle import Haystacks, load_books  # noqa: E402

# GemFilter scoring: the paper's (last query token, raw logits, pool 5) and needle-tiny's model-card settings.
PRESETS = {
    "paper": dict(score="logits", pool_kernel=5, query_tokens=1),
    "card": dict(score="softmax", pool_kernel=41, query_tokens=16),
}


def records(doc: LongDoc, hay: Haystacks, *, length: int, needles: int, samples: int, passkey: bool = False):
    """Ask `samples` fresh haystacks (seeded by the cell, so every method gets the same ones); one dict each."""
    return needle_records(doc, hay, length=length, needles=needles, samples=samples, passkey=passkey)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="examples/models/needle-tiny")
    parser.add_argument("--books", default="../shared/corpus/books")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--sweep-samples", type=int, default=50)
    parser.add_argument("--lengths", default="1024,2048,3500")
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--gem", default="card", choices=sorted(PRESETS), help="GemFilter scoring preset")
    parser.add_argument("--query-tokens", type=int, default=None, help="override the preset's query_tokens")
    parser.add_argument("--methods", default="full,gemfilter")
    parser.add_argument("--beyond", default="", help="lengths past the window for full and homer, e.g. 8192,16384")
    parser.add_argument("--beyond-samples", type=int, default=20)
    parser.add_argument("--homer", default="", help="homer options as JSON, e.g. '{\"max_chunk_len\": 4096}'")
    parser.add_argument("--deadline", type=float, default=0, help="seconds: skip the rows that start after it")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    began = time.time()
    doc = LongDoc.from_pretrained(args.model, method="full", device=args.device, dtype="float32")
    hay = Haystacks(load_books(args.books, held_out=True), doc.tokenizer)
    lengths = [int(x) for x in args.lengths.split(",")]
    methods = args.methods.split(",")
    rows, all_records = [], []

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            result = dict(args=vars(args), rows=rows, records=all_records)
            Path(args.out).write_text(json.dumps(result, indent=1))

    def run(name, d, length, needles, samples, passkey=False):
        if args.deadline and time.time() - began > args.deadline:
            print(f"skipped {name} {length} {needles}: past the deadline", flush=True)
            return -1.0
        t = time.time()
        recs = records(d, hay, length=length, needles=needles, samples=samples, passkey=passkey)
        correct = [r for r in recs if r["correct"]]
        ranked = [r for r in correct if r["evidence_spans"]]
        row = dict(
            setting=name,
            length=length,
            needles=needles,
            passkey=passkey,
            samples=samples,
            accuracy=round(len(correct) / samples, 4),
            # Of the correct answers with evidence spans: the needle is the strongest one.
            needle_strongest=round(sum(r["evidence_rank"] == 0 for r in ranked) / len(ranked), 4) if ranked else None,
            seconds=round(time.time() - t, 1),
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
        all_records.extend(dict(r, setting=name) for r in recs)
        save()
        return row["accuracy"]

    if "full" in methods:
        for length in lengths:
            run("full", doc, length, 1, args.samples)
            run("full", doc, length, 4, args.samples)
            run("full", doc, length, 1, args.samples, passkey=True)
    if "gemfilter" in methods:
        options = dict(PRESETS[args.gem], top_k=args.top_k)
        if args.query_tokens:
            options["query_tokens"] = args.query_tokens
        sweep = {}
        for layer in range(doc.arch.num_layers):
            gem = doc.with_method("gemfilter", filter_layer=layer, **options)
            sweep[layer] = run(f"gemfilter-{args.gem}-sweep-L{layer}", gem, lengths[-1], 1, args.sweep_samples)
        best = max(sweep, key=lambda k: (sweep[k], -k))
        gem = doc.with_method("gemfilter", filter_layer=best, **options)
        for length in lengths:
            run(f"gemfilter-{args.gem}-L{best}", gem, length, 1, args.samples)
            run(f"gemfilter-{args.gem}-L{best}", gem, length, 4, args.samples)
    if args.beyond:
        homer = doc.with_method("homer", **json.loads(args.homer or "{}"))
        for length in [int(x) for x in args.beyond.split(",")]:
            run("homer", homer, length, 1, args.beyond_samples)
            run("full", doc.with_method("full", past_window=True), length, 1, max(5, args.beyond_samples // 2))
    save()
    print("\n| setting | length | needles | passkey | samples | accuracy | needle strongest |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['length']} | {r['needles']} | {r['passkey']} "
            f"| {r['samples']} | {r['accuracy']:.3f} | {r['needle_strongest']} |"
        )


if __name__ == "__main__":
    main()
