"""spec_bench on a tiny configuration, end to end: real engines, real prompts.

One subprocess runs the harness (ar and pard, two HumanEval prompts, batch 1,
greedy, 16 tokens, two passes) exactly as a user would; the tests then read what it wrote.
Why a subprocess: the harness starts and stops engines itself, and its command
line (argument parsing, presets, output folder) is part of what is tested.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RECORD_KEYS = {"method", "dataset", "batch_size", "temperature", "num_prompts", "status",
               "speculative_config", "target", "draft", "k", "dtype", "max_tokens", "batching",
               "vllm_version", "torch_version", "cpu_model", "date", "output_tokens", "elapsed_s",
               "tokens_per_s", "speedup_vs_ar", "identical_to_ar", "tau", "num_drafts",
               "draft_acceptance_rate", "acceptance_per_position"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, embedded):
    out = tmp_path_factory.mktemp("spec_bench")
    cmd = [sys.executable, str(BENCH / "spec_bench.py"), "--methods", "ar,pard,suffix",
           "--datasets", "humaneval", "--num-prompts", "2", "--batch-sizes", "1",
           "--temperatures", "0", "--max-tokens", "16", "--k", "4", "--max-model-len", "1024", "--passes", "2",
           "--target", embedded["target"], "--draft", embedded["draft"], "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_records_have_the_schema(tiny_run):
    _, data = tiny_run
    ok = [r for r in data["records"] if r["status"] == "ok"]
    assert sorted(r["method"] for r in ok) == ["ar", "pard"]
    for r in ok:
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        assert (r["dataset"], r["batch_size"], r["temperature"], r["num_prompts"]) == ("humaneval", 1, 0.0, 2)
        assert 0 < r["output_tokens"] <= 2 * 16 and r["tokens_per_s"] > 0
        assert "_ids" not in r  # raw token ids are compared, not saved
        # Two passes, alternating order; the record is the faster one.
        assert r["passes"] == 2 and r["tokens_per_s"] == max(r["tokens_per_s_passes"])
    assert data["run"]["vllm_version"] and data["run"]["methods"] == ["ar", "pard", "suffix"]


def test_pard_is_compared_with_ar_and_identical_in_fp32(tiny_run):
    _, data = tiny_run
    by = {r["method"]: r for r in data["records"]}
    assert by["ar"]["speculative_config"] is None
    assert by["pard"]["speculative_config"]["method"] == "pard"
    assert by["pard"]["identical_to_ar"] == 1.0  # greedy, fp32: lossless, token for token
    assert by["pard"]["speedup_vs_ar"] == pytest.approx(by["pard"]["tokens_per_s"] / by["ar"]["tokens_per_s"])
    assert by["ar"]["tau"] is None
    pard = by["pard"]
    assert pard["num_drafts"] > 0 and pard["num_draft_tokens"] == 4 * pard["num_drafts"]
    assert pard["tau"] == pytest.approx(1 + pard["num_accepted_tokens"] / pard["num_drafts"])
    pos = pard["acceptance_per_position"]
    assert len(pos) == 4 and all(0 <= p <= 1 for p in pos)
    assert all(a >= b for a, b in zip(pos, pos[1:]))


def test_unsupported_method_is_recorded_with_a_reason(tiny_run):
    _, data = tiny_run
    suffix = [r for r in data["records"] if r["method"] == "suffix"]
    assert len(suffix) == 1
    if suffix[0]["status"] != "ok":  # arctic-inference absent (the usual case on CPU)
        assert suffix[0]["status"] == "unsupported" and suffix[0]["reason"]


def test_report_and_plots_written(tiny_run):
    out, _ = tiny_run
    md = (out / "results.md").read_text()
    assert "| humaneval | 0 | 1 | pard |" in md and "100%" in md
    for png in ("speedup_vs_batch.png", "acceptance_per_position.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
