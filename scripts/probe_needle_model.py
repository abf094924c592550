"""CPU probes of a needle model: where its last prompt token looks, keys it never saw, extra GemFilter/HOMER rows.

    python scripts/probe_needle_model.py attention --model examples/models/needle-tiny
    python scripts/probe_needle_model.py distractors --model examples/models/needle-small
    python scripts/probe_needle_model.py open-keys --model examples/models/needle-small
    python scripts/probe_needle_model.py rows --model examples/models/needle-small
    python scripts/probe_needle_model.py homer --model examples/models/needle-small --length 8192 --samples 6

attention: each head's share of the last prompt token's attention on the needle sentence, per layer (1 needle),
for the plain prompt, RULER's answer prefix after the assistant header (`prefix`), and the prefix with its trailing
space (`prefix-space`). distractors: the same with 4 needles (asked needle vs the others) and the first digit's
accuracy. homer: HOMER settings (chunk length, warm-up layers, calibration) past the window. open-keys: full
prefill with two-word keys and 4-/10-digit values. rows: the GemFilter and HOMER rows of needle-small's card that
were measured on CPU. Haystacks come from the held-out books, seeded.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval_needle_model import records  # noqa: E402

from longdoc import LongDoc  # noqa: E402
from longdoc.bench.needle import KEYS, Haystacks, is_correct, load_books  # noqa: E402

PREFIX = "The special magic number for {key} is:"


def needle_rows(layout, span: tuple[int, int]) -> list[int]:
    """Prompt rows of the context tokens inside a character span of the context."""
    start, end = span
    return [layout.prefix_len + i for i, (a, b) in enumerate(layout.context_offsets) if a >= start and b <= end]


def last_token_attention(model, ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each layer's (heads, n) attention of the last position, and its next-token logits (eager attention)."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # only eager attention returns its weights
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True)
    finally:
        model.config._attn_implementation = previous
    return [a[0, :, -1] for a in out.attentions], out.logits[0, -1]


def attention(doc: LongDoc, hay: Haystacks, prompts: list[str], samples: int, length: int) -> None:
    tok = doc.tokenizer
    for prompt in prompts:
        rng = random.Random(1)
        layers = doc.arch.num_layers
        mass, top = torch.zeros(layers, doc.arch.num_heads), torch.zeros(layers)
        nexts = []
        for _ in range(samples):
            sample = hay.sample(rng, length, needles=1)
            layout = doc.layout(sample.context, sample.question)
            ids = layout.token_ids()
            if prompt != "plain":
                prefix = PREFIX.format(key=sample.key) + (" " if prompt == "prefix-space" else "")
                ids = ids + tok(prefix, add_special_tokens=False)["input_ids"]
            rows = needle_rows(layout, sample.needle_spans[sample.target])
            per_layer, logits = last_token_attention(doc.model, ids)
            nexts.append(tok.decode(logits.argmax()))
            context = slice(layout.prefix_len, layout.prefix_len + layout.context_len)
            for layer, att in enumerate(per_layer):
                mass[layer] += att[:, rows].sum(-1)
                best = att.sum(0)[context].topk(min(64, layout.context_len)).indices + layout.prefix_len
                top[layer] += bool(set(best.tolist()) & set(rows))
        print(f"{prompt}: next tokens {nexts}")
        for layer in range(layers):
            heads = [round(x, 2) for x in (mass[layer] / samples).tolist()]
            found = f"{int(top[layer])}/{samples}"
            print(f"  layer {layer}: share on the needle per head {heads}; needle in the top 64: {found}")


def distractors(doc: LongDoc, hay: Haystacks, samples: int, length: int) -> None:
    for together in (False, True):
        rng = random.Random(5)
        layers = doc.arch.num_layers
        right, wrong, first = torch.zeros(layers), torch.zeros(layers), 0
        for _ in range(samples):
            sample = hay.sample(rng, length, needles=4, together=together)
            layout = doc.layout(sample.context, sample.question)
            per_layer, logits = last_token_attention(doc.model, layout.token_ids())
            first += doc.tokenizer.decode(logits.argmax()) == sample.value[0]
            asked = needle_rows(layout, sample.needle_spans[sample.target])
            others = [r for i in range(4) if i != sample.target for r in needle_rows(layout, sample.needle_spans[i])]
            for layer, att in enumerate(per_layer):
                right[layer] += att.mean(0)[asked].sum()
                wrong[layer] += att.mean(0)[others].sum()
        print(f"side by side={together}: first digit right {first}/{samples}")
        print("  share on the asked needle per layer", [round(x, 2) for x in (right / samples).tolist()])
        print("  share on the 3 others per layer    ", [round(x, 2) for x in (wrong / samples).tolist()])


def open_keys(doc: LongDoc, hay: Haystacks, samples: int, length: int) -> None:
    rng = random.Random("open-keys")
    for name, digits, words in [("two-word key, 7 digits", 7, 2), ("4 digits", 4, 1), ("10 digits", 10, 1)]:
        correct = 0
        for _ in range(samples):
            key = " ".join(rng.sample(KEYS, words))
            value = str(rng.randrange(10 ** (digits - 1), 10**digits))
            sample = hay.sample(rng, length, needles=1, keys=[key], values=[value])
            answer = doc.ask(sample.context, sample.question, max_new_tokens=16)
            correct += is_correct(answer.text, sample) and answer.text.startswith(value + ".")
        print(json.dumps(dict(setting=name, length=length, samples=samples, correct=correct)), flush=True)


def rows(doc: LongDoc, hay: Haystacks) -> None:
    tuned = dict(filter_layer=2, top_k=256, score="softmax", pool_kernel=41, query_tokens=16)
    raw = {**tuned, "score": "logits", "query_tokens": 1}
    cells = [
        ("gemfilter-tuned-L2", doc.with_method("gemfilter", **tuned), 3500, 1, 20),
        ("gemfilter-tuned-L2", doc.with_method("gemfilter", **tuned), 3500, 4, 20),
        ("gemfilter-logits-q1-pool41-L2", doc.with_method("gemfilter", **raw), 3500, 1, 20),
        ("gemfilter-paper-topk1024-L2",
         doc.with_method("gemfilter", filter_layer=2, top_k=1024, score="logits", pool_kernel=5, query_tokens=1),
         3500, 1, 10),
        ("homer-chunk1024-warmup0",
         doc.with_method("homer", max_chunk_len=1024, warmup_layers=0, calibration="off"), 8192, 1, 5),
    ]  # fmt: skip
    for name, method, length, needles, samples in cells:
        began = time.time()
        recs = records(method, hay, length=length, needles=needles, samples=samples)
        correct = [r for r in recs if r["correct"]]
        ranked = [r for r in correct if r["evidence_spans"]]
        strongest = sum(r["evidence_rank"] == 0 for r in ranked) / len(ranked) if ranked else None
        row = dict(setting=name, length=length, needles=needles, samples=samples, accuracy=len(correct) / samples)
        row.update(needle_strongest=strongest, answers=[r["answer"] for r in recs][:4])
        row.update(seconds=round(time.time() - began))
        print(json.dumps(row), flush=True)


HOMER_SETTINGS = [
    {},
    {"max_chunk_len": 4096, "warmup_layers": 0, "calibration": "off"},
    {"max_chunk_len": 4096, "calibration": "off"},
    {"max_chunk_len": 4096},
    {"max_chunk_len": 2048, "warmup_layers": 0},
]


def homer(doc: LongDoc, hay: Haystacks, samples: int, length: int) -> None:
    """Each of HOMER_SETTINGS on the same seeded haystacks (defaults: half-window chunks, 4 warm-up layers of 12)."""
    for options in HOMER_SETTINGS:
        began = time.time()
        recs = records(doc.with_method("homer", **options), hay, length=length, needles=1, samples=samples)
        row = dict(options=options, length=length, samples=samples, correct=sum(r["correct"] for r in recs))
        row.update(evidence_ranks=[r["evidence_rank"] for r in recs], answers=[r["answer"][:14] for r in recs])
        print(json.dumps(dict(row, seconds=round(time.time() - began))), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["attention", "distractors", "open-keys", "rows", "homer"])
    parser.add_argument("--model", default="examples/models/needle-small")
    parser.add_argument("--books", default="../shared/corpus/books")
    parser.add_argument("--prompt", default="plain,prefix,prefix-space", help="attention: prompts to probe")
    parser.add_argument("--samples", type=int, default=0, help="default: 6, 30, 10 (open-keys)")
    parser.add_argument("--length", type=int, default=0, help="default: 1000 (attention), 512, 2048 (open-keys)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    doc = LongDoc.from_pretrained(args.model, method="full", device="cpu", dtype="float32")
    hay = Haystacks(load_books(args.books, held_out=True), doc.tokenizer)
    if args.probe == "attention":
        attention(doc, hay, args.prompt.split(","), args.samples or 6, args.length or 1000)
    elif args.probe == "distractors":
        distractors(doc, hay, args.samples or 30, args.length or 512)
    elif args.probe == "open-keys":
        open_keys(doc, hay, args.samples or 10, args.length or 2048)
    elif args.probe == "homer":
        homer(doc, hay, args.samples or 6, args.length or 8192)
    else:
        rows(doc, hay)


if __name__ == "__main__":
    main()
