"""Spec-Bench-style comparison of speculative decoding methods in vLLM, on your machine.

Every method runs on the same target, the same prompts and the same batches in one
run, so "speedup" is always against the ``ar`` (no speculation) engine measured
minutes earlier on the same machine, never against a number from elsewhere.

    .venv/bin/python benchmarks/spec_bench.py --preset quick --out runs/spec_bench/quick
    .venv/bin/python benchmarks/spec_bench.py --preset full --out runs/spec_bench/full
    .venv/bin/python benchmarks/spec_bench.py --methods ar,pard --datasets gsm8k \\
        --batch-sizes 1,4 --temperatures 0 --num-prompts 8 --max-tokens 128 --out DIR
    .venv/bin/python benchmarks/spec_bench.py --preset quick --online --out DIR

Methods (``NAME@K`` runs one at its own K, e.g. ``vllm_parallel@2``; ``NAME@K:DIR``
also with its own draft, e.g. ``pard@4:runs/pard-4l``): ar, vsd
(vLLM draft_model: the draft drafts autoregressively), vllm_parallel
(vLLM's native parallel drafting with the same draft), pard (this plugin, with its
prompt lookup), pard_nolookup (its draft alone), ngram (vLLM's prompt lookup), suffix
(only where arctic-inference is installed). Datasets:
humaneval, gsm8k, mtbench (first turns), plus ``--prompts-file`` JSONL. Explicit
flags override the preset's values.

On a shared or noisy machine add ``--passes 2`` (or more): every method runs again in
the reverse order and each cell keeps its fastest pass (all passes' tokens/s are in the
record), so a burst of other load cannot decide a comparison.

Writes DIR/results.json (one record per cell), DIR/results.md and PNG plots.
Offline semantics (waves of b requests) are explained in specbench_offline.py;
the online mode (``--online``, a real ``vllm serve`` per method) in specbench_online.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Engines on a small CPU box: keep vLLM's log noise down; never reach the hub.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import specbench_data  # noqa: E402
from specbench_common import DRAFTED_METHODS, METHODS, base_name, environment, method_spec, unsupported_reason  # noqa: E402

#: quick: the 15-minute smoke run on a 2-core CPU; full: the published matrix.
PRESETS = {
    "quick": dict(methods="ar,vsd,vllm_parallel,ngram,pard_nolookup,pard,pard_adaptive", datasets="humaneval",
                  batch_sizes="1,4", temperatures="0", num_prompts=8, max_tokens=64),
    "full": dict(methods=",".join(METHODS), datasets="humaneval,gsm8k,mtbench",
                 batch_sizes="1,4,16", temperatures="0,0.7", num_prompts=32, max_tokens=256),
}
DEFAULTS = PRESETS["quick"]


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="base configuration (default: quick values)")
    p.add_argument("--methods", type=_csv(str))
    p.add_argument("--datasets", type=_csv(str), help="humaneval,gsm8k,mtbench (comma list)")
    p.add_argument("--prompts-file", help='extra JSONL dataset, one {"prompt": ...} per line')
    p.add_argument("--batch-sizes", type=_csv(int))
    p.add_argument("--temperatures", type=_csv(float))
    p.add_argument("--num-prompts", type=int, help="prompts per dataset (evenly spaced picks)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--target", help="target model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--draft", help="draft model for vsd/vllm_parallel/pard (default: embedded draft)")
    p.add_argument("-k", "--k", type=int, default=8, help="draft tokens per step (default 8)")
    p.add_argument("--dtype", default="float32", help="float32 (default; exact on CPU) or bfloat16")
    p.add_argument("--compile", action="store_true", help="let vLLM compile (default: enforce_eager)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--passes", type=int, default=1,
                   help="offline: run every method this many times, alternating the order (forward, "
                        "backward, ...), and keep each cell's fastest pass; for noisy shared machines")
    p.add_argument("--online", action="store_true", help="drive `vllm serve` over HTTP instead")
    p.add_argument("--requests", type=int, default=None,
                   help="online: requests per concurrency level (default: 2 x concurrency, >= 4)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="online: seconds per request")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    base = PRESETS[args.preset] if args.preset else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            parser = {"methods": _csv(str), "datasets": _csv(str), "batch_sizes": _csv(int),
                      "temperatures": _csv(float)}.get(key)
            setattr(args, key, parser(value) if parser else value)
    for m in args.methods:
        method_spec(m, "", 1)  # validates the name
    if args.passes < 1:
        p.error(f"--passes must be at least 1 (got {args.passes})")
    if "ar" in args.methods:  # ar first: the others are compared with it
        args.methods = ["ar"] + [m for m in args.methods if m != "ar"]
    return args


def resolve_models(args) -> None:
    if args.target and args.draft:
        return
    needs_draft = any(base_name(m) in DRAFTED_METHODS for m in args.methods)
    if args.target is None or (args.draft is None and needs_draft):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from pard_vllm.prepare import prepare

        paths = prepare()
        args.target = args.target or paths["target"]
        args.draft = args.draft or paths["draft"]


def compare_with_ar(records: list[dict]) -> None:
    """Speedup vs ar of the same (dataset, batch, temperature) cell, and at
    temperature 0 the share of outputs whose token ids equal ar's."""
    ar = {(r["dataset"], r["batch_size"], r["temperature"]): r for r in records
          if r["method"] == "ar" and r.get("status") == "ok"}
    for r in records:
        base = ar.get((r["dataset"], r["batch_size"], r["temperature"]))
        r["speedup_vs_ar"] = r["identical_to_ar"] = None
        if base is None or r.get("status") != "ok":
            continue
        if r.get("tokens_per_s") and base.get("tokens_per_s"):
            r["speedup_vs_ar"] = r["tokens_per_s"] / base["tokens_per_s"]
        if r["temperature"] == 0 and "_ids" in r and "_ids" in base:
            same = sum(a == b for a, b in zip(r["_ids"], base["_ids"]))
            r["identical_to_ar"] = same / len(base["_ids"])


def run_offline(args, data, env, config) -> list[dict]:
    from tqdm import tqdm

    records = []
    cells_per_method = len(args.temperatures) * len(args.batch_sizes)
    per_method = sum(len(p) for p in data.values()) * cells_per_method
    with tqdm(total=per_method * len(args.methods) * args.passes, desc="spec_bench", unit="req",
              dynamic_ncols=True) as bar:
        for n in range(args.passes):
            # Alternate the order so no method always runs first (or last) in a drift.
            order = args.methods if n % 2 == 0 else args.methods[::-1]
            for method in order:
                if n and any(r["method"] == method and r["status"] != "ok" for r in records):
                    bar.update(per_method)  # failed or unsupported once: not retried
                    continue
                records += _run_one(method, args, data, env, config, bar, per_method)
    records = keep_fastest_pass(records, args.passes)
    compare_with_ar(records)
    return records


def _run_one(method, args, data, env, config, bar, per_method) -> list[dict]:
    from tqdm import tqdm

    from specbench_offline import run_method

    spec = method_spec(method, args.draft, args.k)
    base = {"method": method, "speculative_config": spec, **config, **env}
    reason = unsupported_reason(method)
    if reason is None:
        try:
            return [{**base, **r, "status": "ok"} for r in run_method(method, spec, data, args, bar)]
        except Exception as err:  # record it and go on with the other methods
            reason = f"engine failed: {type(err).__name__}: {' '.join(str(err).split())[:500]}"
    tqdm.write(f"{method}: not run: {reason}")
    bar.update(per_method)
    return [{**base, "dataset": ds, "batch_size": b, "temperature": t, "num_prompts": len(prompts),
             "status": "unsupported", "reason": reason}
            for ds, prompts in data.items() for t in args.temperatures for b in args.batch_sizes]


def keep_fastest_pass(records: list[dict], passes: int) -> list[dict]:
    """One record per (method, dataset, batch, temperature): the pass with the
    highest tokens/s (the least disturbed by other load), carrying every pass's
    tokens/s under ``tokens_per_s_passes``."""
    if passes == 1:
        return records
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["method"], r["dataset"], r["batch_size"], r["temperature"]), []).append(r)
    out = []
    for group in cells.values():
        ok = [r for r in group if r["status"] == "ok"]
        if not ok:
            out.append(group[0])
            continue
        best = max(ok, key=lambda r: r.get("tokens_per_s") or 0.0)
        out.append({**best, "passes": len(ok), "tokens_per_s_passes": [r.get("tokens_per_s") for r in ok]})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    resolve_models(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = specbench_data.load(args.datasets, args.num_prompts, args.prompts_file)
    env = environment()
    config = {"mode": "online" if args.online else "offline", "target": args.target,
              "draft": args.draft, "k": args.k, "dtype": args.dtype, "compile": args.compile,
              "max_tokens": args.max_tokens, "max_model_len": args.max_model_len,
              "batching": ("concurrency: a semaphore keeps b requests in flight" if args.online
                           else "waves: prompts submitted b at a time, max_num_seqs = max batch"
                           + (f"; fastest of {args.passes} passes per cell (order alternating)"
                              if args.passes > 1 else ""))}
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    if args.online:
        from specbench_online import run_online

        records = run_online(args, data, env, config)
    else:
        records = run_offline(args, data, env, config)
    wall = time.perf_counter() - t0
    for r in records:
        r.pop("_ids", None)
    run = {"command": shlex.join([sys.executable, *sys.argv]) if argv is None
           else shlex.join(["spec_bench.py", *argv]),
           "preset": args.preset, "wall_s": wall, "loadavg_start": load0,
           "loadavg_end": os.getloadavg(), **env, **config,
           "methods": args.methods, "datasets": list(data), "batch_sizes": args.batch_sizes,
           "temperatures": args.temperatures, "num_prompts": args.num_prompts}
    (out / "results.json").write_text(json.dumps({"run": run, "records": records}, indent=1) + "\n")
    from specbench_report import write_report

    write_report(out, run, records)
    print(f"spec_bench: {len(records)} records in {wall:.0f}s -> {out}/results.json, results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
