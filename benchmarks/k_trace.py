"""The K the adaptive controller chooses, step by step (run-length coded), per cell.

    .venv/bin/python benchmarks/k_trace.py --batch-size 16 --num-prompts 64 --temperatures 0,0.7,0

The engine runs in this process (so the trace can read the controller), which is
not the served multi-process engine: use it to see *when* the controller drafts,
spec_bench.py for speed. Greedy/sampled cells run in the order given on one engine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # scheduler in this process
sys.path.insert(0, str(Path(__file__).resolve().parent))

import specbench_data  # noqa: E402
from k0_overhead import _NoBar  # noqa: E402
from specbench_offline import make_engine, run_cell  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperatures", default="0,0.7,0")
    args = ap.parse_args()

    from pard_vllm.adaptive import GoodputController
    from pard_vllm.prepare import prepare

    trace: list[int] = []
    controllers: list[GoodputController] = []
    choose = GoodputController.choose

    def traced(self, batch_size):
        k = choose(self, batch_size)
        trace.append(k)
        if not controllers:
            controllers.append(self)
        return k

    GoodputController.choose = GoodputController.__getitem__ = traced
    paths = prepare()
    engine_args = SimpleNamespace(target=paths["target"], dtype="float32", compile=False,
                                  max_model_len=1024, batch_sizes=[args.batch_size])
    prompts = specbench_data.load(["humaneval"], args.num_prompts)["humaneval"]
    spec = {"method": "pard", "model": paths["draft"], "num_speculative_tokens": 8, "adaptive": "goodput"}
    llm = make_engine(paths["target"], spec, engine_args)
    for temperature in (float(t) for t in args.temperatures.split(",")):
        trace.clear()
        for c in controllers:  # per cell, like the trace
            c.history.clear()
            c.reasons.clear()
        ids, secs, _ = run_cell(llm, prompts, args.batch_size, temperature, args.max_tokens, _NoBar())
        runs = " ".join(f"{k}x{len(list(g))}" for k, g in itertools.groupby(trace))
        print(f"T={temperature} {sum(map(len, ids)) / secs:.1f} tok/s, steps {len(trace)}, "
              f"drafting {sum(1 for k in trace if k)}\n  K x steps: {runs}", flush=True)
        if controllers:  # which rule chose K (GoodputController.choose), and the fit at the end
            print(f"  {controllers[0].summary()}", flush=True)


if __name__ == "__main__":
    main()
