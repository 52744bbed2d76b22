"""tau (mean acceptance length, bonus token included) of a PARD draft per prompt set, by vLLM.

    flock /tmp/pard-vllm-engine.lock .venv/bin/python benchmarks/draft_tau.py \\
        --k 4,8 --datasets humaneval,gsm8k,mtbench --num-prompts 40 --max-tokens 128 --out tau.json

Greedy, fp32, eager, one ``LLM`` with ``"method": "pard"`` per K (shut down before the
next, so two engines never share the CPU); each dataset is one batched ``llm.chat``
call and reads its own share of vLLM's spec-decode counters. ``--draft`` takes a
servable draft folder or a shipped one (``pard_vllm/drafts/*``, no embeddings: it is
completed with the target's embeddings in a temp folder first); the default is the
embedded draft. Prompts: the Spec-Bench loaders of ``specbench_data.py`` (evenly
spaced picks, the same prompts as ``spec_bench.py``). Take the engine lock outside
(``flock``) as above; this script does not take it itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import specbench_data  # noqa: E402
from specbench_common import environment, spec_delta  # noqa: E402
from specbench_offline import counters  # noqa: E402

from pard_vllm.server import kv_cache_kwargs, shutdown_engine  # noqa: E402


def servable_draft(draft: str, target: str, tmp: str) -> str:
    """``draft`` itself, or for a shipped folder (``pard_export`` in its config) a full
    draft built from it the way ``pard_vllm.prepare`` builds the embedded one."""
    cfg = json.loads((Path(draft) / "config.json").read_text())
    if "pard_export" not in cfg:
        return draft
    from pard_vllm.prepare import build_shipped_draft

    out = Path(tmp) / "draft"
    out.mkdir()
    build_shipped_draft(Path(target), out, shipped=Path(draft))
    return str(out)


def run_k(target: str, draft: str, k: int, data: dict[str, list[str]], args, head_vocab=None) -> list[dict]:
    from vllm import LLM, SamplingParams

    spec = {"method": "pard", "model": draft, "num_speculative_tokens": k}
    if head_vocab is not None:
        spec["head_vocab"] = head_vocab
    llm = LLM(target, speculative_config=spec, dtype="float32", enforce_eager=True,
              max_model_len=args.max_model_len, seed=0, disable_log_stats=False,
              **kv_cache_kwargs())
    rows = []
    try:
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        for name, prompts in data.items():
            before = counters(llm)
            t0 = time.perf_counter()
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            stats = spec_delta(before, counters(llm))
            rows.append({"dataset": name, "k": k, "head_vocab": "draft's" if head_vocab is None else head_vocab,
                         "n_prompts": len(prompts), "seconds": round(seconds, 2),
                         "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs), **stats})
            print(f"draft_tau: K={k} head_vocab={head_vocab} {name}: tau={stats['tau']}", file=sys.stderr, flush=True)
    finally:
        shutdown_engine(llm)
    return rows


def markdown(rows: list[dict]) -> str:
    k_max = max(r["k"] for r in rows)
    head = ("| dataset | K | head_vocab | tau | " + " | ".join(f"p{i + 1}" for i in range(k_max))
            + " | prompts | tokens |")
    lines = [head, "|" + "---|" * (k_max + 6)]
    for r in rows:
        pos = list(r["acceptance_per_position"] or [])
        cells = [f"{p:.3f}" for p in pos] + ["" for _ in range(k_max - len(pos))]
        tau = f"{r['tau']:.3f}" if r["tau"] is not None else "n/a"
        lines.append(f"| {r['dataset']} | {r['k']} | {r.get('head_vocab', '')} | {tau} | " + " | ".join(cells)
                     + f" | {r['n_prompts']} | {r['output_tokens']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", help="draft folder, servable or shipped (default: the embedded draft)")
    ap.add_argument("--target", help="target model (default: the embedded SmolLM2)")
    ap.add_argument("--k", default="4,8", help="comma-separated K values, one engine each")
    ap.add_argument("--datasets", default="humaneval,gsm8k,mtbench")
    ap.add_argument("--num-prompts", type=int, default=40, help="per dataset (evenly spaced picks)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--head-vocab", default="draft",
                    help="comma list: 'draft' (the draft's own head vocabulary, if any), 0 (full output "
                         "layer) or N ids; one engine per K and value")
    ap.add_argument("--out", help="write the records as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pard_vllm.prepare import prepare

    paths = prepare()
    target = args.target or paths["target"]
    data = specbench_data.load([d for d in args.datasets.split(",") if d], args.num_prompts)
    rows = []
    with tempfile.TemporaryDirectory(prefix="draft-tau-") as tmp:
        draft = servable_draft(args.draft or paths["draft"], target, tmp)
        draft_cfg = json.loads((Path(draft) / "config.json").read_text())
        heads = [None if h == "draft" else int(h) for h in args.head_vocab.split(",") if h]
        for k in (int(x) for x in args.k.split(",")):
            for head_vocab in heads:
                rows += run_k(target, draft, k, data, args, head_vocab)
    table = markdown(rows)
    print(table)
    if args.out:
        record = {"draft": args.draft or paths["draft"], "target": target,
                  "pard_train_step": (draft_cfg.get("pard_train") or {}).get("step"),
                  "settings": {"greedy": True, "dtype": "float32", "enforce_eager": True,
                               "max_tokens": args.max_tokens, "num_prompts": args.num_prompts},
                  "command": " ".join(sys.argv), "environment": environment(), "results": rows,
                  "table": table}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
