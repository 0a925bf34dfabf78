#!/usr/bin/env bash
# The memorisation experiment of the README: staged training (2 x 30 steps) against one run of
# 60, 300 and 3,000 steps on one short question/answer text, 5 seeds each. Prints one table row
# per setting: the mean final loss on the text, and how many seeds reproduce the text exactly
# under greedy decoding from the question.
#     bash experiments/memorise.sh [--learning_rate=3e-3 ...]    (extra settings go to every run)
# With --recall, instead one run of 60 steps per seed that decodes greedily from the question after every
# step (SAMPLE_INTERVAL): the first step whose sample is the text, per seed. Compare a fresh model with
# the TinyStories one fine-tuned:
#     bash experiments/memorise.sh --recall
#     bash experiments/memorise.sh --recall --init_from=pretrained/tinystories-char.pt
set -euo pipefail
cd "$(dirname "$0")/.."
recall=false
if [ "${1:-}" = "--recall" ]; then recall=true; shift; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
question="Q: Où habite Zoé ?"
text="$question R: Zoé habite à Genève, près du lac."
printf '%s' "$text" > "$tmp/qa.txt"
common=(--dataset="$tmp/qa.txt" --batch_size=1 --warmup_steps=5 --learning_rate=3e-3 --min_lr=3e-4
        --log_interval=1000 --eval_interval=100000 --resume=False "$@")
if $recall; then
    firsts=()
    for seed in 1 2 3 4 5; do
        python train.py "${common[@]}" --max_steps=60 --seed=$seed --out_dir="$tmp/out" --sample_interval=1 \
            --sample_chars=60 --temperature=0 --prompt="$question" > "$tmp/log"
        firsts+=("$(python -c "import json, sys; rows = [json.loads(line) for line in open(sys.argv[1], encoding='utf-8')]
print(next((r['step'] for r in rows if r.get('sample') == sys.argv[2]), 'never'))" "$tmp/out/metrics.jsonl" "$text")")
    done
    echo "| settings | first step that decodes the text, seeds 1-5 |"
    echo "|---|---|"
    echo "| ${*:-(none)} | ${firsts[*]} |"
    exit
fi
echo "| run | steps | mean final loss (nats/char) | seeds reproducing the text |"
echo "|---|---|---|---|"
for run in "--stages=30,30" "--max_steps=60" "--max_steps=300" "--max_steps=3000"; do
    losses=() exact=0
    for seed in 1 2 3 4 5; do
        python train.py "${common[@]}" $run --seed=$seed --out_dir="$tmp/out" > "$tmp/log"
        losses+=("$(grep -o 'val_loss [0-9.]*' "$tmp/log" | tail -1 | cut -d' ' -f2)")
        out=$(python sample.py --out_dir="$tmp/out" --greedy --prompt "$question" --max_new_tokens=200)
        [ "$out" = "$text" ] && exact=$((exact + 1))
    done
    mean=$(python -c "import sys; v = [float(x) for x in sys.argv[1:]]; print(f'{sum(v) / len(v):.4f}')" "${losses[@]}")
    steps=$(grep -o 'done: [0-9]* steps' "$tmp/log" | cut -d' ' -f2)
    echo "| ${run#--} | $steps | $mean | $exact / 5 |"
done
