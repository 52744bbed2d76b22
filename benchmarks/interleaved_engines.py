"""Several methods' engines alive at once, served the same prompts in turn, block by block.

    flock /tmp/pard-vllm-engine.lock .venv/bin/python benchmarks/interleaved_engines.py \\
        --methods ar,vllm_parallel@2,vllm_parallel@4,pard_adaptive --batch-size 1 --rounds 8 \\
        --out benchmarks/results/interleaved/b1_t0.json

Why: spec_bench runs one engine after another, and this VM's speed drifts by 10-25%
between engines minutes apart, more than the 3-5% some goals are about. Here every
method's engine (spec_bench's method names; all in this process, vLLM's in-process
engine core, as in the other in-process scripts here) is started first and kept alive; each round then runs one new block of prompts on every
engine, in an order that changes every round (rotated, and reversed every other round:
``specbench_common.round_order``), so a drift lands on all methods alike and
every round yields a paired ratio. An engine waiting for its turn is an idle object and
takes no CPU. Reported: tokens/s over all rounds, tau (``--subject``'s only:
vLLM keeps one metrics registry per process, owned by the engine started last), speedup over ``ar``
and ``--subject``'s speed relative to each method, each with a 95% bootstrap interval
over rounds. ``--continuous`` submits a round's block at once with ``--batch-size``
requests running at a time (a server's continuous batching), instead of waves that each
wait for their slowest request. Round 0 is a warm-up (lazy initialisation; the adaptive controller's
start-up), not measured. At temperature 0 every output must equal ``ar``'s; the script
exits non-zero if one does not.

Memory: every engine holds its weights and a 2 GiB KV cache at once, so keep to four or
five methods on 24 GiB (four used about 13 GiB here with the embedded default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

# Every engine in this process: no engine-core process per method (memory), and the
# same setting k0_overhead (imported below) applies on import anyway.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import specbench_data  # noqa: E402
from k0_overhead import _NoBar  # noqa: E402
from specbench_common import environment, method_spec, paired_ratio, round_order, spec_delta  # noqa: E402
from specbench_offline import counters, free_engine, make_engine, run_cell  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="ar,vllm_parallel@2,vllm_parallel@4,pard_adaptive",
                    help="spec_bench method names (ar must be one: outputs and speedups are against it)")
    ap.add_argument("--subject", default="pard_adaptive", help="the method compared with each of the others")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=0, help="prompts per block (default: 4 x batch size)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--k", type=int, default=8, help="K of methods named without @K")
    ap.add_argument("--dataset", default="humaneval", choices=["humaneval", "gsm8k", "mtbench"])
    ap.add_argument("--continuous", action="store_true",
                    help="submit each round's block at once, --batch-size running at a time (continuous "
                         "batching, as a server sees load); default: waves of --batch-size, each waiting "
                         "for its slowest request (Spec-Bench's static batches)")
    ap.add_argument("--out", help="write rounds and summary as JSON here")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if "ar" not in methods or args.subject not in methods or len(set(methods)) != len(methods):
        ap.error(f"--methods must list 'ar' and --subject ({args.subject!r}) once each; got {args.methods!r}")
    block = args.block or 4 * args.batch_size

    from pard_vllm.prepare import prepare

    paths = prepare()
    prompts = specbench_data.load([args.dataset], block * (args.rounds + 1))[args.dataset]  # reused if short
    engine_args = SimpleNamespace(target=paths["target"], dtype="float32", compile=False,
                                  max_model_len=1024, batch_sizes=[args.batch_size])
    engines: dict = {}
    try:
        # vLLM keeps one Prometheus registry per process and each new engine takes it
        # over, so only the engine started last has readable counters: the subject's.
        for m in [x for x in methods if x != args.subject] + [args.subject]:
            engines[m] = make_engine(paths["target"], method_spec(m, paths["draft"], args.k), engine_args)
        rounds = []
        for r in range(args.rounds + 1):  # round 0: warm-up, not measured
            wave = [prompts[(r * block + i) % len(prompts)] for i in range(block)]
            row, outputs = {}, {}
            for m in round_order(methods, r):
                before = counters(engines[m])
                ids, secs, _ = run_cell(engines[m], wave, len(wave) if args.continuous else args.batch_size,
                                        args.temperature, args.max_tokens, _NoBar())
                row[m] = {"tokens": sum(map(len, ids)), "seconds": secs}
                if m == args.subject:
                    stats = spec_delta(before, counters(engines[m]))
                    row[m].update(verify_steps=stats["num_drafts"], drafted=stats["num_draft_tokens"],
                                  accepted=stats["num_accepted_tokens"])
                outputs[m] = ids
            if args.temperature == 0:
                row["_differing"] = {m: sum(a != b for a, b in zip(outputs[m], outputs["ar"])) for m in methods}
            if r:
                rounds.append(row)
            print(f"round {r}{' (warm-up)' if not r else ''}: " + "  ".join(
                f"{m} {row[m]['tokens'] / row[m]['seconds']:.1f}" for m in methods) + " tok/s", flush=True)
    finally:
        for llm in engines.values():
            free_engine(llm)

    speeds = {m: [row[m]["tokens"] / row[m]["seconds"] for row in rounds] for m in methods}
    summary = {}
    for m in methods:
        tokens, secs, verify, accepted = (sum(row[m].get(key, 0) for row in rounds)
                                          for key in ("tokens", "seconds", "verify_steps", "accepted"))
        summary[m] = {"tokens_per_s": tokens / secs, "tau": 1 + accepted / verify if verify else None,
                      "vs_ar": paired_ratio(speeds[m], speeds["ar"]),
                      "subject_vs": None if m == args.subject else paired_ratio(speeds[args.subject], speeds[m]),
                      "outputs_differing_from_ar": sum(row["_differing"][m] for row in rounds)
                      if args.temperature == 0 else None}
    print(f"\n{args.dataset}, batch {args.batch_size}{' (continuous)' if args.continuous else ''}, "
          f"T={args.temperature}, {args.rounds} rounds of {block} "
          f"prompts x {args.max_tokens} tokens, engines in changing order\n"
          f"{'method':22s} tok/s   tau   vs ar [95% CI]          {args.subject} / method [95% CI]")
    fmt = "{:.3f} [{:.3f}, {:.3f}]"
    for m in methods:
        s = summary[m]
        tau = f"{s['tau']:.2f}" if s["tau"] else "  - "
        versus = "" if s["subject_vs"] is None else fmt.format(*s["subject_vs"])
        print(f"{m:22s} {s['tokens_per_s']:5.1f}  {tau}  {fmt.format(*s['vs_ar']):22s}  {versus}")
    bad = {m: s["outputs_differing_from_ar"] for m, s in summary.items() if s["outputs_differing_from_ar"]}
    if args.temperature == 0:
        print(f"outputs differing from ar's: {bad or 'none'} (of {args.rounds * block} per method)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "args": vars(args), "rounds": rounds, "summary": summary,
            "environment": environment(), "date": time.strftime("%Y-%m-%d")}, indent=1))
    if bad:
        raise SystemExit(f"greedy outputs differ from ar's: {bad}")


if __name__ == "__main__":
    main()
