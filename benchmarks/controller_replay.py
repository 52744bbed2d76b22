"""Replay the goodput controller against step costs and acceptance recorded on a real engine.

    # 1. record (one engine, ~2 min at batch 1): K drawn at random, every step logged
    flock /tmp/pard-vllm-engine.lock .venv/bin/python benchmarks/controller_replay.py record \\
        --batch-size 1 --temperature 0.7 --blocks 10 --out runs/steps/b1_t07.json
    # 2. replay (seconds): the controller, and every fixed K, on that engine, many starts
    .venv/bin/python benchmarks/controller_replay.py replay runs/steps/b1_t07.json --steps 1500 --seeds 40

Why: whether the controller finds the best K is a question about thousands of steps and
many starts (the first few dozen drafts it sees are luck, and they steer what it tries
next), while a real run on this VM is one start, and its drift between engines (10-25%)
is larger than the 3% at stake. Recording once what a step at each K costs on this
machine and how often drafts are accepted, then replaying the engine's own
``GoodputController`` against that record from 40 seeds, shows its mean and its worst
start in seconds.

``record``: one in-process engine with ``"adaptive": "goodput"``, its controller replaced
by ``RandomK`` (K uniform in 0..max K, held 3 steps so most steps are steady), which logs
each step as the scheduler reports it: batch size, decode tokens, K, seconds, prompt
tokens, and the requests' (drafts verified, accepted) pairs.

``replay``: a simulated engine built from the record (``Profile``): a decode step takes
a time drawn from the recorded steps that verified as many tokens and drafted (or not)
alike, at the record's most common batch size (so what K = 0 after drafting, or the
first drafting step after K = 0, costs is in it); a prompt step, drawn from the recorded
ones, starts the run and comes again every ``--max-tokens`` tokens, as requests end;
each request's drafts are accepted position by position at the conditional rates pooled
over the record. Each fixed K runs the same seeds. Printed: each fixed K's tokens/s
relative to the best, and the controller's relative to the best fixed K: mean, 10th
percentile and minimum over seeds. Left out: requests of a batch ending apart, drift,
and any dependence of a step's time on its neighbours; so it ranks controller designs,
and a paired real run (``interleaved_engines.py``) checks the one chosen. With the
prompt steps left out it had missed the fault that cost most at batch 1 (the cost
model seeded from a prompt step, ``pard_vllm.step_cost``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


class RandomK:
    """Stands in for the goodput controller while recording: a random K held
    ``hold`` steps, and a log of every step the scheduler reports."""

    def __init__(self, max_k: int, seed: int = 0, hold: int = 3):
        self.max_k, self.rng, self.hold, self._left, self._k = max_k, random.Random(seed), hold, 0, 0
        self.history, self.reasons, self.steps = Counter(), Counter(), []
        self._outcomes: list[tuple[int, int]] = []

    def __getitem__(self, batch_size: int) -> int:
        if self._left == 0:
            self._k, self._left = self.rng.randint(0, self.max_k), self.hold
        self._left -= 1
        self.history[self._k] += 1
        return self._k

    def observe_request(self, num_drafted: int, num_accepted: int, width: int | None = None,
                        looked_up: bool = False) -> None:
        if not looked_up:  # PARD's drafts only, as the controller learns them (the prompt lookup's apart)
            self._outcomes.append((num_drafted, num_accepted))

    def observe_step(self, batch_size: int, tokens: int, k: int, seconds: float,
                     verifying: bool | None = None, prefill: int = 0) -> None:
        self.steps.append({"batch": batch_size, "tokens": tokens, "k": k, "seconds": seconds,
                           "prefill": prefill, "outcomes": self._outcomes})
        self._outcomes = []

    def cut_threshold(self, batch_size: int, k: int) -> None:
        return None  # the drafter then treats K as fixed: the lookup's drafts capped at K, none at K = 0

    def summary(self) -> str:
        return f"random K in 0..{self.max_k}, {len(self.steps)} steps logged"


@dataclass
class Profile:
    """What the record says about the engine at its most common batch size:
    decode step times by (drafted at all, tokens verified), prompt steps as
    (prompt tokens, seconds), and the pooled prefix acceptance
    (P(drafts 1..i all accepted))."""

    batch: int
    seconds: dict[tuple[bool, int], list[float]]
    prefills: list[tuple[int, float]]
    prefix: list[float]
    tokens_per_request: int

    @classmethod
    def from_record(cls, record: dict) -> "Profile":
        steps, max_k = record["steps"], record["max_k"]
        batch = Counter(s["batch"] for s in steps).most_common(1)[0][0]
        seconds: dict[tuple[bool, int], list[float]] = {}
        offered, through = [0] * max_k, [0] * max_k
        for step in steps:
            if step["batch"] == batch and not step["prefill"]:
                seconds.setdefault((step["k"] > 0, step["tokens"]), []).append(step["seconds"])
            for drafted, accepted in step["outcomes"]:
                for i in range(min(drafted, max_k)):
                    offered[i] += 1
                    through[i] += i < accepted
        steady = {k for k in range(max_k + 1) if len(seconds.get((k > 0, batch * (1 + k)), ())) >= 5}
        missing = sorted(set(range(max_k + 1)) - steady)
        if missing:
            raise SystemExit(f"error: the record has fewer than 5 steady steps at K = {missing}; "
                             "record more blocks (--blocks)")
        prefills = [(s["prefill"], s["seconds"]) for s in steps if s["prefill"] and s["batch"] == batch]
        return cls(batch, seconds, prefills, [t / o if o else 0.0 for t, o in zip(through, offered)],
                   record["args"]["max_tokens"])

    def conditional(self) -> list[float]:
        """P(draft i accepted | drafts before it accepted)."""
        out, prev = [], 1.0
        for p in self.prefix:
            out.append(p / prev if prev > 0 else 0.0)
            prev = p
        return out

    def step_seconds(self, rng: random.Random, drafting: bool, tokens: int) -> float:
        """A recorded decode step's time at this (drafting, tokens), else at the
        nearest recorded token count."""
        pool = self.seconds.get((drafting, tokens), ())
        if len(pool) < 5:
            near = min((t for (d, t), p in self.seconds.items() if d == drafting and len(p) >= 5),
                       key=lambda t: abs(t - tokens))
            pool = self.seconds[(drafting, near)]
        return rng.choice(pool)


class FixedK:
    """A controller that drafts K every step (the baselines)."""

    def __init__(self, k: int):
        self.k = k

    def __getitem__(self, batch_size: int) -> int:
        return self.k

    def observe_request(self, *args) -> None: pass
    def observe_step(self, *args, **kwargs) -> None: pass


def simulate(profile: Profile, controller, steps: int, seed: int) -> float:
    """Tokens per second the controller achieves driving the simulated engine.
    As in vLLM, a step verifies the drafts of the step before it, and the
    requests' outcomes reach the controller before the step's time does. A
    prompt step (time and length drawn from the recorded ones) comes first and
    again each time the batch has produced ``tokens_per_request`` tokens more."""
    rng, accept = random.Random(seed), profile.conditional()
    batch, prev_k, made, spent, next_prompt = profile.batch, 0, 0, 0.0, 0
    for _ in range(steps):
        k = controller[batch]
        if profile.prefills and made >= next_prompt:
            prompt, took = rng.choice(profile.prefills)
            controller.observe_step(batch, batch, k, took, verifying=False, prefill=prompt)
            made, spent, prev_k, next_prompt = made + batch, spent + took, k, next_prompt + profile.tokens_per_request
            continue
        took = profile.step_seconds(rng, k > 0, batch * (1 + prev_k))
        for _ in range(batch):
            n = 0
            while n < prev_k and rng.random() < accept[n]:
                n += 1
            if prev_k:
                controller.observe_request(prev_k, n)
            made += 1 + n
        controller.observe_step(batch, batch * (1 + prev_k), k, took)
        spent, prev_k = spent + took, k
    return made / spent


def engine_controller(max_k: int, seed: int):
    """The controller as the engine builds it with the pard config's defaults."""
    from pard_vllm.adaptive import GoodputController
    from pard_vllm.config import PardOptions

    defaults = {name: PardOptions.model_fields[name].default
                for name in ("adaptive_explore", "adaptive_margin", "adaptive_guard", "min_speculative_tokens")}
    return GoodputController(max_k=max_k, min_k=defaults["min_speculative_tokens"],
                             explore=defaults["adaptive_explore"], margin=defaults["adaptive_margin"],
                             guard=defaults["adaptive_guard"], seed=seed)


def replay(args) -> dict:
    record = json.loads(Path(args.record).read_text())
    profile, max_k = Profile.from_record(record), record["max_k"]
    seeds = range(args.seeds)
    fixed = {k: statistics.mean(simulate(profile, FixedK(k), args.steps, seed) for seed in seeds)
             for k in range(max_k + 1)}
    best_k = max(fixed, key=fixed.get)
    ratios = sorted(simulate(profile, engine_controller(max_k, seed), args.steps, seed) / fixed[best_k]
                    for seed in seeds)
    result = {"record": args.record, "batch": profile.batch, "steps": args.steps, "seeds": args.seeds,
              "prefix_acceptance": profile.prefix,
              "fixed_k_vs_best": {k: v / fixed[best_k] for k, v in fixed.items()}, "best_fixed_k": best_k,
              "controller_vs_best": {"mean": statistics.mean(ratios), "p10": ratios[len(ratios) // 10],
                                     "min": ratios[0]}}
    print(f"batch {profile.batch}, {args.steps} steps, {args.seeds} seeds; prefix acceptance "
          + ", ".join(f"{p:.2f}" for p in profile.prefix))
    print("fixed K / best fixed K: " + "  ".join(f"K={k} {v / fixed[best_k]:.3f}" for k, v in fixed.items()))
    c = result["controller_vs_best"]
    print(f"controller / best fixed K (K={best_k}): mean {c['mean']:.3f}  p10 {c['p10']:.3f}  min {c['min']:.3f}")
    return result


def record(args) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler in this process
    import specbench_data
    from ab_interleaved import adaptive_engine, scheduler_of
    from k0_overhead import _NoBar
    from specbench_offline import free_engine, run_cell

    llm = adaptive_engine(args.batch_size, args.k)
    block = 4 * args.batch_size
    pool = specbench_data.load(["humaneval"], block * args.blocks)["humaneval"]
    prompts = [pool[i % len(pool)] for i in range(block * args.blocks)]
    try:
        scheduler = scheduler_of(llm)
        recorder = RandomK(args.k, seed=args.seed)
        scheduler._pard_controller = scheduler.dynamic_sd_lookup = recorder
        for b in range(args.blocks):
            ids, secs, _ = run_cell(llm, prompts[b * block:(b + 1) * block], args.batch_size,
                                    args.temperature, args.max_tokens, _NoBar())
            print(f"block {b}: {sum(map(len, ids)) / secs:.1f} tok/s, {len(recorder.steps)} steps", flush=True)
    finally:
        free_engine(llm)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"max_k": args.k, "args": vars(args), "steps": recorder.steps}))
    print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="log every step of an engine drafting random K")
    rec.add_argument("--batch-size", type=int, default=1)
    rec.add_argument("--temperature", type=float, default=0.0)
    rec.add_argument("--blocks", type=int, default=10, help="blocks of 4 x batch size HumanEval prompts")
    rec.add_argument("--max-tokens", type=int, default=64)
    rec.add_argument("--k", type=int, default=8, help="the engine's num_speculative_tokens (largest K drawn)")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--out", required=True)
    rep = sub.add_parser("replay", help="run the controller against a record, many seeds")
    rep.add_argument("record")
    rep.add_argument("--steps", type=int, default=1500)
    rep.add_argument("--seeds", type=int, default=40)
    rep.add_argument("--out", help="also write the result as JSON here")
    args = ap.parse_args()
    if args.command == "record":
        record(args)
    else:
        result = replay(args)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
