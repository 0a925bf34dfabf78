#!/usr/bin/env bash
# The speedrun's screening runs (README, "The 10-minute CPU speedrun"): each setting trained for
# 1,000 steps on the slice, the whole warmup and schedule squeezed into them, and its final
# validation loss over the whole validation split. One table row per setting.
#     bash experiments/speedrun.sh                                 # every row, one after another
#     bash experiments/speedrun.sh "--muon=False" "--batch_size=32" ...    # only these settings
#     OMP_NUM_THREADS=1 bash experiments/speedrun.sh               # as the README's rows were run
# A setting that changes the cost of a step is compared at equal time by giving it the step count
# that experiments/speed.py measures for it (--max_steps in the setting overrides the 1,000).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
settings=("$@")
if [ ${#settings[@]} -eq 0 ]; then
    # The first recipe, each change of the second record alone, and both (the second record); then
    # the third record, the fourth (token shift), the sixth, the seventh, the eighth, the ninth, the
    # tenth, the eleventh, the twelfth, the thirteenth and the fifteenth, today's defaults (the fifth's
    # hashed pair rows have no switch; the fourteenth changed only the step count, which every row sets).
    # before5: what the fifth to fifteenth records added, turned off; the first two records'
    # weight decay, 0.1, comes after it.
    before15="--block_size=128 --batch_size=64"
    before13="--rope_unturned_first=False $before15"
    before12="--rope_half=False $before13"
    before11="--n_head=4 $before12"
    before10="--rope=False $before11"
    before9="--shift_gate=False $before10"
    before8="--shift_reach=1 --attn_gate=False $before9"
    before5="--mlp_hidden=0 --bigram=0 --key_offset=False --swiglu=False --beta1=0.9 --beta2=0.99 --adam_eps=1e-8 --weight_decay=0 --shuffle=0 $before8"
    settings=("--muon=False --cooldown=0 --min_lr=6e-4 --token_shift=False $before5 --weight_decay=0.1"
              "--muon=False --cooldown=0.3 --min_lr=0 --token_shift=False $before5 --weight_decay=0.1"
              "--muon=True --cooldown=0 --min_lr=6e-4 --token_shift=False $before5 --weight_decay=0.1"
              "--muon=True --cooldown=0.3 --min_lr=0 --token_shift=False $before5 --weight_decay=0.1"
              "--token_shift=False $before5"
              "$before5"
              "--weight_decay=0 --shuffle=0 --mlp_hidden=179 $before8"
              "--mlp_hidden=179 $before8"
              "$before9 --mlp_hidden=177"
              "$before10 --mlp_hidden=176"
              "$before11 --mlp_hidden=219"
              "$before12"
              "$before13"
              "$before15"
              "")
fi
echo "| setting | steps | val loss (nats/char) | bits/char |"
echo "|---|---|---|---|"
for setting in "${settings[@]}"; do
    # shellcheck disable=SC2086  # a setting is several flags
    python train.py --out_dir="$tmp/out" --resume=False --max_steps=1000 \
        --log_interval=100 --eval_interval=100000 $setting > "$tmp/log"
    loss=$(grep -o 'val_loss [0-9.]*' "$tmp/log" | tail -1 | cut -d' ' -f2)
    steps=$(grep -o 'done: [0-9]* steps' "$tmp/log" | cut -d' ' -f2)
    bpc=$(python -c "import math, sys; print(f'{float(sys.argv[1]) / math.log(2):.4f}')" "$loss")
    echo "| \`${setting:-defaults}\` | $steps | $loss | $bpc |"
done
