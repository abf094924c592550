"""Evaluate the needle model on haystacks cut from the held-out books; print a table, write JSON.

    python scripts/eval_needle_model.py --model examples/models/needle-tiny --books ../shared/corpus/books \
        --samples 200 --out benchmarks/results/needle-tiny-eval.json

Rows: `full` inside the 4096-token window with 1 and 4 needles and the pass key; GemFilter
(top_k 256) for every filter layer (a sweep) and for the best one on all samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longdoc import LongDoc  # noqa: E402
from longdoc.bench.evaluate import accuracy, needle_records  # noqa: E402
from longdoc.bench.needle import Haystacks, load_books  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="examples/models/needle-tiny")
    parser.add_argument("--books", default="../shared/corpus/books")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--sweep-samples", type=int, default=50)
    parser.add_argument("--lengths", default="1024,2048,3500")
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--query-tokens", type=int, default=16, help="GemFilter scores with the last N queries")
    parser.add_argument("--methods", default="full,gemfilter")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    doc = LongDoc.from_pretrained(args.model, method="full", device=args.device, dtype="float32")
    hay = Haystacks(load_books(args.books, held_out=True), doc.tokenizer)
    lengths = [int(x) for x in args.lengths.split(",")]
    methods = args.methods.split(",")
    rows, records = [], []

    def run(name, d, length, needles, samples, passkey=False):
        t = time.time()
        recs = needle_records(d, hay, length=length, needles=needles, samples=samples, passkey=passkey)
        row = dict(
            setting=name,
            length=length,
            needles=needles,
            passkey=passkey,
            samples=samples,
            accuracy=round(accuracy(recs), 4),
            seconds=round(time.time() - t, 1),
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
        records.extend(dict(r, setting=name) for r in recs)
        return row["accuracy"]

    if "full" in methods:
        for length in lengths:
            run("full", doc, length, 1, args.samples)
            run("full", doc, length, 4, args.samples)
            run("full", doc, length, 1, args.samples, passkey=True)
    if "gemfilter" in methods:
        # Softmax scores, a 41-token pool and the question's last --query-tokens queries: the model card says why.
        options = dict(top_k=args.top_k, score="softmax", pool_kernel=41, query_tokens=args.query_tokens)
        sweep = {}
        for layer in range(doc.arch.num_layers):
            gem = doc.with_method("gemfilter", filter_layer=layer, **options)
            sweep[layer] = run(f"gemfilter-sweep-L{layer}", gem, lengths[-1], 1, args.sweep_samples)
        best = max(sweep, key=lambda k: (sweep[k], -k))
        gem = doc.with_method("gemfilter", filter_layer=best, **options)
        for length in lengths:
            run(f"gemfilter-L{best}", gem, length, 1, args.samples)
            run(f"gemfilter-L{best}", gem, length, 4, args.samples)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(args=vars(args), rows=rows, records=records), indent=1))
    print("\n| setting | length | needles | passkey | samples | accuracy |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['length']} | {r['needles']} | {r['passkey']} "
            f"| {r['samples']} | {r['accuracy']:.3f} |"
        )


if __name__ == "__main__":
    main()
