"""What a PARD engine costs when it does not speculate (K = 0 every step), against plain decoding.

    flock /tmp/pard-vllm-engine.lock .venv/bin/python benchmarks/k0_overhead.py \\
        --batch-sizes 4,16,64 --num-prompts 64 --max-tokens 64

Why: with ``"adaptive": "goodput"`` the controller turns speculation off (K = 0)
whenever the draft does not pay, so "never slower than plain decoding" depends on
how cheap a K = 0 step is. This script pins K to 0 (the controller is replaced by
a constant in this process) and runs, on the same prompts and batches:

* ``ar``: no speculative config;
* ``k0_forward``: PARD with K = 0 and ``"idle_draft": "forward"`` (the draft still
  runs over each step's new tokens, as vLLM's own dynamic speculation does);
* ``k0_skip``: PARD with K = 0 and ``"idle_draft": "skip"`` (the default: no draft
  forward; the draft catches up when drafting resumes); the prompt lookup's drafts
  are still sent where they pay (``pard_vllm/prompt_lookup.py``), so its drafts are
  printed; ``k0_nolookup``: the same without the lookup (a step that drafts nothing);
* ``adaptive``: PARD with the controller left choosing K (not pinned), to see
  what its drafting steps and probes add to a cell where it ends up not drafting;
* ``pard@K`` (or any spec_bench method at a fixed K: ``pard_nolookup@K``,
  ``ngram@K``): drafting a fixed K every step (no controller), to time what a
  drafting step costs by part (with ``--breakdown``: the proposer's inputs, the
  draft's output layer and sampling, its forward, the rejection sampler), e.g.
  ``--batch-sizes 1 --num-prompts 4 --methods ar,pard@4 --breakdown``.

It prints tokens/s and the ratio to ``ar`` per batch size, measured in one run.
This VM's speed drifts by 10-20% over minutes, so the methods run in turn
``--passes`` times and each cell reports its best pass (all passes are kept in
the JSON). ``--breakdown`` also prints milliseconds per engine step split by
vLLM function (``step_timers.py``), to show which part of a step differs, and
the steps by kind (prefill, plain decode, decode verifying N tokens) with
their share of the time and cost per step: at batch 16 prompt prefill is
about half of plain decoding's time here, which no speculative method shortens.
Greedy unless ``--temperature``, fp32, eager, HumanEval prompts, the engine in
this process (so the constant controller reaches the scheduler).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # scheduler in this process
sys.path.insert(0, str(Path(__file__).resolve().parent))

import specbench_data  # noqa: E402
import step_timers  # noqa: E402
from specbench_common import METHODS, environment, method_spec  # noqa: E402
from specbench_offline import free_engine, make_engine, run_cell  # noqa: E402


def fixed_k_method(method: str) -> bool:
    """``pard@4``, ``pard_nolookup@8``, ``ngram@4``: a spec_bench method at its own K."""
    name, _, k = method.partition("@")
    return name in METHODS and name != "ar" and k.isdigit() and int(k) >= 1


class _NoBar:
    def update(self, n): pass


def pin_k_to_zero(pinned: bool, _original: dict = {}) -> None:
    """K = 0 every step (``pinned``), or the controller's own choice."""
    from pard_vllm.adaptive import GoodputController

    choose = _original.setdefault("choose", GoodputController.choose)
    GoodputController.choose = GoodputController.__getitem__ = (lambda self, b: 0) if pinned else choose


def print_breakdown(rows: list[dict]) -> None:
    """Mean over passes of ms per engine step, one column per (method, batch)."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["method"], r["batch_size"]), []).append(r["ms_per_step"])
    labels = [k for k in next(iter(cells.values()))[0] if k != "steps"]
    keys = sorted(cells, key=lambda k: (k[1], k[0]))
    print("\nms per engine step (mean of passes)\n" + " " * 24
          + "".join(f"{m[:11]:>12s}" for m, _ in keys) + "\n" + " " * 24
          + "".join(f"{'b=' + str(b):>12s}" for _, b in keys))
    for label in labels + ["steps"]:
        vals = [sum(p[label] for p in cells[k]) / len(cells[k]) for k in keys]
        print(f"{label:24s}" + "".join(f"{v:12.2f}" for v in vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="4,16,64")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--methods", default="ar,k0_forward,k0_skip",
                    help="ar, k0_forward, k0_skip, k0_nolookup, adaptive, pard@K")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sampling temperature (spec_bench's seeds, so outputs still compare)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each part of an engine step (step_timers.py) and print ms per step")
    ap.add_argument("--continuous", action="store_true",
                    help="submit all prompts at once, each batch size running at a time (continuous "
                         "batching); default: waves of the batch size (Spec-Bench's static batches)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    for m in args.methods.split(","):
        if m not in ("ar", "k0_forward", "k0_skip", "k0_nolookup", "adaptive") and not fixed_k_method(m):
            ap.error(f"unknown method {m!r}: use ar, k0_forward, k0_skip, k0_nolookup, adaptive or a spec_bench method "
                     "at a fixed K (e.g. pard@4, pard_nolookup@4, ngram@4)")

    if args.continuous and "," in args.batch_sizes:
        ap.error("--continuous takes one batch size (the engine's max_num_seqs), e.g. --batch-sizes 16")

    from pard_vllm.prepare import prepare

    paths = prepare()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    engine_args = SimpleNamespace(target=paths["target"], dtype="float32", compile=False,
                                  max_model_len=1024, batch_sizes=batch_sizes)
    prompts = specbench_data.load(["humaneval"], args.num_prompts)["humaneval"]
    if args.breakdown:
        step_timers.install()
    rows = []
    for method in [m for _ in range(args.passes) for m in args.methods.split(",")]:
        spec = None
        pin_k_to_zero(method != "adaptive")
        if fixed_k_method(method):
            spec = method_spec(method, paths["draft"], args.k)
        elif method != "ar":
            idle = "forward" if method == "k0_forward" else "skip"
            spec = {"method": "pard", "model": paths["draft"], "num_speculative_tokens": args.k,
                    "adaptive": "goodput", "idle_draft": idle, "prompt_lookup": method != "k0_nolookup"}
        llm = make_engine(paths["target"], spec, engine_args)
        try:
            run_cell(llm, prompts[:max(batch_sizes)], max(batch_sizes), 0, 16, _NoBar())  # warm-up
            for b in batch_sizes:
                step_timers.reset()
                wave = len(prompts) if args.continuous else b  # (the engine runs max_num_seqs = b at a time)
                ids, secs, spec = run_cell(llm, prompts, wave, args.temperature, args.max_tokens, _NoBar())
                ntok = sum(len(x) for x in ids)
                rows.append({"method": method, "batch_size": b, "tokens_per_s": ntok / secs,
                             "output_tokens": ntok, "spec": spec, "_ids": ids})
                # With K pinned to 0 any drafts are the prompt lookup's (pard_vllm/prompt_lookup.py).
                drafted = (f", {spec['num_drafts']} drafts, {spec['num_draft_tokens']} draft tokens, "
                           f"{spec['num_accepted_tokens']} accepted") if spec and spec.get("num_drafts") else ""
                print(f"{method:12s} b={b:3d} {ntok / secs:7.1f} tok/s{drafted}", flush=True)
                if args.breakdown:
                    rows[-1]["ms_per_step"] = step_timers.per_step_ms()
                    rows[-1]["step_kinds"] = step_timers.by_step_kind()
                    for kind, v in rows[-1]["step_kinds"].items():
                        print(f"    {kind:14s} {v['steps']:4d} steps, {100 * v['time_share']:5.1f}% of the time, "
                              f"{v['decode_tokens']:5.1f} decode tokens, {v['step_ms']:7.1f} ms a step "
                              f"(forward {v['forward_ms']:7.1f})", flush=True)
        finally:
            free_engine(llm)

    best: dict = {}
    for r in rows:
        key = (r["method"], r["batch_size"])
        if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = r
    ar = {b: r for (m, b), r in best.items() if m == "ar"}
    print(f"\nbest of {args.passes} passes\nmethod        batch  tok/s   vs ar  identical")
    for r in best.values():
        base = ar.get(r["batch_size"])
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        same = sum(a == b for a, b in zip(r["_ids"], base["_ids"])) if base else 0
        r.update(vs_ar=ratio, identical=same)
        print(f"{r['method']:12s} {r['batch_size']:6d} {r['tokens_per_s']:6.1f}  {ratio:5.2f}x  "
              f"{same}/{len(r['_ids'])}")
    if args.breakdown:
        print_breakdown(rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        clean = [{k: v for k, v in r.items() if k != "_ids"} for r in rows]
        Path(args.out).write_text(json.dumps({"rows": clean, "best": [
            {k: v for k, v in r.items() if k != "_ids"} for r in best.values()], "args": vars(args),
                                              "environment": environment(),
                                              "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
    main()
