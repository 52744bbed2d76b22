"""Adaptive K against pinned K in ONE engine, block by block, with a confidence interval.

    flock /tmp/pard-vllm-engine.lock .venv/bin/python benchmarks/ab_interleaved.py \\
        --batch-size 1 --modes adaptive,1,2,4 --rounds 8 --out benchmarks/results/ab/b1.json

Why: separate engines on this VM drift apart by more than the 3% issue 7 asks about
(``ar`` measured 23.6 and then 19.1 tok/s an hour apart, RESULTS.md), so engine-against-
engine runs cannot tell 0.97x from 1.03x. Here one engine (``"adaptive": "goodput"``,
the scheduler in this process) serves the same block of prompts under each mode in turn:

* ``adaptive``: the engine's own controller choosing K every step;
* ``N`` (an integer): the controller swapped for one that answers N every step and
  learns nothing (``0`` = plain decoding through the same engine: no draft forward).

Each round takes a new block of prompts and runs it under every mode, in an order that
changes every round (``specbench_common.round_order``: rotated, and reversed every other
round), so a drift in the machine's speed lands on every mode alike and each round yields
a paired ratio (the prefix cache is emptied before each mode's run). Reported per mode:
tokens/s over all rounds, tau, and adaptive's speed relative to it (geometric mean of the
per-round ratios, with a 95% bootstrap interval over rounds). The adaptive controller keeps what it learned across
rounds, as in a long-running server; its start-up (calibration) falls in an unmeasured
warm-up round. At temperature 0 every mode's output must equal every other's (lossless);
the script exits non-zero if not.

What it does not measure: vLLM's own parallel drafting (another proposer, another
engine); ``interleaved_engines.py`` pairs engines. This script answers the narrower
question whether the controller finds the best K of its own engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # scheduler in this process
sys.path.insert(0, str(Path(__file__).resolve().parent))

import specbench_data  # noqa: E402
from k0_overhead import _NoBar  # noqa: E402
from specbench_common import environment, paired_ratio, round_order, spec_delta  # noqa: E402
from specbench_offline import counters, free_engine, make_engine, run_cell  # noqa: E402


class PinnedK:
    """Stands in for the goodput controller: K every step, no learning."""

    def __init__(self, k: int):
        self.k, self.history, self.reasons = k, Counter(), Counter()

    def __getitem__(self, batch_size: int) -> int:
        self.history[self.k] += 1
        return self.k

    def observe_step(self, *args, **kwargs) -> None: pass
    def observe_request(self, *args, **kwargs) -> None: pass
    # No threshold: the drafter then treats K as a fixed K (the prompt lookup's
    # continuations capped at K, none at K = 0), so ``0`` stays plain decoding.
    def cut_threshold(self, batch_size: int, k: int) -> None: return None
    def summary(self) -> str: return f"pinned K={self.k}"


def scheduler_of(llm):
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    if getattr(scheduler, "_pard_controller", None) is None:
        raise SystemExit("the engine has no goodput controller; is the pard plugin installed?")
    return scheduler


def adaptive_engine(batch_size: int, k: int):
    """One in-process engine of the embedded default with ``"adaptive": "goodput"``
    (fp32, eager): its scheduler, and so its controller, live in this process."""
    from pard_vllm.prepare import prepare

    paths = prepare()
    engine_args = SimpleNamespace(target=paths["target"], dtype="float32", compile=False,
                                  max_model_len=1024, batch_sizes=[batch_size])
    spec = {"method": "pard", "model": paths["draft"], "num_speculative_tokens": k, "adaptive": "goodput"}
    return make_engine(paths["target"], spec, engine_args)


def use_mode(scheduler, controllers: dict, mode: str) -> None:
    """Swap the scheduler's controller; forget the last step so no step is timed
    across the swap (it would carry the gap between blocks)."""
    scheduler._pard_controller = scheduler.dynamic_sd_lookup = controllers[mode]
    scheduler._pard_last_step, scheduler._pard_k = None, (0, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--modes", default="adaptive,1,2,4",
                    help="comma-separated: 'adaptive' and pinned K values (0 = plain decoding)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=0, help="prompts per block (default: 4 x batch size)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--k", type=int, default=8, help="the engine's num_speculative_tokens (adaptive's ceiling)")
    ap.add_argument("--out", help="write rounds and summary as JSON here")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if "adaptive" not in modes or any(m != "adaptive" and not (m.isdigit() and int(m) <= args.k) for m in modes):
        ap.error(f"--modes must name 'adaptive' and pinned K values 0..{args.k}; got {args.modes!r}")
    block = args.block or 4 * args.batch_size

    llm = adaptive_engine(args.batch_size, args.k)
    prompts = specbench_data.load(["humaneval"], block * (args.rounds + 1))["humaneval"]  # reused if short
    try:
        scheduler = scheduler_of(llm)
        controllers = {m: scheduler._pard_controller if m == "adaptive" else PinnedK(int(m)) for m in modes}
        rounds, mismatches = [], 0
        for r in range(args.rounds + 1):  # round 0: warm-up, not measured
            wave = [prompts[(r * block + i) % len(prompts)] for i in range(block)]
            order = round_order(modes, r)
            row, outputs = {}, {}
            for mode in order:
                use_mode(scheduler, controllers, mode)
                llm.reset_prefix_cache()  # else the modes after the first would skip the prefill
                before = counters(llm)
                ids, secs, _ = run_cell(llm, wave, args.batch_size, args.temperature, args.max_tokens, _NoBar())
                stats = spec_delta(before, counters(llm))
                row[mode] = {"tokens": sum(map(len, ids)), "seconds": secs,
                             "drafts": stats["num_draft_tokens"], "accepted": stats["num_accepted_tokens"],
                             "verify_steps": stats["num_drafts"]}
                outputs[mode] = ids
            if args.temperature == 0:
                mismatches += sum(len(set(map(tuple, group))) > 1 for group in zip(*outputs.values()))
            if r:
                rounds.append(row)
            print(f"round {r}{' (warm-up)' if not r else ''}: " + "  ".join(
                f"{m} {row[m]['tokens'] / row[m]['seconds']:.1f}" for m in modes) + " tok/s", flush=True)
        adaptive_summary = controllers["adaptive"].summary()
    finally:
        free_engine(llm)

    speeds = {m: [row[m]["tokens"] / row[m]["seconds"] for row in rounds] for m in modes}
    summary = {}
    for m in modes:
        tokens, secs = (sum(row[m][key] for row in rounds) for key in ("tokens", "seconds"))
        drafts, accepted, verify = (sum(row[m][key] for row in rounds) for key in ("drafts", "accepted", "verify_steps"))
        summary[m] = {"tokens_per_s": tokens / secs, "tau": 1 + accepted / verify if verify else None,
                      "drafted_tokens": drafts,
                      "adaptive_ratio": None if m == "adaptive" else paired_ratio(speeds["adaptive"], speeds[m])}
    pinned = [m for m in modes if m != "adaptive"]
    best = max(pinned, key=lambda m: summary[m]["tokens_per_s"]) if pinned else None
    print(f"\nbatch {args.batch_size}, T={args.temperature}, {args.rounds} rounds of {block} prompts "
          f"x {args.max_tokens} tokens, modes in changing order\nmode       tok/s   tau   adaptive / mode [95% CI]")
    for m in modes:
        s = summary[m]
        tau = f"{s['tau']:.2f}" if s["tau"] else "  - "
        ratio = "" if s["adaptive_ratio"] is None else "{:.3f} [{:.3f}, {:.3f}]".format(*s["adaptive_ratio"])
        print(f"{m:9s} {s['tokens_per_s']:6.1f}  {tau}  {ratio}{'  <- best pinned K' if m == best else ''}")
    print(f"adaptive controller: {adaptive_summary}")
    if args.temperature == 0:
        print(f"outputs differing between modes: {mismatches} of {(args.rounds + 1) * block}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "args": vars(args), "rounds": rounds, "summary": summary, "best_pinned": best,
            "adaptive_controller": adaptive_summary, "mismatches": mismatches if args.temperature == 0 else None,
            "environment": environment(), "date": time.strftime("%Y-%m-%d")}, indent=1))
    if mismatches:
        raise SystemExit(f"{mismatches} prompts gave different greedy outputs under different modes")


if __name__ == "__main__":
    main()
