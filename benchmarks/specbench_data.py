"""Prompt sets for spec_bench.py: the built-in benchmark sets (``pard_vllm.eval_sets``,
shared with training, which must never see them) and any JSONL file of prompts.

Every loader returns a list of user messages (strings); spec_bench sends each as a
one-turn chat through the target's chat template, so all methods and datasets are
fed the same way. Selection is deterministic: ``pick`` takes evenly spaced items,
so a small ``--num-prompts`` still spans the whole set (MT-Bench is ordered by
category, ten questions each; taking the first few would test "writing" only).
"""

from __future__ import annotations

import json
from pathlib import Path

from pard_vllm.eval_sets import BUILTIN, LOADERS


def pick(items: list, n: int | None) -> list:
    """``n`` evenly spaced items (all of them when n is None or too large)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


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
    out = {}
    for name in names:
        if name not in LOADERS:
            raise SystemExit(f"error: unknown dataset '{name}'; choose from {', '.join(BUILTIN)}")
        out[name] = pick(LOADERS[name](), n)
    if extra_file:
        out[Path(extra_file).stem] = pick(prompts_file(extra_file), n)
    return out
