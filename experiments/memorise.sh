#!/usr/bin/env bash
# The memorisation experiment of the README: staged training (2 x 30 steps) against one run of
# 60, 300 and 3,000 steps on one short question/answer text, 5 seeds each. Prints one table row
# per setting: the mean final loss on the text, and how many seeds reproduce the text exactly
# under greedy decoding from the question.
#     bash experiments/memorise.sh [--learning_rate=3e-3 ...]    (extra settings go to every run)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
question="Q: Où habite Zoé ?"
text="$question R: Zoé habite à Genève, près du lac."
printf '%s' "$text" > "$tmp/qa.txt"
common=(--dataset="$tmp/qa.txt" --batch_size=1 --warmup_steps=5 --learning_rate=3e-3 --min_lr=3e-4
        --log_interval=1000 --eval_interval=100000 --resume=False "$@")
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
