"""Probe: plain next-token CE / top-1 of candidate layer cuts of the target, before training.

    .venv/bin/python pard_vllm/training/bench_layer_init.py > runs/bench/layer_init.jsonl
"""
import json
import torch
from pard_vllm.training import data as D
from pard_vllm.training.distill import load_shards
from pard_vllm.training.model import load_draft
from pard_vllm.prepare import prepare
src = prepare()["target"]
docs = D.make_docs(load_shards("runs/data/smollm2-greedy"), 512)[:24]
torch.set_grad_enabled(False)
for ids in ([0, 1], [0, 29], [0, 1, 29], [0, 1, 2, 3], [0, 1, 28, 29], list(range(30))):
    m = load_draft(src, ids)
    tot = hit = n = 0
    for d in docs:
        logits = m(input_ids=d.tokens[None]).logits[0, d.loss_from - 1:-1]
        y = d.tokens[d.loss_from:]
        tot += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum")); hit += int((logits.argmax(-1) == y).sum()); n += y.numel()
    print(json.dumps({"layer_ids": ids if len(ids) < 30 else "all30", "ce": round(tot / n, 3), "top1": round(hit / n, 3)}), flush=True)
