"""The generated training prompt set: seeded, distinct, well-formed stubs, and disjoint from the benchmarks."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pard_vllm.training import prompts as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import specbench_data  # noqa: E402


def test_stubs_are_real_functions_that_parse():
    stubs = P.stdlib_stubs()
    assert len(stubs) > 500  # CPython 3.10-3.12 have over a thousand
    for stub in stubs:
        tree = ast.parse(stub + "    pass\n")  # the def line + docstring is a complete header
        (fn,) = tree.body
        assert isinstance(fn, ast.FunctionDef) and not fn.name.startswith("_")
        assert len(ast.get_docstring(fn)) >= 30


def test_generate_is_seeded_distinct_and_mixed():
    mix = (0.25, 0.2, 0.25, 0.3)
    a = P.generate(600, seed=3, mix=mix)
    assert a == P.generate(600, seed=3, mix=mix)
    assert a != P.generate(600, seed=4, mix=mix)
    assert len({r["prompt"] for r in a}) == 600
    kinds = Counter(r["kind"] for r in a)
    assert set(kinds) == {"code", "math", "chat", "stub"} and min(kinds.values()) > 60
    stub = next(r["prompt"] for r in a if r["kind"] == "stub")
    assert "```python\ndef " in stub
    assert "stub" not in Counter(r["kind"] for r in P.generate(200, seed=3))  # default mix: none


def test_never_contains_a_benchmark_prompt_or_function():
    bench = specbench_data.load(["humaneval", "gsm8k", "mtbench"], None)
    rows = P.generate(3000, seed=0, mix=(0.25, 0.2, 0.25, 0.3))
    texts = {r["prompt"] for r in rows}
    for name, prompts in bench.items():
        assert not texts & set(prompts), name
    # no HumanEval function name appears as a stub's function (CPython 3.11 has four
    # same-named stdlib functions; generate() leaves them out)
    he_names = {node.name for p in bench["humaneval"]
                for node in ast.parse(p.split("```python\n")[1].rstrip("`")).body if isinstance(node, ast.FunctionDef)}
    he_names |= P.humaneval_entry_points()
    assert len(P.humaneval_entry_points()) > 150  # 164 tasks, a few names repeat
    stub_names = {ast.parse(r["prompt"].split("```python\n")[1].rstrip("`") + "    pass\n").body[0].name
                  for r in rows if r["kind"] == "stub"}
    assert len(stub_names) > 300 and not he_names & stub_names


@pytest.mark.parametrize("mix,msg", [("0.5,0.5", "four comma-separated"), ("0.5,0.5,0.5,0", "summing to 1"),
                                     ("a,b,c,d", "four comma-separated")])
def test_bad_mix_is_one_line(tmp_path, mix, msg):
    out = tmp_path / "p.jsonl"
    r = subprocess.run([sys.executable, "-m", "pard_vllm.training.prompts", "--n", "5", "--out", str(out),
                        "--mix", mix], capture_output=True, text=True)
    assert r.returncode == 2 and msg in r.stderr and not out.exists()
    assert len([ln for ln in r.stderr.splitlines() if "error" in ln]) == 1


def test_cli_writes_train_and_disjoint_held_out(tmp_path):
    out, held = tmp_path / "p.jsonl", tmp_path / "h.jsonl"
    subprocess.run([sys.executable, "-m", "pard_vllm.training.prompts", "--n", "50", "--out", str(out),
                    "--eval-n", "10", "--eval-out", str(held), "--mix", "0.2,0.2,0.2,0.4"], check=True,
                   capture_output=True)
    train = [json.loads(line) for line in out.read_text().splitlines()]
    test = [json.loads(line) for line in held.read_text().splitlines()]
    assert len(train) == 50 and len(test) == 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_exclude_makes_a_new_set_that_only_adds_prompts(tmp_path):
    """--exclude: a second set (same seed even) repeats none of the first set's prompts,
    nor its held-out slice; a missing file is one line and writes nothing."""
    first, held, second = tmp_path / "a.jsonl", tmp_path / "h.jsonl", tmp_path / "b.jsonl"
    cmd = [sys.executable, "-m", "pard_vllm.training.prompts", "--n", "40", "--mix", "0.2,0.4,0.4,0"]
    subprocess.run(cmd + ["--out", str(first), "--eval-n", "10", "--eval-out", str(held)], check=True,
                   capture_output=True)
    subprocess.run(cmd + ["--out", str(second), "--exclude", str(first), str(held)], check=True, capture_output=True)
    prompts = [{json.loads(line)["prompt"] for line in f.read_text().splitlines()} for f in (first, held, second)]
    assert len(prompts[2]) == 40 and not prompts[2] & (prompts[0] | prompts[1])
    r = subprocess.run(cmd + ["--out", str(tmp_path / "c.jsonl"), "--exclude", str(tmp_path / "nope.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "c.jsonl").exists()
