"""Evaluate a needle model on haystacks cut from the held-out books; print a table, write JSON.

    python scripts/eval_needle_model.py --model examples/models/needle-tiny --books ../shared/corpus/books \
        --samples 200 --out benchmarks/results/needle-tiny-eval.json

Rows: `full` inside the 4096-token window with 1 and 4 needles and the pass key; GemFilter
(top_k 256) for every filter layer (a sweep on haystacks of 4 needles, scored as `longdoc tune` scores it: exact
and grounded answers, half each) and for the best one on all samples; with --beyond, full
and HOMER past the window; with `templates` in --methods, full and the tuned GemFilter through the frameworks' own
prompt templates (TEMPLATES: text after the question, the document in a system message). Keys are the bench's KEYS
(needle-small never saw them in training). GemFilter and HOMER rows also record where the asked needle ranks among
the evidence spans (0: the strongest).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longdoc import LongDoc  # noqa: E402
from longdoc.bench.evaluate import grounded, needle_records  # noqa: E402
from longdoc.bench.needle import Haystacks, is_correct, load_books  # noqa: E402
from longdoc.tune import NEEDLES, best_layer, score  # noqa: E402

# GemFilter scoring: the paper's (last query token, raw logits, pool 5) and needle-tiny's model-card settings.
PRESETS = {
    "paper": dict(score="logits", pool_kernel=5, query_tokens=1),
    "card": dict(score="softmax", pool_kernel=41, query_tokens=16),
}


# Prompt templates of the frameworks longdoc plugs into, as they send them (held out: needle-small's training used
# generic pieces only): LangChain's completion form as tests/test_langchain.py writes it, LlamaIndex's default QA
# template (DEFAULT_TEXT_QA_PROMPT_TMPL), and a stuff chain's system message holding the document.
TEMPLATES = {
    "completion": "Context:\n{context}\n\nQuestion: {question}\n\nAnswer:",
    "llamaindex-qa": (
        "Context information is below.\n---------------------\n{context}\n---------------------\nGiven the context "
        "information and not prior knowledge, answer the query.\nQuery: {question}\nAnswer: "
    ),
    "system": [("system", "Answer from this text:\n\n{context}"), ("user", "{question}")],
}


def records(doc: LongDoc, hay: Haystacks, *, length: int, needles: int, samples: int, passkey: bool = False):
    """Ask `samples` fresh haystacks (seeded by the cell, so every method gets the same ones); one dict each."""
    return needle_records(doc, hay, length=length, needles=needles, samples=samples, passkey=passkey)


def template_records(doc: LongDoc, hay: Haystacks, template, *, length: int, samples: int) -> list[dict]:
    """One needle per haystack, asked through `template` as a framework sends it (`ask_prompt`); one dict each."""
    rng = random.Random(f"template-{length}")  # the same haystacks for every template and method
    out = []
    for _ in range(samples):
        sample = hay.sample(rng, length, needles=1)
        fill = dict(context=sample.context, question=sample.question)
        prompt = template.format(**fill) if isinstance(template, str) else [(r, t.format(**fill)) for r, t in template]
        answer = doc.ask_prompt(prompt, max_new_tokens=32)
        out.append(dict(correct=is_correct(answer.text, sample), answer=answer.text, expected=sample.value,
                        evidence_rank=None, evidence_spans=0))  # fmt: skip
    return out


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

    def run(name, d, length, needles, samples, passkey=False, template=None):
        if args.deadline and time.time() - began > args.deadline:
            print(f"skipped {name} {length} {needles}: past the deadline", flush=True)
            return dict(accuracy=-1.0, grounded=-1.0, score=-1.0)
        t = time.time()
        if template is None:
            recs = records(d, hay, length=length, needles=needles, samples=samples, passkey=passkey)
        else:
            recs = template_records(d, hay, template, length=length, samples=samples)
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
            # exact, with the needle the strongest evidence (tune's GemFilter score); None where no evidence is ranked
            grounded=round(grounded(recs), 4) if any(r["evidence_spans"] for r in recs) else None,
            score=round(score(recs), 4),  # tune's GemFilter score: exact and grounded, half each
            seconds=round(time.time() - t, 1),
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
        all_records.extend(dict(r, setting=name) for r in recs)
        save()
        return row

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
            name = f"gemfilter-{args.gem}-sweep-L{layer}"
            sweep[layer] = run(name, gem, lengths[-1], NEEDLES, args.sweep_samples)["score"]
        best = best_layer({lengths[-1]: sweep})  # as tune picks: the best score, the earliest of equals
        gem = doc.with_method("gemfilter", filter_layer=best, **options)
        for length in lengths:
            run(f"gemfilter-{args.gem}-L{best}", gem, length, 1, args.samples)
            run(f"gemfilter-{args.gem}-L{best}", gem, length, 4, args.samples)
    if "templates" in methods:  # full, and the method the model's profile sets for gemfilter
        for label, template in TEMPLATES.items():
            for name, d in (("full", doc), ("gemfilter", doc.with_method("gemfilter"))):
                run(f"{name}-template-{label}", d, lengths[-1], 1, args.samples, template=template)
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
