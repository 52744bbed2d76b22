"""``pard-vllm distill``: the target's own answers (and optionally its top-k log-probs) as training data.

Why distil instead of training on a public corpus: a draft is only useful where it
agrees with the target, so the best labels are the target's own greedy outputs (what
the verifier will accept at temperature 0). Sampled answers add diversity at a cost
of some agreement; the top-k log-probabilities give the draft soft labels, far more
signal per token than the argmax alone, for the ``kd`` loss of ``pard-vllm train``.

Generation runs through vLLM's offline ``LLM`` at a large batch (the fastest path on a
CPU too). Prompts are processed in shards of ``--shard-size``; each finished shard is
written atomically as ``{tag}-shard-NNNNN.pt``, so an interrupted run resumes where it
stopped, and greedy and sampled runs can share one data folder (``tag`` encodes the
temperature). A shard holds lists of int32 tensors (prompt and response ids, the prompt
already in the chat template) and, with ``--top-logits k``, per response token the ids
(int32) and log-probs (float16) of the target's k most likely tokens.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pard_vllm.training.prompts import read_prompts


def prompt_token_ids(tokenizer, row: dict) -> list[int]:
    """The chat-templated prompt ids, as vLLM's chat endpoint would build them."""
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers >= 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _tag(temperature: float) -> str:
    return "greedy" if temperature == 0 else f"t{temperature:g}"


def _pack_logprobs(step_logprobs, k: int):
    """vLLM's per-token ``{id: Logprob}`` dicts -> ``[n, k]`` ids and log-probs, best first."""
    import torch

    n = len(step_logprobs)
    ids = torch.zeros(n, k, dtype=torch.int32)
    lps = torch.full((n, k), float("-inf"), dtype=torch.float16)
    for i, d in enumerate(step_logprobs):
        best = sorted(d.items(), key=lambda kv: -kv[1].logprob)[:k]
        for j, (tid, lp) in enumerate(best):
            ids[i, j] = tid
            lps[i, j] = lp.logprob
    return ids, lps


def distill(target: str, prompts: str, out: str, max_tokens: int = 256, temperature: float = 0.0,
            num_samples: int = 1, top_logits: int = 0, shard_size: int = 256, dtype: str = "float32",
            max_model_len: int = 1024, seed: int = 0, limit: int | None = None,
            enforce_eager: bool = True) -> Path:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from pard_vllm.server import kv_cache_kwargs

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_prompts(prompts)[:limit]
    tag = _tag(temperature)
    shards = [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)]
    todo = [i for i in range(len(shards)) if not (out_dir / f"{tag}-shard-{i:05d}.pt").exists()]
    meta = {"target": str(target), "prompts": str(prompts), "max_tokens": max_tokens,
            "temperature": temperature, "num_samples": num_samples, "top_logits": top_logits,
            "dtype": dtype, "seed": seed, "num_prompts": len(rows), "limit": limit}
    (out_dir / f"{tag}-meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if not todo:
        print(f"distill: all {len(shards)} shards of {out_dir} are done", flush=True)
        return out_dir

    # A distillation step prefills up to max_num_batched_tokens prompt tokens at once;
    # on a CPU shared with other jobs (a `nice` background run) one step can outlast
    # vLLM's 300 s execute_model RPC timeout, which kills the engine mid-shard (seen
    # here next to the test suite). Nothing waits on a distillation interactively.
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "7200")
    llm = LLM(model=str(target), dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager,
              seed=seed, max_num_seqs=256, **kv_cache_kwargs())
    tokenizer = llm.get_tokenizer()
    n = 1 if temperature == 0 else num_samples
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, n=n, seed=seed,
                            logprobs=top_logits or None)
    for i in todo:
        start = time.perf_counter()
        ids = [prompt_token_ids(tokenizer, r) for r in shards[i]]
        ids = [p[-(max_model_len - max_tokens):] for p in ids]  # keep room for the answer
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        shard = {"prompt_ids": [], "response_ids": [], "prompt_index": [], "finished": []}
        if top_logits:
            shard.update(topk_ids=[], topk_logprobs=[])
        n_tokens = 0
        for row_i, (p, o) in enumerate(zip(ids, outputs)):
            for c in o.outputs:
                shard["prompt_ids"].append(torch.tensor(p, dtype=torch.int32))
                shard["response_ids"].append(torch.tensor(list(c.token_ids), dtype=torch.int32))
                shard["prompt_index"].append(i * shard_size + row_i)
                shard["finished"].append(c.finish_reason == "stop")
                n_tokens += len(c.token_ids)
                if top_logits:
                    tid, lp = _pack_logprobs(c.logprobs or [], top_logits)
                    shard["topk_ids"].append(tid)
                    shard["topk_logprobs"].append(lp)
        path = out_dir / f"{tag}-shard-{i:05d}.pt"
        torch.save(shard, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        dt = time.perf_counter() - start
        print(f"distill: shard {i + 1}/{len(shards)}: {len(shard['response_ids'])} answers, {n_tokens} tokens, "
              f"{dt:.0f}s ({n_tokens / dt:.0f} tok/s) -> {path}", flush=True)
    return out_dir


def load_shards(data: str | Path) -> list[dict]:
    """All answers of a data folder as dicts of tensors (one per answer)."""
    import torch

    files = sorted(Path(data).glob("*-shard-*.pt"))
    if not files:
        raise SystemExit(f"error: no *-shard-*.pt files in {data}; run `pard-vllm distill` first")
    examples = []
    for f in files:
        shard = torch.load(f, weights_only=True)
        for j in range(len(shard["response_ids"])):
            ex = {"prompt_ids": shard["prompt_ids"][j].long(), "response_ids": shard["response_ids"][j].long()}
            if "topk_ids" in shard:
                ex["topk_ids"] = shard["topk_ids"][j].long()
                ex["topk_logprobs"] = shard["topk_logprobs"][j].float()
            examples.append(ex)
    return examples
