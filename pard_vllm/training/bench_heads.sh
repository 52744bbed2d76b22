#!/bin/bash
# Training throughput of each output-layer / COD / dtype choice (same data, 2 layers, K=8, 2 rows x 512 real tokens, median of steps 2-4)
# Usage: pard_vllm/training/bench_heads.sh > runs/bench/heads.jsonl   (needs runs/data/smollm2-greedy).
cd "$(dirname "$0")/../.."  # repo root
mkdir -p runs/bench
for v in "full 0 float32" "full 0.7 float32" "frozen 0.7 float32" "sampled 0.7 float32" "frozen 0.7 bfloat16" "sampled 0.7 bfloat16" "sampled 0 float32"; do
  set -- $v
  out=runs/bench/$1-cod$2-$3
  rm -rf $out
  nice -n 19 .venv/bin/pard-vllm train --data runs/data/smollm2-greedy --out $out --layers 2 --k 8 \
     --head $1 --cod-r $2 --dtype $3 --max-steps 4 --batch-size 2 --seq-len 512 --loss ce --warmup 1 >/dev/null 2>&1
  .venv/bin/python - "$out" "$v" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1] + "/train_log.jsonl")][1:]
print(json.dumps({"variant": sys.argv[2], "real_tok_s": round(st.median(r["real_tok_s"] for r in rows), 1),
                  "packed_tok_s": round(st.median(r["packed_tok_s"] for r in rows), 1),
                  "sec_per_step": round(st.median(r["seconds"] for r in rows), 2),
                  "logits_per_step": rows[-1]["n_logits"]}), flush=True)
PY
  rm -f $out/checkpoint.pt $out/model.safetensors
done
