export PYTHONUNBUFFERED=1 PYTHONPATH=. TOKENIZERS_PARALLELISM=false
python3 scripts/train_needle_small.py --books .data/books --out /tmp/m --minutes 3.75 --workers 12 --threads 2 --attention-weight 0.2 --attention-from 2 --framed 0.5 > $OUT/train.log 2>&1
grep -E "stage|framework|saved" $OUT/train.log
timeout 50 python3 scripts/eval_needle_model.py --model /tmp/m --books .data/books --methods full,templates --samples 30 --lengths 3500 --out $OUT/eval.json > $OUT/eval.log 2>&1
grep "^|" $OUT/eval.log
