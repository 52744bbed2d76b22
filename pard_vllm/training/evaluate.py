"""Mean acceptance length (tau) of a draft, measured by vLLM itself with ``"method": "pard"``.

Why vLLM and not a training-side proxy: tau depends on the serving path (mask layout,
KV rollback, the rejection sampler) as well as on the weights, and the number that
matters is the one users get. Run as a separate process so the training process never
holds an engine, and take a file lock so two engines never share the 2-core box.

    python -m pard_vllm.training.evaluate --draft runs/x --prompts runs/data/eval_prompts.jsonl --n 20
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pard_vllm.server import shutdown_engine

LOCK = Path(tempfile.gettempdir()) / "pard-vllm-engine.lock"


@contextlib.contextmanager
def engine_lock():
    """Serialise vLLM engines started by our tools/tests on this machine."""
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def spec_counters(llm) -> dict:
    out = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": []}
    for m in llm.get_metrics():
        if m.name == "vllm:spec_decode_num_drafts":
            out["drafts"] += m.value
        elif m.name == "vllm:spec_decode_num_draft_tokens":
            out["draft_tokens"] += m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens":
            out["accepted"] += m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            out["per_pos"] = list(m.values)
    return out


def measure_tau(target: str, draft: str, prompts: list[str], k: int = 8, max_tokens: int = 128,
                dtype: str = "float32") -> dict:
    from vllm import LLM, SamplingParams

    from pard_vllm.server import kv_cache_kwargs
    from pard_vllm.training.distill import prompt_token_ids

    spec = {"method": "pard", "model": draft, "num_speculative_tokens": k}
    with engine_lock():
        llm = LLM(model=target, dtype=dtype, enforce_eager=True, max_model_len=1024, seed=0,
                  speculative_config=spec, disable_log_stats=False, **kv_cache_kwargs())
        try:
            from vllm.inputs import TokensPrompt

            tok = llm.get_tokenizer()
            ids = [TokensPrompt(prompt_token_ids=prompt_token_ids(tok, {"prompt": p})) for p in prompts]
            start = time.perf_counter()
            outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
            seconds = time.perf_counter() - start
            c = spec_counters(llm)
        finally:
            shutdown_engine(llm)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    tau = 1 + c["accepted"] / c["drafts"] if c["drafts"] else float("nan")
    per_pos = [a / c["drafts"] for a in c["per_pos"]] if c["drafts"] else []
    return {"tau": tau, "k": k, "n_prompts": len(prompts), "output_tokens": n_out, "seconds": seconds,
            "acceptance_per_pos": per_pos}


def measure_tau_subprocess(target: str, draft: str, prompts_file: str, n: int, k: int = 8,
                           max_tokens: int = 128, timeout: float = 900) -> dict:
    """Run ``measure_tau`` in a fresh process (the trainer stays engine-free)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        cmd = [sys.executable, "-m", "pard_vllm.training.evaluate", "--target", target, "--draft", draft,
               "--prompts", prompts_file, "--n", str(n), "-k", str(k), "--max-tokens", str(max_tokens),
               "--json-out", f.name]
        env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            return {"error": (r.stderr or r.stdout)[-2000:]}
        return json.loads(Path(f.name).read_text())


def main(argv=None) -> int:
    from pard_vllm.training.prompts import read_prompts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target")
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    if not args.target:
        from pard_vllm.prepare import prepare

        args.target = prepare()["target"]
    prompts = [r["prompt"] for r in read_prompts(args.prompts)[: args.n]]
    res = measure_tau(args.target, args.draft, prompts, k=args.k, max_tokens=args.max_tokens)
    print(json.dumps(res))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
