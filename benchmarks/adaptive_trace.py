"""Trace the goodput controller's decisions: which K it chose, how long those steps took.

    flock /tmp/pard-vllm-engine.lock .venv/bin/python benchmarks/adaptive_trace.py \\
        --batch-size 1 --num-prompts 8 --max-tokens 64 [--temperature 0.7]

Runs plain decoding (``ar``) and then PARD with ``"adaptive": "goodput"`` on the same
HumanEval prompts in waves of ``--batch-size`` (as spec_bench does), with the engine in
this process so the scheduler's controller can be watched. Prints tokens/s of both,
and per K: steps chosen, mean step time as the scheduler measured it, and the share of
wall time, then the controller's own summary (fitted cost model, acceptance).
Use it when ``pard_adaptive`` trails the best fixed K in spec_bench, to see whether the
choice or the steps are to blame.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # scheduler in this process
sys.path.insert(0, str(Path(__file__).resolve().parent))

import specbench_data  # noqa: E402
from specbench_offline import free_engine, make_engine, run_cell  # noqa: E402


class _NoBar:
    def update(self, n): pass


def _number_or_auto(value: str):
    return value if value == "auto" else float(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--confidence", default=None,
                    help='confidence_threshold of the adaptive run: "auto" or a number (default: none)')
    ap.add_argument("--margin", type=float, default=None, help="adaptive_margin (default: the config's)")
    ap.add_argument("--show-sequence", action="store_true",
                    help="also print the K of every step, run-length encoded (K x steps)")
    args = ap.parse_args()

    from pard_vllm.adaptive import GoodputController
    from pard_vllm.prepare import prepare

    steps: dict[int, list[float]] = collections.defaultdict(list)  # decode-only steps by K
    prefills: list[float] = []  # steps that also prefilled a prompt
    sequence: list[int] = []
    controllers = []
    original_init, original_observe = GoodputController.__init__, GoodputController.observe_step

    def init(self, *a, **kw):
        original_init(self, *a, **kw)
        controllers.append(self)

    def observe_step(self, batch_size, tokens, k, seconds, verifying=None, prefill=0):
        (steps[k] if not prefill else prefills).append(seconds)
        sequence.append(k)
        original_observe(self, batch_size, tokens, k, seconds, verifying, prefill)

    GoodputController.__init__, GoodputController.observe_step = init, observe_step

    paths = prepare()
    engine_args = SimpleNamespace(target=paths["target"], dtype="float32", compile=False,
                                  max_model_len=1024, batch_sizes=[args.batch_size])
    prompts = specbench_data.load(["humaneval"], args.num_prompts)["humaneval"]
    speeds = {}
    for method in ("ar", "pard_adaptive"):
        spec = None if method == "ar" else {
            "method": "pard", "model": paths["draft"], "num_speculative_tokens": args.k,
            "adaptive": "goodput",
            **({"adaptive_margin": args.margin} if args.margin is not None else {}),
            **({"confidence_threshold": _number_or_auto(args.confidence)} if args.confidence else {})}
        llm = make_engine(paths["target"], spec, engine_args)
        try:
            run_cell(llm, prompts[:args.batch_size], args.batch_size, 0, 16, _NoBar())  # warm-up
            steps.clear()
            prefills.clear()
            sequence.clear()
            t0 = time.perf_counter()
            ids, secs, _ = run_cell(llm, prompts, args.batch_size, args.temperature,
                                    args.max_tokens, _NoBar())
            speeds[method] = sum(len(x) for x in ids) / secs
        finally:
            free_engine(llm)
    print(f"\nbatch {args.batch_size}, T={args.temperature}: ar {speeds['ar']:.1f} tok/s, "
          f"pard_adaptive {speeds['pard_adaptive']:.1f} tok/s "
          f"({speeds['pard_adaptive'] / speeds['ar']:.2f}x)")
    print(f"(an ar step here: about {1e3 * args.batch_size / speeds['ar']:.1f} ms per token of each request)")
    total = sum(sum(v) for v in steps.values()) + sum(prefills)
    print("K   steps  mean ms  share of time   (decode-only steps; then steps that prefilled a prompt)")
    for k, v in [*sorted(steps.items()), ("pre", prefills)]:
        if v:
            print(f"{k:<3} {len(v):6d}  {1e3 * sum(v) / len(v):7.1f}  {sum(v) / total:6.1%}")
    resumes = sum(1 for a, b in zip(sequence, sequence[1:]) if a == 0 and b > 0)
    print(f"drafting resumed after a K = 0 step {resumes} times in {len(sequence)} steps")
    if args.show_sequence:
        runs = [(k, len(list(group))) for k, group in itertools.groupby(sequence)]
        print("sequence: " + " ".join(f"{k}x{n}" for k, n in runs))
    if controllers:
        print(controllers[-1].summary())


if __name__ == "__main__":
    main()
