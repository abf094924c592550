#!/usr/bin/env bash
# Two needle-small recipes side by side on one GPU (issue #23), then evaluation and `longdoc tune` of each, in parallel.
#   bash benchmarks/needle_small_ab.sh OUT BOOKS MINUTES EVAL_DEADLINE [extra train args]
# A: scripts/train_needle_small.py's defaults (digits in groups of three, no attention loss).
# B: the same with the lookup-attention loss (--attention-weight 0.2 on head 0 of layers 2-11).
# Each: 7 data workers (16 cores for both). Rows per model: full at 3500 tokens (1 and 4 needles, pass key), GemFilter
# with the paper's scoring (layer sweep, then the best layer), HOMER (default chunks, and chunks of 4096) and full at
# 8K and 16K (with FAR=32768,65536 there too); `longdoc tune` writes the profile into the model; then full and the
# tuned GemFilter through the frameworks' prompt templates (eval_needle_model.py's TEMPLATES).
# Back in OUT: {A,B}-logs.tgz, {A,B}-model.tgz.* (in pieces of 15 MB: cat A-model.tgz.* | tar xzf -).
# Smoke test on CPU (2 minutes): WORKERS=1 SAMPLES=2 SWEEP=1 BEYOND=1 TUNE=2 bash benchmarks/needle_small_ab.sh \
#   /tmp/ab BOOKS 0.15 60 --layers 4 --hidden 64 --ff 128 --batch-tokens 4096 --threads 1
set -uo pipefail
out=$1; books=$2; minutes=$3; deadline=$4; shift 4
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$here:.
mkdir -p "$out/work"
w=$out/work
train() {  # name, then train args
    local name=$1; shift
    python3 "$here/scripts/train_needle_small.py" --books "$books" --out "$w/$name/model" --minutes "$minutes" "$@" \
        >"$w/$name/train.log" 2>&1
}
recipes=${RECIPES:-A B}  # RECIPES=B trains B alone (the whole GPU and all 16 cores: WORKERS=14)
for name in $recipes; do mkdir -p "$w/$name"; done
[[ " $recipes " == *" A "* ]] && train A --workers ${WORKERS:-7} --threads 2 "$@" &
[[ " $recipes " == *" B "* ]] && train B --workers ${WORKERS:-7} --threads 2 --attention-weight 0.2 --attention-from 2 "$@" &
wait
ev() {  # name, log name, eval args
    local name=$1 log=$2; shift 2
    timeout $((deadline + 45)) python3 "$here/scripts/eval_needle_model.py" --model "$w/$name/eval-model" --books "$books" \
        --lengths 3500 --deadline "$deadline" --out "$w/$name/$log.json" "$@" >"$w/$name/$log.log" 2>&1
}
for name in $recipes; do
    cp -r "$w/$name/model" "$w/$name/eval-model"  # tune writes its profile into the model folder meanwhile
    ev $name eval-full --methods full --samples ${SAMPLES:-100} --beyond 8192,16384 --beyond-samples ${BEYOND:-60} &
    ev $name eval-gem --methods gemfilter --gem paper --samples ${SAMPLES:-100} --sweep-samples ${SWEEP:-30} &
    ev $name eval-homer4096 --methods none --beyond 8192,16384 --beyond-samples ${BEYOND:-60} --homer '{"max_chunk_len": 4096}' &
    timeout $((deadline + 45)) python3 -m cli.main tune "$w/$name/model" --books "$books" --samples ${TUNE:-16} \
        --lengths 2048 >"$w/$name/tune.log" 2>&1 &
    # FAR=32768,65536: full and HOMER far past the window too (FAR_SAMPLES haystacks, full half as many)
    [[ -n "${FAR:-}" ]] && ev $name eval-far --methods none --beyond "$FAR" --beyond-samples ${FAR_SAMPLES:-30} &
done
wait
for name in $recipes; do  # the model with its tuned profile goes back first (a run past its limit keeps it)
    tar czf - -C "$w/$name" model | split -b 15M - "$out/$name-model.tgz."
done
for name in $recipes; do  # the frameworks' templates, full and the tuned gemfilter (the profile tune just wrote)
    rm -rf "$w/$name/eval-model" && cp -r "$w/$name/model" "$w/$name/eval-model"
    ev $name eval-templates --methods templates --samples ${TEMPLATE_SAMPLES:-100} &
done
wait
for name in $recipes; do
    rm -rf "$w/$name/eval-model"
    tar czf "$out/$name-logs.tgz" -C "$w/$name" --exclude model .
done
rm -rf "$w"
ls -la "$out"
