"""Train needle-small: a 12-layer Llama whose prompt's last token retrieves (GemFilter's premise), any key.

One command on one GPU, fixed seeds. The bundled examples/models/needle-small is the two defaults below with the
lookup-attention loss, trained alone for 6.5 minutes on an H200 (benchmarks/results/needle-small-b/):

    python scripts/train_needle_small.py --books ../shared/corpus/books --out examples/models/needle-small \
        --minutes 6.5 --attention-weight 0.2 --attention-from 2

`RECIPES=B WORKERS=12 MINUTES=6.5 DEADLINE=110 bash benchmarks/gpu.sh small OUT` runs that, then evaluates and
tunes it (benchmarks/needle_small_ab.sh; without RECIPES it trains with and without the loss side by side).
The seed fixes the examples, not the run: GPU kernels are not bitwise deterministic and the stages go by wall
time, and key matching among distractors emerged in 2 of the 5 runs alone on an H200 (the bundled one and a
3.75-minute one; not at RoPE base 1e4 nor in two runs of 6 and 6.5 minutes: the model card).

What differs from needle-tiny (scripts/train_needle_model.py, whose template and curriculum it reuses):
- The answer starts with the value (`{value}.`), so the prompt's last token (the assistant header's newline)
  must find the needle: that is where GemFilter and HOMER read attention. needle-tiny answers
  `The special magic number for {key} is: {value}.`, and its attention maps show why its last prompt token
  never looks at the needle: it predicts `The`; even after that prefix, `is:` predicts the space token
  (digits are split from it) and only that space's query finds the needle (layer 5, head 0, all of its
  attention), one token after any prompt ending in the prefix.
- Half of the follow-up answers come after RULER's answer prefix given in the prompt
  (`The special magic number for {key} is: `, no loss on it): the induction copy that small models learn
  easily, which builds the needle-side key representation the value-first lookup also matches against.
- Keys from an open vocabulary: words of the training books (one word, two words, or hyphenated), never
  the bench's KEYS, so every bench key is unseen; values of 3-10 digits (7 most often).
- The first digit's loss (the lookup) weighs --first-weight (2); the rest of the value copies on from it.
- 12 layers: HOMER's tree gets 2^(12 - 4 warm-up) chunks before levels share layers.
- --digit-groups 3 (default): its own tokenizer, digits in groups of three as Llama 3's (a 7-digit value is 3
  tokens, inside GemFilter's 5-token pool); 1: needle-tiny's tokenizer (one digit a token).
- --attention-weight W (default 0: off): head 0 of every layer from --attention-from (2) on is trained to spread the
  prompt's last token's attention over the asked needle's sentence (LookupAttention), the retrieval heads at many
  depths that HOMER's pruning at each merge level relies on; without it the first needle-small looked up at layers
  2-3 only.
- --framed F (default 0: the bundled model): once the model tells keys apart, a share F of the prompts are in generic
  framework-style templates (text after the question, the document in a system message), which the bundled model,
  trained with the question last, cannot answer through (its card).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_needle_model import (  # noqa: E402
    ADVANCE_AT,
    CHAT_TEMPLATE,
    HOLD_FRACTION,
    HOLD_STAGES,
    MATCH_AT,
    SPECIAL,
    STAGES,
    TOGETHER,
    WINDOW,
    follow_up_ids,
)
from train_needle_model import train_tokenizer as train_single_digit_tokenizer  # noqa: E402

from longdoc.bench.needle import KEYS, PASSKEY_QUESTION, QUESTION, Haystacks, load_books  # noqa: E402
from longdoc.prompt import build_layout  # noqa: E402

ANSWER_PREFIX = "The special magic number for {key} is: "  # RULER's, as the prompt's end in some follow-ups
PREFIXED = 0.5  # share of follow-up answers asked with the answer prefix in the prompt
LM_WEIGHT = 0.1  # loss weight of the haystack's book text (plain language modelling)
PASSKEY = 0.1


DIGITS = "0123456789"

# Framework-style prompts (--framed): the document and the question inside a template, with text before the
# document, between it and the question and after the question, or the document in a system message, as LangChain's
# stuff prompts, LlamaIndex's QA template and completion cues ("Answer:") lay them out. A model trained only on
# longdoc's own layout (question last) answers a wrong number behind such a cue even with full attention (README,
# Not there yet). Generic pieces only: the frameworks' own templates, which the tests use, stay unseen.
HEADS = ["", "Context:\n", "Document:\n", "Read the text below.\n\n", "Here is a document.\n---------------------\n"]
BETWEEN = ["\n\n", "\n", "\n---------------------\n", "\n\n---\n\n"]
INSTRUCTIONS = ["", "", "Answer the question using only the text above.\n", "Use the document to answer.\n"]
LABELS = ["", "Question: ", "Query: ", "Q: "]
CUES = ["", "\nAnswer:", "\n\nAnswer:", "\nAnswer: ", "\nA:", "\nHelpful answer:", "\n\nAnswer briefly."]
IN_SYSTEM = 0.25  # of the framed prompts: the document in a system message, the question the user's message
# Framed prompts start once the model tells keys apart (the distractor-answer EMA past FRAME_AT). Mixed in from the
# first step (--framed 0.5, 6 minutes on an H200) the key matching never emerged: the EMA stayed at 0.2-0.27 where
# the unframed recipe reaches 0.85 by step 1000, and four needles fell to 0.28 (one needle 1.00, the frameworks'
# templates 1.00 under full; benchmarks/results/needle-small-framed/).
FRAME_AT = 0.8
QUESTION_FIRST = 0.1  # of the others: the question before the document


def train_tokenizer(books: dict[str, str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the training books with digits in groups of up to three, left to right (Llama 3's
    `\\p{N}{1,3}`): a 7-digit value is 3 tokens, so GemFilter's 5-token pool around the lookup covers it.

    BPE learns merges only for the groups the books contain, so every 2- and 3-digit group is added with its
    merges (a 3-digit group by both merge orders: whichever pair merges first, the group ends as one token).
    The vocabulary is `vocab_size` learned tokens plus the missing groups.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([books[name] for name in sorted(books)], trainer)
    data = json.loads(tok.to_str())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    have = {tuple(m) for m in merges}

    def add(group: str, pairs: list[tuple[str, str]]) -> None:
        vocab.setdefault(group, len(vocab))
        for pair in pairs:
            if pair not in have:
                merges.append(list(pair))
                have.add(pair)

    for a in DIGITS:
        for b in DIGITS:
            add(a + b, [(a, b)])
    for a in DIGITS:
        for b in DIGITS:
            for c in DIGITS:
                add(a + b + c, [(a + b, c), (a, b + c)])
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=WINDOW,
    )


class Example(NamedTuple):
    ids: list[int]
    weights: list[float]  # weights[j]: loss weight of token j as a target (predicted at j - 1)
    first: tuple[int, int]  # token span of the evaluated (first) answer, value-first, with <|end|>
    single: bool  # one needle or the pass key: no key matching
    needle: tuple[int, int]  # token rows of the asked needle's sentence in `ids` (the attention loss's target)


def key_words(books: dict[str, str]) -> list[str]:
    """Open key vocabulary: lower-case words of the training books seen 3+ times, minus the bench's KEYS.

    The 300 commonest words are left out (keys like `the` are no names); KEYS stay unseen for evaluation.
    """
    counts = Counter(w for text in books.values() for w in re.findall(r"\b[a-z]{3,12}\b", text))
    common = {w for w, _ in counts.most_common(300)}
    return sorted(w for w, n in counts.items() if n >= 3 and w not in common and w not in set(KEYS))


def random_key(rng: random.Random, words: list[str]) -> str:
    """One word (60 %), two words (30 %) or a hyphenated pair (10 %)."""
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(words)
    return f"{rng.choice(words)}{' ' if roll < 0.9 else '-'}{rng.choice(words)}"


def random_value(rng: random.Random) -> str:
    """3-10 digits, 7 (the bench's) most often; no leading zero."""
    digits = rng.choice([7, 7, 7, 3, 4, 5, 6, 8, 9, 10])
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def framed_messages(rng: random.Random, context: str, question: str) -> list[dict[str, str]]:
    """The document and the question in a random framework-style template (HEADS ... CUES)."""
    head, label, cue = rng.choice(HEADS), rng.choice(LABELS), rng.choice(CUES)
    asked = f"{rng.choice(INSTRUCTIONS)}{label}{question}{cue}"
    if rng.random() < IN_SYSTEM:
        return [{"role": "system", "content": head + context}, {"role": "user", "content": asked}]
    if rng.random() < QUESTION_FIRST:
        return [{"role": "user", "content": f"{label}{question}{rng.choice(BETWEEN)}{head}{context}{cue}"}]
    return [{"role": "user", "content": f"{head}{context}{rng.choice(BETWEEN)}{asked}"}]


def framed_prompt(tokenizer, messages: list[dict[str, str]], context: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the rendered prompt (tokenized whole, as `layout_messages` does) and each token's span in the
    document's characters ((-1, -1) outside it)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    base = text.index(context)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    spans = [(a - base, b - base) if base <= a and b <= base + len(context) else (-1, -1)
             for a, b in encoded["offset_mapping"]]  # fmt: skip
    return list(encoded["input_ids"]), spans


def make_example(
    hay: Haystacks,
    tokenizer,
    rng: random.Random,
    length: int,
    words: list[str],
    first_weight: float = 2.0,
    framed: float = 0.0,
) -> Example:
    """A prompt in longdoc's layout (or, a `framed` share of the time, in a framework-style template), its value-first
    answer, then a follow-up turn about each other needle."""
    passkey = rng.random() < PASSKEY
    needles = 1 if passkey else rng.choice((1, 2, 3, 4, 5, 6, 8))
    keys: list[str] = []
    while len(keys) < needles:  # distinct keys, and none inside another (the question would be ambiguous)
        key = random_key(rng, words)
        if all(key not in k and k not in key for k in keys):
            keys.append(key)
    values = [random_value(rng) for _ in range(needles)]
    sample = hay.sample(
        rng, length, needles=needles, passkey=passkey, together=rng.random() < TOGETHER, keys=keys, values=values
    )
    if framed and rng.random() < framed:  # no draw at 0: the bundled recipe's examples stay as they were
        messages = framed_messages(rng, sample.context, sample.question)
        ids, spans = framed_prompt(tokenizer, messages, sample.context)
    else:
        layout = build_layout(tokenizer, sample.context, sample.question)
        ids = layout.prefix_ids + layout.context_ids + layout.suffix_ids
        spans = [(-1, -1)] * layout.prefix_len + layout.context_offsets + [(-1, -1)] * layout.suffix_len
    in_document = [a >= 0 for a, _ in spans]
    weights = [LM_WEIGHT if inside else 0.0 for inside in in_document]
    weights[in_document.index(True)] = 0.0  # the first document token has no text before it to predict from

    def extend(piece: list[int], weight: float) -> None:
        ids.extend(piece)
        weights.extend([weight] * len(piece))

    def add_answer(value: str) -> tuple[int, int]:
        start = len(ids)
        extend(tokenizer(f"{value}.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id], 1.0)
        weights[start] = first_weight
        return start, len(ids)

    start, end = sample.needle_spans[sample.target]
    rows = [i for i, (a, b) in enumerate(spans) if a >= start and b <= end]
    needle = (rows[0], rows[-1] + 1)
    first = add_answer(sample.value)
    for i in rng.sample([i for i in range(needles) if i != sample.target], needles - 1):
        extend(follow_up_ids(tokenizer, QUESTION.format(key=keys[i])), 0.0)
        if rng.random() < PREFIXED:
            extend(tokenizer(ANSWER_PREFIX.format(key=keys[i]), add_special_tokens=False)["input_ids"], 0.0)
        add_answer(values[i])
    assert passkey == (sample.question == PASSKEY_QUESTION)
    return Example(ids, weights, first, needles == 1, needle)


class Batches(torch.utils.data.IterableDataset):
    """Endless batches for the current curriculum stage (shared with the workers)."""

    def __init__(
        self, books, tokenizer, stage, tokens_per_batch: int, seed: int, words, first_weight: float, framed, framing
    ) -> None:
        self.books, self.tokenizer, self.stage, self.words = books, tokenizer, stage, words
        self.first_weight, self.framed = first_weight, framed
        self.framing = framing  # shared: 0 until the model tells keys apart (FRAME_AT)
        self.tokens_per_batch, self.seed = tokens_per_batch, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        hay = Haystacks(self.books, self.tokenizer)
        while True:
            stage = self.stage.value
            top = STAGES[stage]
            # One haystack length per batch, half the stage's own, half shorter (earlier lengths not forgotten);
            # rows are added while the padded batch stays within the token budget.
            length = top if rng.random() < 0.5 else rng.randint(64, top)
            rows, width = [], 0
            while True:
                framed = self.framed if self.framing.value else 0.0
                row = make_example(hay, self.tokenizer, rng, length, self.words, self.first_weight, framed)
                if rows and (len(rows) + 1) * max(width, len(row.ids)) > self.tokens_per_batch:
                    break
                rows.append(row)
                width = max(width, len(row.ids))
            if width > WINDOW:
                raise RuntimeError(f"an example of {width} tokens does not fit the {WINDOW}-token window")
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            weight = torch.zeros(len(rows), width)
            answer = torch.zeros(len(rows), width, dtype=torch.bool)
            needle = torch.zeros(len(rows), width, dtype=torch.bool)
            for i, row in enumerate(rows):
                ids[i, : len(row.ids)] = torch.tensor(row.ids)
                weight[i, : len(row.ids)] = torch.tensor(row.weights)
                answer[i, row.first[0] : row.first[1]] = True
                needle[i, row.needle[0] : row.needle[1]] = True
            single = torch.tensor([row.single for row in rows])
            query = torch.tensor([row.first[0] - 1 for row in rows])  # the prompt's last token: the lookup
            # Targets are shifted by one: position j predicts token j + 1.
            yield ids, weight[:, 1:], answer[:, 1:], single, query, needle[:, :-1], stage


def build_model(tokenizer, args) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.ff,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=64,
        max_position_embeddings=WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(config)


class LookupAttention:
    """The attention loss: one query head per layer from `first` on, at the prompt's last token, spread over the asked
    needle's sentence (cross-entropy against the uniform distribution on its tokens).

    LLMs have retrieval heads at many depths (GemFilter's premise, and what HOMER prunes by at each merge level);
    a model this small learns its lookup in one layer (needle-small 1: layer 2) and nowhere else. Forward pre-hooks
    take each supervised layer's input and position embeddings; the head's logits are recomputed for the one row.
    """

    def __init__(self, model: LlamaForCausalLM, first: int, head: int = 0) -> None:
        self.inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.head = head
        self.layers = list(range(first, model.config.num_hidden_layers))
        self.handles = [
            model.model.layers[i].self_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i in self.layers
        ]
        self.model = model

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            rotary = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            self.inputs[layer] = (hidden, rotary)

        return hook

    def loss(self, query: torch.Tensor, needle: torch.Tensor) -> torch.Tensor:
        """Mean over rows and layers of -mean_{j in needle} log p_j, minus its floor log(needle tokens)."""
        rows = torch.arange(query.shape[0], device=query.device)
        width = needle.shape[1]
        causal = torch.arange(width, device=query.device)[None] <= query[:, None]
        total = 0.0
        for layer in self.layers:
            hidden, (cos, sin) = self.inputs.pop(layer)
            cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)  # (1, n, d) shared
            attn = self.model.model.layers[layer].self_attn
            d = attn.head_dim
            kv = self.head // (attn.config.num_attention_heads // attn.config.num_key_value_heads)
            q = attn.q_proj(hidden[rows, query])[:, self.head * d : (self.head + 1) * d]  # (B, d)
            k = attn.k_proj(hidden[:, :width])[..., kv * d : (kv + 1) * d]  # (B, n, d)
            q, _ = apply_rotary_pos_emb(
                q[:, None, None], q[:, None, None], cos[rows, query][:, None], sin[rows, query][:, None]
            )
            _, k = apply_rotary_pos_emb(k[:, None], k[:, None], cos[:, :width], sin[:, :width])
            logits = (k[:, 0].float() @ q[:, 0, 0].float()[..., None])[..., 0] / math.sqrt(d)  # (B, n)
            logp = logits.masked_fill(~causal, float("-inf")).log_softmax(-1)
            count = needle.sum(1)
            total = total + (-(logp.masked_fill(~needle, 0).sum(1)) / count - count.float().log()).mean()
        return total / len(self.layers)


def train(args) -> None:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    books = load_books(args.books, held_out=False)
    words = key_words(books)
    print(f"training books ({len(books)}): {', '.join(books)}; {len(words)} key words", flush=True)
    make_tokenizer = train_tokenizer if args.digit_groups == 3 else train_single_digit_tokenizer
    make_tokenizer(books, args.vocab).save_pretrained(out)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    model = build_model(tokenizer, args).to(device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M on {device}", flush=True)

    stage, framing = torch.multiprocessing.Value("i", 0), torch.multiprocessing.Value("i", 0)
    data = Batches(
        books, tokenizer, stage, args.batch_tokens, args.seed, words, args.first_weight, args.framed, framing
    )
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        num_workers=args.workers,
        prefetch_factor=4 if args.workers else None,
        persistent_workers=args.workers > 0,
    )
    lookup = LookupAttention(model, args.attention_from) if args.attention_weight > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    start, ema, copy_ema, match_ema, stage_steps, step = time.time(), 0.0, 0.0, 0.0, 0, 0
    log = []
    budget = args.minutes * 60
    attention_ema = 0.0
    for ids, weight, answer, single, query, needle, batch_stage in loader:
        elapsed = time.time() - start
        if elapsed > budget or (args.steps and step >= args.steps):
            break
        if batch_stage != stage.value:
            continue  # made before the stage advanced
        ids, weight, answer, single = ids.to(device), weight.to(device), answer.to(device), single.to(device)
        query, needle = query.to(device), needle.to(device)
        frac = elapsed / budget  # warm-up, constant, cosine decay over the last 25 % of the time budget
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
        loss = (loss_each * weight).sum() / weight.sum()
        if lookup is not None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                attention_loss = lookup.loss(query, needle)
            loss = loss + args.attention_weight * attention_loss
            attention_ema = 0.95 * attention_ema + 0.05 * attention_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            hit = ((logits.argmax(-1) == ids[:, 1:]) | ~answer).all(1).float()
            acc = hit.mean().item()
            copy_acc = hit[single].mean().item() if single.any() else copy_ema
            match_acc = hit[~single].mean().item() if (~single).any() else match_ema
            text = weight == LM_WEIGHT
            lm_loss = (loss_each * text).sum().item() / max(1, text.sum().item())
        ema = 0.95 * ema + 0.05 * acc
        copy_ema = 0.95 * copy_ema + 0.05 * copy_acc
        match_ema = 0.95 * match_ema + 0.05 * match_acc
        stage_steps += 1
        step += 1
        if args.framed and not framing.value and match_ema > FRAME_AT:
            framing.value = 1
            print(f"step {step}: framework-style prompts from now on ({args.framed:.0%}) at {elapsed:.0f}s", flush=True)
        matched = match_ema > MATCH_AT or stage.value >= HOLD_STAGES or elapsed > args.hold_fraction * budget
        if copy_ema > ADVANCE_AT and matched and stage_steps > 150 and stage.value < len(STAGES) - 1:
            stage.value += 1
            print(f"step {step}: stage -> {STAGES[stage.value]} tokens at {elapsed:.0f}s", flush=True)
            copy_ema, stage_steps = 0.0, 0
        if step % args.log_every == 0:
            entry = dict(
                step=step,
                seconds=round(elapsed),
                stage=STAGES[stage.value],
                loss=round(loss.item(), 4),
                text_loss=round(lm_loss, 3),
                answer_acc=round(ema, 3),
                single_acc=round(copy_ema, 3),
                distractor_acc=round(match_ema, 3),
                **(dict(attention_loss=round(attention_ema, 3)) if lookup is not None else {}),
                lr=round(lr, 6),
            )
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(dict(args=vars(args), steps=step, log=log), indent=1))
    print(f"saved to {out} after {step} steps, {time.time() - start:.0f}s", flush=True)
    if args.framed and not framing.value:
        print(f"--framed {args.framed} had no effect: the model never told keys apart (FRAME_AT {FRAME_AT})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--books", default="../shared/corpus/books")
    parser.add_argument("--out", default="examples/models/needle-small")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: the time budget only)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ff", type=int, default=768)
    parser.add_argument("--heads", type=int, default=4, help="query heads of 64 dims")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--first-weight", type=float, default=2.0, help="loss weight of the value's first digit")
    parser.add_argument(
        "--framed",
        type=float,
        default=0.0,
        help="share of prompts in framework-style templates (HEADS ... CUES), once keys are told apart (FRAME_AT)",
    )
    parser.add_argument(
        "--attention-weight", type=float, default=0.0, help="weight of the lookup attention loss (0: none)"
    )
    parser.add_argument("--attention-from", type=int, default=2, help="first layer whose head 0 the loss trains")
    parser.add_argument("--vocab", type=int, default=4096, help="learned BPE tokens (digit groups are added)")
    parser.add_argument(
        "--digit-groups",
        type=int,
        choices=(1, 3),
        default=3,
        help="digits per token: 3 (Llama 3's groups) or 1 (needle-tiny's tokenizer, as the first needle-small)",
    )
    parser.add_argument(
        "--rope-theta",
        type=float,
        default=500000.0,
        help="RoPE base: Llama 3's 500000 (full still answers at 2x the window), or 10000 as Llama 2's",
    )
    parser.add_argument(
        "--hold-fraction",
        type=float,
        default=HOLD_FRACTION,
        help="the short stages wait for key matching (MATCH_AT) at most this share of the time budget: one run left "
        "them at 0.35 (137 s) with distractor accuracy 0.64 and ended at 0.72; at 0.5 another stayed 180 s at 256 "
        "tokens and ended at 0.76 (the model card's runs)",
    )
    parser.add_argument("--batch-tokens", type=int, default=65536)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    train(parser.parse_args())


if __name__ == "__main__":
    main()
