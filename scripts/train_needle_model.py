"""Train the bundled needle model: a small Llama (GQA, RoPE, 4096-token window) that retrieves from long text.

One command on one GPU (about 8 minutes on an H200), fixed seeds:

    python scripts/train_needle_model.py --books ../shared/corpus/books --out examples/models/needle-tiny

Steps: (1) a byte-level BPE tokenizer (digits split one per token) trained on the training books,
with a chat template, saved in Hugging Face format; (2) training on RULER-style needle tasks built
through longdoc's own prompt layout: answers that repeat the key before the value (RULER's answer
prefix), 1-8 needles, half the time side by side, each other needle asked about in a follow-up turn
after the evaluated first answer, the pass-key task, a light language-modelling loss on the haystack
text; a curriculum over length that advances on copying and, at the short lengths, waits for key
matching; every example fits the window whole; (3) bf16 safetensors weights. Evaluate with
scripts/eval_needle_model.py.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longdoc.bench.needle import ANSWER, NEEDLE, QUESTION, Haystacks, load_books  # noqa: E402
from longdoc.prompt import build_layout  # noqa: E402

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
WINDOW = 4096
# Curriculum over haystack length (tokens). The last stops short of the window: the prompt's template,
# the answer and a follow-up turn per other needle (about 45 tokens each) must fit in it.
STAGES = [256, 512, 1024, 2048, WINDOW - 512]
# Length advances on single-needle and pass-key accuracy (copying).
ADVANCE_AT = 0.9
# The short stages (cheap steps, many examples each) also wait for key matching among distractors, which
# arrives as a sudden jump (one run: 0.27 -> 0.92 within 200 steps at 512 tokens; another passed 512 in
# 150 steps without it and never got it), but at most for HOLD_FRACTION of the time budget.
MATCH_AT = 0.8
HOLD_STAGES = 2
HOLD_FRACTION = 0.35
# Share of haystacks whose needles stand side by side: distractors in the same surroundings, which a bag of
# nearby words (what earlier models matched, stalling near 60 %) cannot tell apart.
TOGETHER = 0.5
NEEDLE_PATTERN = re.compile(re.escape(NEEDLE).replace(r"\{key\}", r"(\w+)").replace(r"\{value\}", r"(\d+)"))


def train_tokenizer(books: dict[str, str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([books[name] for name in sorted(books)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=WINDOW,
    )


class Example(NamedTuple):
    ids: list[int]
    context_start: int
    answers: list[tuple[int, int]]  # token spans of each answer (with <|end|>); the first is the evaluated one
    single: bool  # one needle or the pass key: copying, no key matching


def follow_up_ids(tokenizer, question: str) -> list[int]:
    """Token ids of one more user turn and the assistant header, after an answer that ended with <|end|>."""
    message = [{"role": "user", "content": question}]
    turn = tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    return tokenizer("\n" + turn.removeprefix(tokenizer.bos_token), add_special_tokens=False)["input_ids"]


def make_example(hay: Haystacks, tokenizer, rng: random.Random, length: int) -> Example:
    """One prompt in longdoc's layout and its answer, then a follow-up turn asking about each other needle.

    The first answer is the evaluated one; the follow-ups give every needle's key-matching signal
    from one haystack (matching the asked key among distractors is the hard part to learn).
    """
    passkey = rng.random() < 0.15
    needles = rng.choice((1, 2, 3, 4, 5, 6, 8))
    sample = hay.sample(rng, length, needles=needles, passkey=passkey, together=rng.random() < TOGETHER)
    layout = build_layout(tokenizer, sample.context, sample.question)
    ids = layout.prefix_ids + layout.context_ids + layout.suffix_ids
    answers = []

    def add_answer(text: str) -> None:
        answer = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        answers.append((len(ids), len(ids) + len(answer)))
        ids.extend(answer)

    add_answer(sample.answer)
    if not passkey:
        others = [i for i in range(needles) if i != sample.target]
        rng.shuffle(others)
        for i in others:
            key, value = NEEDLE_PATTERN.fullmatch(sample.context[slice(*sample.needle_spans[i])]).groups()
            ids.extend(follow_up_ids(tokenizer, QUESTION.format(key=key)))
            add_answer(ANSWER.format(key=key, value=value))
    return Example(ids, layout.prefix_len, answers, passkey or needles == 1)


class Batches(torch.utils.data.IterableDataset):
    """Endless batches for the current curriculum stage (shared with the workers)."""

    def __init__(self, books, tokenizer, stage, tokens_per_batch: int, seed: int) -> None:
        self.books, self.tokenizer, self.stage = books, tokenizer, stage
        self.tokens_per_batch, self.seed = tokens_per_batch, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        hay = Haystacks(self.books, self.tokenizer)
        while True:
            stage = self.stage.value
            top = STAGES[stage]
            # One haystack length per batch, mostly the stage's own, some shorter so earlier lengths are
            # not forgotten; rows are added while the padded batch stays within the token budget, so a
            # batch of short haystacks carries many more key-matching examples than a batch of long ones.
            length = top if rng.random() < 0.5 else rng.randint(64, top)
            rows, width = [], 0
            while True:
                row = make_example(hay, self.tokenizer, rng, length)
                if rows and (len(rows) + 1) * max(width, len(row.ids)) > self.tokens_per_batch:
                    break
                rows.append(row)
                width = max(width, len(row.ids))
            size = len(rows)
            if width > WINDOW:  # the haystack lengths leave room for every turn: a cut answer would teach nothing
                raise RuntimeError(f"an example of {width} tokens does not fit the {WINDOW}-token window")
            ids = torch.zeros(size, width, dtype=torch.long)
            weight = torch.zeros(size, width)
            answer = torch.zeros(size, width, dtype=torch.bool)
            single = torch.tensor([row.single for row in rows])
            for i, row in enumerate(rows):
                ids[i, : len(row.ids)] = torch.tensor(row.ids)
                weight[i, row.context_start : len(row.ids) - 1] = 0.1  # light LM loss on the text and questions
                for start, end in row.answers:
                    weight[i, start - 1 : end - 1] = 1.0  # the answers (targets shifted by one)
                start, end = row.answers[0]
                answer[i, start - 1 : end - 1] = True
            yield ids, weight, answer, single, stage


def build_model(vocab_size: int, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=9,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=WINDOW,
        # Wide heads and a large theta (Llama 3: 128 dims, 500000) leave many query/key dimensions that
        # RoPE barely turns across the window, for matching text far apart. (Alone, with answers that
        # start with the value, this did not lift key matching above ~60 %; see the model card.)
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(config)


def train(args) -> None:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    books = load_books(args.books, held_out=False)
    print(f"training books ({len(books)}): {', '.join(books)}", flush=True)
    tokenizer = train_tokenizer(books, args.vocab)
    tokenizer.save_pretrained(out)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    model = build_model(len(tokenizer), tokenizer).to(device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M on {device}", flush=True)

    stage = torch.multiprocessing.Value("i", 0)
    data = Batches(books, tokenizer, stage, args.batch_tokens, args.seed)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        num_workers=args.workers,
        prefetch_factor=4 if args.workers else None,
        persistent_workers=args.workers > 0,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    start, ema, copy_ema, match_ema, stage_steps, step = time.time(), 0.0, 0.0, 0.0, 0, 0
    log = []
    budget = args.minutes * 60
    for ids, weight, answer, single, batch_stage in loader:
        elapsed = time.time() - start
        if elapsed > budget:
            break
        if batch_stage != stage.value:
            continue  # made before the stage advanced
        ids, weight, answer = ids.to(device), weight.to(device), answer.to(device)
        # Warm-up, constant, then cosine decay over the last 25 % of the time budget.
        frac = elapsed / budget
        lr = (
            args.lr
            * min(1.0, (step + 1) / 200)
            * (1.0 if frac < 0.75 else 0.5 * (1 + math.cos(math.pi * (frac - 0.75) / 0.25)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=ids[:, :-1]).logits
        loss_each = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
        w = weight[:, :-1]
        loss = (loss_each * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            hit = ((logits.argmax(-1) == ids[:, 1:]) | ~answer[:, :-1]).all(1).float()
            acc = hit.mean().item()
            single = single.to(device)
            copy_acc = hit[single].mean().item() if single.any() else copy_ema
            match_acc = hit[~single].mean().item() if (~single).any() else match_ema
        ema = 0.95 * ema + 0.05 * acc
        copy_ema = 0.95 * copy_ema + 0.05 * copy_acc
        match_ema = 0.95 * match_ema + 0.05 * match_acc
        stage_steps += 1
        step += 1
        matched = match_ema > MATCH_AT or stage.value >= HOLD_STAGES or elapsed > HOLD_FRACTION * budget
        if copy_ema > ADVANCE_AT and matched and stage_steps > 150 and stage.value < len(STAGES) - 1:
            stage.value += 1
            print(f"step {step}: stage -> {STAGES[stage.value]} tokens at {elapsed:.0f}s", flush=True)
            copy_ema, stage_steps = 0.0, 0
        if step % 100 == 0:
            entry = dict(
                step=step,
                seconds=round(elapsed),
                stage=STAGES[stage.value],
                loss=round(loss.item(), 4),
                answer_acc=round(ema, 3),
                distractor_acc=round(match_ema, 3),
                lr=round(lr, 6),
            )
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(dict(args=vars(args), steps=step, log=log), indent=1))
    print(f"saved to {out} after {step} steps, {time.time() - start:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--books", default="../shared/corpus/books")
    parser.add_argument("--out", default="examples/models/needle-tiny")
    parser.add_argument("--minutes", type=float, default=7.6)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch-tokens", type=int, default=65536)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    train(parser.parse_args())


if __name__ == "__main__":
    main()
