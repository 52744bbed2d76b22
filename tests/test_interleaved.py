"""The interleaved benchmarks on tiny configurations, end to end, as a user runs them.

``benchmarks/ab_interleaved.py`` swaps the goodput controller for a pinned K inside one
engine; ``benchmarks/interleaved_engines.py`` keeps several engines alive and rotates
blocks of prompts through them. Both must stay lossless and report paired ratios.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from specbench_common import paired_ratio, round_order  # noqa: E402


def _run(script: str, *args: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(out)],
                          cwd=BENCH.parent, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_paired_ratio_and_round_order():
    ratio, low, high = paired_ratio([2.0, 4.0, 3.0, 6.0], [1.0, 2.0, 3.0, 3.0])
    assert ratio == pytest.approx((2 * 2 * 1 * 2) ** 0.25) and low <= ratio <= high
    assert paired_ratio([1.0] * 5, [2.0] * 5) == pytest.approx((0.5, 0.5, 0.5))
    orders = [round_order(["a", "b", "c"], r) for r in range(6)]
    assert orders[:2] == [["a", "b", "c"], ["c", "b", "a"]]
    assert len({tuple(o) for o in orders}) == 6  # every order of three, each place and neighbour alike
    assert round_order(["a", "b", "c"], 6) == ["a", "b", "c"]


@pytest.mark.slow
def test_pinned_k_inside_one_engine(embedded, tmp_path):
    data = _run("ab_interleaved.py", "--batch-size", "2", "--modes", "adaptive,0,3", "--rounds", "2",
                "--block", "2", "--max-tokens", "12", "--k", "4", out=tmp_path / "ab.json")
    assert data["mismatches"] == 0  # every mode gave the same greedy outputs
    assert len(data["rounds"]) == 2 and all(set(row) == {"adaptive", "0", "3"} for row in data["rounds"])
    summary = data["summary"]
    assert summary["0"]["drafted_tokens"] == 0 and summary["0"]["tau"] is None  # K = 0: plain decoding
    pinned = [row["3"] for row in data["rounds"]]
    assert all(0 < r["drafts"] <= 3 * r["verify_steps"] for r in pinned)  # never more than the pinned K
    assert sum(r["drafts"] for r in pinned) > 2 * sum(r["verify_steps"] for r in pinned)
    ratio, low, high = summary["3"]["adaptive_ratio"]
    assert 0 < low <= ratio <= high


@pytest.mark.slow
def test_engines_alive_at_once_rotate(embedded, tmp_path):
    data = _run("interleaved_engines.py", "--methods", "ar,pard@3", "--subject", "pard@3", "--rounds", "2",
                "--block", "2", "--max-tokens", "12", out=tmp_path / "engines.json")
    summary = data["summary"]
    assert summary["pard@3"]["outputs_differing_from_ar"] == 0
    assert summary["ar"]["tau"] is None and summary["pard@3"]["tau"] >= 1.0
    assert summary["ar"]["vs_ar"] == pytest.approx((1.0, 1.0, 1.0))
    rounds = data["rounds"]
    assert all(r["pard@3"]["drafted"] == 3 * r["pard@3"]["verify_steps"] > 0 for r in rounds)
    ratio, low, high = summary["pard@3"]["vs_ar"]
    assert low <= ratio <= high
    expected = paired_ratio([r["pard@3"]["tokens"] / r["pard@3"]["seconds"] for r in rounds],
                            [r["ar"]["tokens"] / r["ar"]["seconds"] for r in rounds])
    assert summary["pard@3"]["vs_ar"] == pytest.approx(list(expected))
