"""Training prompts written by the target itself: a family the templates of ``prompts.py`` cannot run out of.

Why: the draft learns the target's answers, so its acceptance on a kind of request follows how
much of the target's answering to such requests it has seen. The templated families saturate
(chat: 26 templates x 51 topics, rejected as duplicates ever more often) and MT-Bench-like chat
is where the shipped draft accepts least. A language model is a generator of requests with no
such ceiling: the target is shown a numbered list of three user requests (ours, from
``prompts.generate``) under a category heading and continues the list, sampled at temperature 0.9,
so one call gives several new requests in the target's own words, on subjects it picks.

Worked example of one call (raw text, no chat template; the target continues after "4."):

    Requests about science that users sent to a helpful AI assistant:
    1. Explain black holes to a ten-year-old.
    2. Give me three interesting facts about bees.
    3. Write a short poem about volcanoes.
    4.

    continuation: " What type of technology is in Minecraft?\\n5. Write a function that counts the
    permutations of a set.\\n6. What should I"  (cut by max_tokens)
    parse_items(continuation, finished=False) -> ["What type of technology is in Minecraft?",
    "Write a function that counts the permutations of a set."]  (the cut item is dropped)

Every request then passes ``PromptFilter``: 20-400 characters and at least 4 words, no URL,
not already kept (case and spacing folded), at most 3 kept requests opening with the same 4
words (the sampler likes to repeat an opening), and no run of 8 words shared with a HumanEval,
GSM8K or MT-Bench prompt or with an ``--exclude`` file, so the benchmarks never leak in.

    python -m pard_vllm.training.self_prompts --n 4000 --seed 31 --out runs/data/prompts-self.jsonl \\
        --exclude runs/data/prompts.jsonl runs/data/eval_prompts.jsonl
    # code requests only: one heading, code-template examples
    python -m pard_vllm.training.self_prompts --n 2000 --categories coding --example-mix 1,0,0,0 ...
"""

from __future__ import annotations

import argparse
import random
import re
from collections import Counter
from pathlib import Path

from pard_vllm.training.prompts import generate, parse_mix, read_prompts, write_jsonl

CATEGORIES = [
    "writing", "role-play", "reasoning", "math", "coding", "extracting information from a text",
    "science", "history", "everyday life", "work and business", "health", "travel", "language",
    "art and music", "technology", "nature", "cooking", "sports", "money", "education",
]
ITEM = re.compile(r"^\s*\d{1,2}[.)]\s*(.*)$")
WORD = re.compile(r"[a-z0-9']+")


def few_shot(rng: random.Random, examples: list[str], category: str) -> str:
    """A numbered list of three example requests that stops at "4." for the target to continue."""
    shots = rng.sample(examples, 3)
    return (f"Requests about {category} that users sent to a helpful AI assistant:\n"
            + "".join(f"{i + 1}. {s}\n" for i, s in enumerate(shots)) + "4.")


def parse_items(text: str, finished: bool) -> list[str]:
    """The complete list items of a continuation that starts right after "4."; a line that is
    not a numbered item ends the list, and an unfinished last line (cut by max_tokens) is dropped."""
    lines = text.split("\n")
    if not finished:
        lines = lines[:-1]
    items = [lines[0].strip()] if lines else []
    for line in lines[1:]:
        m = ITEM.match(line)
        if not m:
            break
        items.append(m.group(1).strip())
    return [i for i in items if i]


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def shingles(text: str, n: int = 8, w: list[str] | None = None) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive words (``w``: the text's ``words`` when already split)."""
    w = words(text) if w is None else w
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


class PromptFilter:
    """Decides which generated requests to keep (see the module docstring); ``rejected`` counts why not."""

    def __init__(self, banned_texts: list[str], shingle: int = 8, max_same_opening: int = 3):
        self.shingle = shingle
        self.max_same_opening = max_same_opening
        self.banned: set[tuple[str, ...]] = set()
        self.ban(banned_texts)
        self.seen: set[str] = set()
        self.openings: Counter = Counter()
        self.rejected: Counter = Counter()

    def ban(self, texts: list[str]) -> None:
        for t in texts:
            self.banned |= shingles(t, self.shingle)

    def _reason(self, text: str, w: list[str]) -> str | None:
        if not 20 <= len(text) <= 400 or len(w) < 4:
            return "length"
        if "http" in text or "www." in text:
            return "url"
        key = " ".join(w)
        if key in self.seen:
            return "duplicate"
        if self.openings[tuple(w[:4])] >= self.max_same_opening:
            return "same opening"
        if not self.banned.isdisjoint(shingles(text, self.shingle, w)):
            return "overlaps a benchmark or excluded prompt"
        return None

    def keep(self, text: str) -> bool:
        w = words(text)
        reason = self._reason(text, w)
        if reason:
            self.rejected[reason] += 1
            return False
        self.seen.add(" ".join(w))
        self.openings[tuple(w[:4])] += 1
        return True


def write_prompts(llm, n: int, seed: int, flt: PromptFilter, calls_per_round: int = 256,
                  max_tokens: int = 160, max_rounds: int = 200, categories: list[str] | None = None,
                  example_mix=(0.15, 0.15, 0.7, 0.0)) -> list[dict]:
    """``n`` kept requests as ``{"id", "kind": "self", "prompt"}`` rows, generated with ``llm`` (a vLLM LLM).

    ``categories``: the headings to draw from (default ``CATEGORIES``); ``example_mix``: the
    code/math/chat/stub shares of the few-shot examples (``prompts.generate``'s ``mix``),
    e.g. ``(1, 0, 0, 0)`` with ``["coding"]`` for code requests."""
    from vllm import SamplingParams

    rng = random.Random(seed)
    categories = categories or CATEGORIES
    examples = [r["prompt"] for r in generate(600, seed=seed, mix=example_mix) if "\n" not in r["prompt"]]
    flt.ban(examples)  # a copied example is a templated prompt, not a new one
    rows: list[dict] = []
    for round_i in range(max_rounds):
        if len(rows) >= n:
            break
        calls = [few_shot(rng, examples, rng.choice(categories)) for _ in range(calls_per_round)]
        params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=max_tokens, stop=["\n\n"],
                                 seed=seed * 1_000_003 + round_i * calls_per_round + i) for i in range(len(calls))]
        for out in llm.generate(calls, params, use_tqdm=False):
            c = out.outputs[0]
            for text in parse_items(c.text, finished=c.finish_reason == "stop"):
                if len(rows) < n and flt.keep(text):
                    rows.append({"id": f"self{seed}-{len(rows):05d}", "kind": "self", "prompt": text})
        print(f"self-prompts: round {round_i + 1}: {len(rows)}/{n} kept; rejected {dict(flt.rejected)}", flush=True)
    if len(rows) < n:
        raise RuntimeError(f"kept only {len(rows)} of {n} requests in {max_rounds} rounds; ask for fewer (--n)")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="the model that writes the requests (default: the embedded SmolLM2 target)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--exclude", nargs="*", default=[],
                    help="prompt files (JSONL) no request may share 8 words with (earlier training and held-out sets)")
    ap.add_argument("--dtype", default="bfloat16", help="the target's dtype while writing requests")
    ap.add_argument("--categories", help="comma-separated headings, e.g. coding (default: all %d built-in ones)"
                    % len(CATEGORIES))
    ap.add_argument("--example-mix", default="0.15,0.15,0.7,0",
                    help="code,math,chat,stub shares of the few-shot examples (as prompts.py --mix), e.g. 1,0,0,0")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n must be at least 1 (got {args.n})")
    missing = [f for f in args.exclude if not Path(f).is_file()]
    if missing:
        ap.error(f"--exclude file {missing[0]} does not exist; pass prompt files (JSONL) of earlier sets")
    categories = [c.strip() for c in (args.categories or "").split(",") if c.strip()] or None
    if args.categories is not None and not categories:
        ap.error("--categories needs at least one heading, e.g. --categories coding")
    try:
        example_mix = parse_mix(args.example_mix)  # checked before an engine starts
    except ValueError as e:
        ap.error(str(e).replace("--mix", "--example-mix"))

    from vllm import LLM

    from pard_vllm.eval_sets import LOADERS
    from pard_vllm.server import kv_cache_kwargs

    banned = [p for load in LOADERS.values() for p in load()]
    banned += [r["prompt"] for f in args.exclude for r in read_prompts(f) if "prompt" in r]
    target = args.target
    if target is None:
        from pard_vllm.prepare import prepare

        target = prepare()["target"]
    llm = LLM(model=str(target), dtype=args.dtype, max_model_len=1024, enforce_eager=True, seed=args.seed,
              max_num_seqs=256, **kv_cache_kwargs())
    rows = write_prompts(llm, args.n, args.seed, PromptFilter(banned), categories=categories,
                         example_mix=example_mix)
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
