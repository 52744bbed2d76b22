"""Requests written by the target (``self_prompts``): list parsing, the filter, and a real generation."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from pard_vllm import eval_sets
from pard_vllm.training import self_prompts as S


def test_parse_items_keeps_whole_items_and_stops_at_a_non_item():
    text = " What is a black hole?\n5. Write a poem about rain.\n6) Explain tides.\nAnswer: no\n7. Ignored."
    assert S.parse_items(text, finished=True) == ["What is a black hole?", "Write a poem about rain.", "Explain tides."]
    # cut by max_tokens: the last line may be half an item
    assert S.parse_items(" Explain tides.\n5. Write a poem ab", finished=False) == ["Explain tides."]
    assert S.parse_items(" Half an ite", finished=False) == []


def test_few_shot_ends_where_the_target_continues():
    text = S.few_shot(random.Random(0), ["a b", "c d", "e f", "g h"], "science")
    lines = text.split("\n")
    assert lines[0] == "Requests about science that users sent to a helpful AI assistant:"
    assert [line[:3] for line in lines[1:4]] == ["1. ", "2. ", "3. "] and lines[4] == "4."


def test_filter_rejects_benchmark_overlap_duplicates_and_repeated_openings():
    bench = eval_sets.mtbench() + eval_sets.gsm8k()
    flt = S.PromptFilter(bench)
    # eight consecutive words of an MT-Bench question, inside a new sentence
    words = S.words(bench[0])[:8]
    assert not flt.keep("Please help me. " + " ".join(words) + " thanks a lot.")
    assert flt.rejected["overlaps a benchmark or excluded prompt"] == 1
    assert flt.keep("Explain how tides work to a curious child.")
    assert not flt.keep("explain how  tides work to a curious child")  # case and spacing folded
    assert not flt.keep("Too short.") and not flt.keep("See http://example.com for the full details please")
    kept = [flt.keep(f"Write a short story about a {animal} who learns to swim.")
            for animal in ("cat", "dog", "fox", "owl")]
    assert kept == [True, True, True, False]  # at most 3 share their first 4 words
    assert dict(flt.rejected) == {"overlaps a benchmark or excluded prompt": 1, "duplicate": 1, "length": 1,
                                  "url": 1, "same opening": 1}


@pytest.mark.parametrize("args,msg", [(["--n", "0"], "--n must be at least 1"),
                                      (["--exclude", "/nonexistent.jsonl"], "does not exist"),
                                      (["--categories", " , "], "at least one heading"),
                                      (["--example-mix", "1,0,0"], "--example-mix takes four"),
                                      (["--example-mix", "0.5,0.6,0,0"], "--example-mix must be four non-negative shares")])
def test_bad_arguments_are_one_line(tmp_path, args, msg):
    r = subprocess.run([sys.executable, "-m", "pard_vllm.training.self_prompts", "--out", str(tmp_path / "p.jsonl"),
                        *args], capture_output=True, text=True)
    assert r.returncode == 2 and msg in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.slow
def test_the_target_writes_new_seeded_requests(embedded):
    from vllm import LLM

    from pard_vllm.server import kv_cache_kwargs, shutdown_engine

    bench = [p for load in eval_sets.LOADERS.values() for p in load()]
    llm = LLM(embedded["target"], dtype="float32", enforce_eager=True, max_model_len=1024, **kv_cache_kwargs())
    try:
        rows = S.write_prompts(llm, 24, seed=3, flt=S.PromptFilter(bench), calls_per_round=16, max_tokens=96)
        again = S.write_prompts(llm, 24, seed=3, flt=S.PromptFilter(bench), calls_per_round=16, max_tokens=96)
    finally:
        shutdown_engine(llm)
    assert rows == again  # per-request seeds: the same file for the same seed
    texts = [r["prompt"] for r in rows]
    assert len(set(texts)) == 24 and {r["kind"] for r in rows} == {"self"}
    banned = set().union(*(S.shingles(p) for p in bench))
    assert not any(S.shingles(t) & banned for t in texts)
    templated = {r["prompt"] for r in S.generate(600, seed=3, mix=(0.15, 0.15, 0.7, 0.0))}
    assert not set(texts) & templated  # new requests, not copies of the few-shot examples
