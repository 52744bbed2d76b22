"""``pard-vllm train``: layouts and labels, the attention hook, a tiny real run, and vLLM serving its output.

The data is a hand-made shard in ``pard-vllm distill``'s format (a few chat-templated
prompts and answers tokenized here), so the test needs no generation engine; the trained
draft is then loaded by a real vLLM engine with ``"method": "pard"``.
"""

from __future__ import annotations

import json

import pytest
import torch

from pard_vllm.server import CPU_KV_CACHE_BYTES
from pard_vllm.training import data as D

ANSWERS = [
    ("Write a function that adds two numbers.", "def add(a, b):\n    return a + b\n\nThis returns the sum."),
    ("Name three colors.", "Three colors are red, green and blue. Red is warm, blue is cool."),
    ("What is 12 times 3?", "12 times 3 is 36, because 12 + 12 + 12 = 36."),
    ("Explain what a list is in Python.", "A list is an ordered, mutable collection, written with brackets."),
]


@pytest.fixture(scope="module")
def tiny_data(embedded, tmp_path_factory):
    from transformers import AutoTokenizer

    from pard_vllm.training.distill import prompt_token_ids

    tok = AutoTokenizer.from_pretrained(embedded["target"])
    shard = {"prompt_ids": [], "response_ids": [], "topk_ids": [], "topk_logprobs": []}
    gen = torch.Generator().manual_seed(0)
    for q, a in ANSWERS:
        p = torch.tensor(prompt_token_ids(tok, {"prompt": q}), dtype=torch.int32)
        r = torch.tensor(tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"], dtype=torch.int32)
        others = torch.randint(100, 40000, (r.numel(), 3), generator=gen, dtype=torch.int32)
        shard["prompt_ids"].append(p)
        shard["response_ids"].append(r)
        shard["topk_ids"].append(torch.cat([r[:, None], others], 1))
        shard["topk_logprobs"].append(torch.tensor([[-0.1, -3.0, -4.0, -5.0]]).repeat(r.numel(), 1).half())
    folder = tmp_path_factory.mktemp("data")
    torch.save(shard, folder / "greedy-shard-00000.pt")
    return folder


def test_labels_follow_the_pard_rule(tiny_data):
    from pard_vllm.training.distill import load_shards

    docs = D.make_docs(load_shards(tiny_data), seq_len=256)
    b = D.collate(docs, [[0, 1], [2]], k=4, mask_token=16, pad_token=0, cod_r=0.7, cod_min=0.2, seed=1)
    for row in range(2):
        for t in range(b["input_ids"].shape[1]):
            blk, pos, doc, lab = (int(b[n][row, t]) for n in ("block_ids", "position_ids", "doc_ids", "labels"))
            if doc >= len([[0, 1], [2]][row]):
                assert lab == D.IGNORE  # padding document
                continue
            d = docs[[[0, 1], [2]][row][doc]]
            assert pos >= blk
            assert int(b["input_ids"][row, t]) == (int(d.tokens[pos]) if blk == 0 else 16)
            target = pos + 1
            if target < d.tokens.numel() and target >= d.loss_from:
                assert lab == int(d.tokens[target])
            else:
                assert lab == D.IGNORE
    # conditional drop shrinks the later blocks
    counts = torch.bincount(b["block_ids"][1][b["doc_ids"][1] == 0])
    assert counts[0] > counts[1] > counts[3]


def test_cat_weights_follow_the_docstring_example():
    """The worked example of data.py: answer probabilities 0.9, 0.5, 0.8, 1.0."""
    import math

    probs = [0.9, 0.5, 0.8, 1.0]
    tokens = torch.tensor([5, 6, 7, 8])
    others = torch.tensor([[9, 10]] * 4)
    doc = D.Doc(tokens, 0, torch.cat([tokens[:, None], others], 1),
                torch.tensor([[math.log(q), -9.0, -10.0] for q in probs]))
    blocks, pos = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([3, 2, 2, 3, 1])
    w = D.cat_weights(doc, blocks, pos)
    assert torch.allclose(w, torch.tensor([1.0, 0.8, 0.4, 0.4, 0.5]))
    # a sampled token outside the top-k weighs the k-th probability; prompt tokens weigh 1
    doc2 = D.Doc(tokens, 2, torch.tensor([[1, 2, 3], [8, 4, 5]]), torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -2.0, -4.0]]))
    assert torch.allclose(D.gold_logprobs(doc2), torch.tensor([0.0, 0.0, -3.0, -0.5]))
    with pytest.raises(SystemExit, match="--top-logits"):
        D.gold_logprobs(D.Doc(tokens, 2))


def test_cat_weighted_loss_is_the_weighted_mean(tiny_data):
    from pard_vllm.training.distill import load_shards
    from pard_vllm.training.losses import head_and_loss

    docs = D.make_docs(load_shards(tiny_data), seq_len=256)
    b = D.collate(docs, [[0, 1], [2]], k=4, mask_token=16, pad_token=0, cod_r=0.7, cod_min=0.2, seed=1,
                  with_topk=True, with_cat=True)
    n = int((b["labels"] != D.IGNORE).sum())
    w = b["cat_weight"]
    assert w.shape == (n,) and b["topk_ids"].shape[0] == n
    blocks = b["block_ids"].reshape(-1)[b["labels"].reshape(-1) != D.IGNORE]
    # The fixture's answer tokens have P(gold) = e^-0.1 and prompt tokens weigh 1, so block b
    # weighs e^(-0.1 m), m = how many of the b tokens behind its masks are answer tokens.
    m = -torch.log(w) / 0.1
    assert torch.allclose(m, m.round(), atol=1e-2) and bool((m.round() <= blocks).all())
    assert bool((w[blocks == 0] == 1).all()) and float((m.round() == blocks).float().mean()) > 0.8
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(*b["input_ids"].shape, 8, generator=gen), torch.randn(64000, 8, generator=gen)
    plain, _ = head_and_loss(hidden, {k: v for k, v in b.items() if k != "cat_weight"}, weight, "full", "ce")
    weighted, _ = head_and_loss(hidden, b, weight, "full", "ce", ce_weight=0.1)
    b_ones = dict(b, cat_weight=torch.ones(n))
    unweighted, _ = head_and_loss(hidden, b_ones, weight, "full", "ce", ce_weight=0.1)
    assert torch.allclose(unweighted, 0.1 * plain)
    assert float(weighted) < float(unweighted)  # weights <= 1 on a positive loss


def test_negative_ce_weight_is_one_line_and_writes_nothing(tiny_data, tmp_path):
    from pard_vllm.cli import main

    with pytest.raises(SystemExit, match="--ce-weight -0.1 is negative"):
        main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "d"), "--ce-weight", "-0.1"])
    assert not (tmp_path / "d").exists()


def test_grown_draft_starts_where_the_draft_was_and_resumes(embedded, tiny_data, tmp_path):
    """--grow appends target layers with zeroed outputs: the same function at step 0,
    one more layer in the written checkpoint, and --resume rebuilds the grown shape."""
    from pard_vllm.cli import main
    from pard_vllm.training.model import grow_draft, load_draft

    base = load_draft(embedded["target"], [0, 1])
    grown = load_draft(embedded["target"], [0, 1])
    grow_draft(grown, embedded["target"], [2, 3])
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30]])
    with torch.no_grad():
        assert len(grown.model.layers) == 4
        assert torch.equal(base(ids).logits, grown(ids).logits)
    with pytest.raises(SystemExit, match="has 30; grow by fewer"):
        grow_draft(grown, embedded["target"], [30])

    out = tmp_path / "grown"
    args = ["train", "--data", str(tiny_data), "--out", str(out), "--layers", "1", "--grow", "1", "--k", "4",
            "--batch-size", "2", "--seq-len", "256", "--loss", "ce", "--head", "sampled", "--negatives", "256"]
    assert main(args + ["--max-steps", "2"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["pard_train"]["layer_ids"] == [0, 1]
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert float(weights["model.layers.1.self_attn.o_proj.weight"].abs().sum()) > 0  # the new layer learns
    assert main(args + ["--max-steps", "3", "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_hook_matches_dense_mask_and_plain_causal(embedded, tiny_data):
    from pard_vllm.training.distill import load_shards
    from pard_vllm.training.model import PardLayout, attention_backend, load_draft, set_pard_attention

    plain = load_draft(embedded["target"], [0, 1])
    model = load_draft(embedded["target"], [0, 1])
    set_pard_attention(model)
    docs = D.make_docs(load_shards(tiny_data), seq_len=256)
    b = D.collate(docs, [[0, 1]], k=4, mask_token=16, pad_token=0, cod_r=None, cod_min=0.2, seed=0)
    layout = PardLayout(b["block_ids"], b["position_ids"], b["doc_ids"])
    with torch.no_grad():
        fast = model.model(input_ids=b["input_ids"], position_ids=b["position_ids"], pard_layout=layout)
        try:
            attention_backend("dense")
            dense = model.model(input_ids=b["input_ids"], position_ids=b["position_ids"], pard_layout=layout)
        finally:
            attention_backend("kernel")
        ref = plain.model(input_ids=docs[1].tokens[None]).last_hidden_state[0]
    assert torch.allclose(fast.last_hidden_state, dense.last_hidden_state, atol=1e-4)
    real_doc1 = (b["doc_ids"][0] == 1) & (b["block_ids"][0] == 0)
    assert torch.allclose(fast.last_hidden_state[0][real_doc1], ref, atol=1e-4)


def test_train_tiny_draft_then_vllm_serves_it(embedded, tiny_data, tmp_path):
    from pard_vllm.cli import main

    out = tmp_path / "draft"
    rc = main(["train", "--data", str(tiny_data), "--out", str(out), "--layers", "1", "--k", "4",
               "--max-steps", "12", "--batch-size", "2", "--seq-len", "256", "--lr", "2e-3", "--warmup", "1",
               "--schedule", "constant", "--loss", "ce+kd", "--head", "sampled", "--negatives", "512"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.7 * first, (first, last)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pard_token"] == 16 and cfg["spd_type"] == "pard"
    assert cfg["num_hidden_layers"] == 1 and cfg["rope_theta"] == 100000.0
    assert cfg.get("_attn_implementation") in (None, "sdpa") and "attn_implementation" not in cfg

    # resume continues from the checkpoint instead of starting over
    rc = main(["train", "--data", str(tiny_data), "--out", str(out), "--max-steps", "13", "--resume",
               "--batch-size", "2", "--seq-len", "256", "--loss", "ce+kd", "--head", "sampled"])
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert rc == 0 and [r["step"] for r in rows[-2:]] == [12, 13]

    from vllm import LLM, SamplingParams

    from pard_vllm.training.evaluate import engine_lock, spec_counters

    with engine_lock():
        llm = LLM(model=embedded["target"], dtype="float32", enforce_eager=True,
                  kv_cache_memory_bytes=CPU_KV_CACHE_BYTES, max_model_len=512, seed=0, disable_log_stats=False,
                  speculative_config={"method": "pard", "model": str(out), "num_speculative_tokens": 4})
        try:
            res = llm.generate(["Name three colors."], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
            counters = spec_counters(llm)
        finally:
            llm.llm_engine.engine_core.shutdown()
    assert len(res[0].outputs[0].token_ids) == 12
    assert counters["drafts"] > 0
