#!/usr/bin/env bash
# GPU benchmarks, run on the lent H100/H200 from the repo root: bash benchmarks/gpu.sh PART OUT
# PART: speed (Llama-3.1-8B shape, 8K-128K, with transformers' own forward as yardstick) | reading (read once,
#       ask 5: first and follow-up TTFT, reading size, save/load, 8K-128K; full and gemfilter, also with a 4-bit
#       reading) | homer-long (512K, 1M)
#       | decode (256 tokens after full, gemfilter, homer at 8K-128K: CUDA graph, transformers' generate, the floor;
#         and the eager loop at 8K for comparison)
#       | decode-compiled (the same with the torch.compile'd step: gemfilter and homer at 8K beside generate, full at
#         8K-128K) | decode-profile (tokens/s, replay time and kernel tables of the plain and compiled step at 1K and
#         128K keys: benchmarks/decode_profile.py)
#       | needle (bundled model, 1K-16K) | eval (bundled model, 200 samples per row)
#       | field (KIVI 4/2-bit, gemfilter + 4-bit cache and H2O beside full and gemfilter: speed, cache size, 8K-128K;
#         then the needle rows of h2o, lingua, kivi-4, kivi-2, gemfilter+kv_bits=4 on the bundled model, 1K-16K)
#       | small (train two needle-small recipes side by side, 4 min: benchmarks/needle_small_ab.sh; then evaluate each
#         (held-out books, the bench's keys, which training never used, past the window, HOMER with chunks of 2048
#         and 4096) and `longdoc tune` it, all in parallel, about 3 min; about 8 minutes in all; RECIPES=B MINUTES=6.5
#         DEADLINE=110 WORKERS=12 trains B alone: the bundled needle-small, 9 minutes)
#       | decode-kivi (256 tokens after kivi-4, kivi-2, gemfilter + kv_bits=4 beside full and gemfilter, 8K and 128K)
#       | beyond (full and HOMER at 32K and 64K on MODEL, default needle-small: 8x and 16x its window)
#       | batch (longdoc batch on one GPU: Llama-3.1-8B shape, random weights, 40 documents of 32K tokens, 5 questions
#         each: documents per hour with reuse (one job per document) and without (one job per question))
set -euo pipefail
part=$1
out=$2
export PYTHONUNBUFFERED=1
longdoc() { python3 -m cli.main "$@"; }
case $part in
speed)
    longdoc bench speed --shape llama-3.1-8b --lengths 8k,32k,64k,128k --methods full,gemfilter,homer,snapkv \
        --runs 3 --top-k 1024 --out "$out/speed" -q
    ;;
reading)
    longdoc bench speed --shape llama-3.1-8b --lengths 8k,32k,128k --methods full,gemfilter,kivi-4,gemfilter+kv_bits=4 \
        --runs 1 --no-reference --top-k 1024 --questions 5 --out "$out/reading" -q
    ;;
decode)
    longdoc bench speed --shape llama-3.1-8b --lengths 8k,32k,128k --methods full,gemfilter,homer --runs 2 \
        --decode-tokens 256 --top-k 1024 --out "$out/decode" -q
    longdoc bench speed --shape llama-3.1-8b --lengths 8k --methods gemfilter,homer --runs 1 --decode-tokens 256 \
        --top-k 1024 --no-graph --no-reference --out "$out/decode-eager" -q
    ;;
decode-compiled)
    longdoc bench speed --shape llama-3.1-8b --lengths 8k --methods gemfilter,homer --runs 1 --decode-tokens 256 \
        --top-k 1024 --compile --out "$out/decode-compiled" -q
    longdoc bench speed --shape llama-3.1-8b --lengths 8k,32k,128k --methods full --runs 1 --decode-tokens 256 \
        --no-reference --compile --out "$out/decode-compiled-full" -q
    ;;
decode-profile)
    PYTHONPATH=. python3 benchmarks/decode_profile.py "$out" --lengths 1056,131072 --paths triton
    ;;
homer-long)
    longdoc bench speed --shape llama-3.1-8b --lengths 512k,1024k --methods homer --runs 1 --no-reference \
        --out "$out/homer-long" -q
    ;;
needle)
    longdoc bench needle --model examples/models/needle-tiny --books "${BOOKS:-.data/books}" \
        --methods full,gemfilter,homer,snapkv,streaming,rag --lengths 1k,2k,4k,8k,16k --depths 0,0.25,0.5,0.75,1 \
        --samples 6 --top-k 256 -o gemfilter.filter_layer=7 -o gemfilter.score=softmax -o gemfilter.pool_kernel=41 -o gemfilter.query_tokens=16 \
        --out "$out/needle" -q
    ;;
eval)
    python3 scripts/eval_needle_model.py --model examples/models/needle-tiny --books "${BOOKS:-.data/books}" \
        --samples 200 --sweep-samples 50 --lengths 1024,2048,3500 --out "$out/needle-tiny-eval.json"
    ;;
field)
    longdoc bench speed --shape llama-3.1-8b --lengths 8k,32k,128k \
        --methods full,kivi-4,kivi-2,gemfilter,gemfilter+kv_bits=4,h2o,snapkv --runs 3 --top-k 1024 \
        --out "$out/speed-field" -q
    longdoc bench needle --model examples/models/needle-tiny --books "${BOOKS:-.data/books}" \
        --methods h2o,lingua,kivi-4,kivi-2,gemfilter+kv_bits=4 --lengths 1k,2k,4k,8k,16k --depths 0,0.25,0.5,0.75,1 \
        --samples 6 --top-k 256 -o gemfilter.filter_layer=7 -o gemfilter.score=softmax -o gemfilter.pool_kernel=41 \
        -o gemfilter.query_tokens=16 --out "$out/needle-field" -q
    ;;
small)
    # Two recipes side by side (digits in groups of three; with and without the lookup-attention loss), then each
    # evaluated and tuned; back in OUT: {A,B}-logs.tgz and {A,B}-model.tgz.* (cat A-model.tgz.* | tar xzf -).
    # TRAIN_ARGS go to both trainings (e.g. TRAIN_ARGS="--rope-theta 10000").
    # shellcheck disable=SC2086
    bash benchmarks/needle_small_ab.sh "$out" "${BOOKS:-.data/books}" "${MINUTES:-4.0}" "${DEADLINE:-130}" ${TRAIN_ARGS:-}
    ;;
decode-kivi)
    # KIVI caches decoding in the CUDA graph through flash_decode's quantized kernel (the codes read where they lie),
    # beside full and gemfilter: 256 new tokens at 8K and 128K, Llama-3.1-8B shape, plain graph.
    longdoc bench speed --shape llama-3.1-8b --lengths 8k,128k --methods full,kivi-4,kivi-2,gemfilter,gemfilter+kv_bits=4 \
        --runs 1 --decode-tokens 256 --top-k 1024 --no-reference --out "$out/decode-kivi" -q
    ;;
beyond)
    # Far past the window (8x and 16x 4096), where the bundled needle-small's full attention stops answering: full
    # and HOMER (default chunks, and chunks of 4096) at 32K and 64K tokens, 60 haystacks each (full 30), in parallel.
    # Each haystack has one needle at a random depth (eval_needle_model.py's sampling).
    m=${MODEL:-examples/models/needle-small}
    mkdir -p "$out"
    pids=()
    for homer in '{}' '{"max_chunk_len": 4096}'; do
        name=beyond-homer$(echo "$homer" | tr -dc 0-9)
        python3 scripts/eval_needle_model.py --model "$m" --books "${BOOKS:-.data/books}" --methods none \
            --beyond 32768,65536 --beyond-samples "${BEYOND:-60}" --homer "$homer" --out "$out/$name.json" \
            >"$out/$name.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done  # a failed eval fails the part (set -e)
    ;;
batch)
    PYTHONPATH=. python3 benchmarks/batch_throughput.py "$out/batch" --documents 40 --tokens 32768 --questions 5 --top-k 1024
    ;;
esac
