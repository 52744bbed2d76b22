#!/bin/bash
# Equal-steps ablation of PARD-2's loss recipe against ours, from the untrained 2-layer cut:
#   base:  --loss ce+kd                          (the shipped draft's recipe)
#   ce01:  --loss ce+kd --ce-weight 0.1          (PARD-2's term weights, no CAT)
#   cat:   --loss ce+kd --ce-weight 0.1 --cat    (PARD-2: CE 0.1 + KD 1.0, both CAT-weighted)
# Same seed, data, batches and steps for every arm; the arms train side by side (one thread
# each), so they share the machine's state. Then offline tau (K=8, greedy, full output layer)
# on the held-out answers and on 20 answers per benchmark set (distilled for evaluation only).
# Usage: [DATA=FOLDER] [SEED=N] pard_vllm/training/ablate_cat.sh [STEPS] > runs/abl-cat/results.jsonl
# (SEED=N: another draw of batches, COD and init noise, into runs/abl-cat-sN)
# Needs runs/data/{smollm2-greedy,eval-greedy,bench-humaneval-greedy,bench-gsm8k-greedy,bench-mtbench-greedy}.
cd "$(dirname "$0")/../.."  # repo root
steps=${1:-200}
data=${DATA:-runs/data/smollm2-greedy}  # DATA=... to freeze a subset of shards
seed=${SEED:-0}
root=runs/abl-cat${SEED:+-s$SEED}
mkdir -p $root
common="--data $data --layers 2 --k 8 --cod-r 0.7 --cod-min 0.2 --head sampled --negatives 2048
  --lr 5e-4 --warmup 20 --schedule cosine --max-steps $steps --seq-len 256 --batch-size 4 --mask-token 16
  --save-every-min 60 --threads 1 --seed $seed"
declare -A arms=([base]="--loss ce+kd" [ce01]="--loss ce+kd --ce-weight 0.1" [cat]="--loss ce+kd --ce-weight 0.1 --cat")
for arm in "${!arms[@]}"; do
  rm -rf $root/$arm
  .venv/bin/pard-vllm train $common ${arms[$arm]} --out $root/$arm > $root/$arm.log 2>&1 &
done
wait
for arm in base ce01 cat; do
  for set in eval-greedy bench-humaneval-greedy bench-gsm8k-greedy bench-mtbench-greedy; do
    .venv/bin/python -m pard_vllm.training.offline_tau --draft $root/$arm --data runs/data/$set \
      --head-vocab full 2>/dev/null | .venv/bin/python -c "
import json, sys
r = json.loads(sys.stdin.read())
log = [json.loads(l) for l in open('$root/$arm/train_log.jsonl')]
print(json.dumps({'arm': '$arm', 'flags': '${arms[$arm]}', 'set': '$set', 'steps': log[-1]['step'],
                  'train_seconds': log[-1]['train_seconds'], 'final_acc': log[-1]['acc'],
                  'tau': r['tau'], 'acceptance_per_pos': r.get('acceptance_per_pos')}), flush=True)"
  done
done
