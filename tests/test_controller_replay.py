"""benchmarks/controller_replay.py: recording an engine's steps at random K, and
replaying the goodput controller against the record."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from controller_replay import FixedK, Profile, RandomK, engine_controller, simulate  # noqa: E402

#: P(draft i accepted | the ones before) on a made-up engine, whose decode step takes
#: 40 ms, 6 ms more when it drafts, and more as it verifies 3, 4 or 5 tokens: steady
#: K = 0..4 steps take 40, 46, 48, 60 and 70 ms.
ACCEPT = [0.8, 0.5, 0.2, 0.0]
EXTRA = {1: 0.0, 2: 0.0, 3: 0.002, 4: 0.014, 5: 0.024}


def _seconds(drafting: bool, tokens: int) -> float:
    return 0.040 + (0.006 if drafting else 0.0) + EXTRA[tokens]


def _record(steps: int, seed: int = 0) -> dict:
    """What ``record`` writes for that engine (RandomK sees the scheduler's calls in its order)."""
    rng, recorder, prev_k = random.Random(seed), RandomK(4, seed=seed), 0
    for _ in range(steps):
        k = recorder[1]
        if prev_k:
            n = 0
            while n < prev_k and rng.random() < ACCEPT[n]:
                n += 1
            recorder.observe_request(prev_k, n)
        recorder.observe_step(1, 1 + prev_k, k, _seconds(k > 0, 1 + prev_k) * rng.uniform(0.9, 1.1))
        prev_k = k
    return {"max_k": 4, "args": {"max_tokens": 64}, "steps": recorder.steps}


def test_profile_recovers_the_engine_and_the_controller_finds_its_best_k():
    profile = Profile.from_record(_record(3000))
    assert profile.batch == 1 and not profile.prefills
    assert profile.prefix == pytest.approx([0.8, 0.4, 0.08, 0.0], abs=0.03)
    for (drafting, tokens), pool in profile.seconds.items():
        assert sum(pool) / len(pool) == pytest.approx(_seconds(drafting, tokens), rel=0.03)
    fixed = {k: sum(simulate(profile, FixedK(k), 1500, seed) for seed in range(3)) / 3 for k in range(5)}
    assert max(fixed, key=fixed.get) == 2  # 2.2 tokens in 48 ms; K = 3 adds 0.08 for 12 ms more
    assert fixed[4] / fixed[2] == pytest.approx((2.28 / 0.070) / (2.2 / 0.048), rel=0.03)
    achieved = [simulate(profile, engine_controller(4, seed), 1500, seed) / fixed[2] for seed in range(3)]
    assert min(achieved) > 0.93, achieved


def test_a_record_missing_a_k_names_the_fix():
    record = _record(600)
    record["steps"] = [s for s in record["steps"] if s["tokens"] != 4]  # no step verified K = 3 drafts
    with pytest.raises(SystemExit, match=r"K = \[3\].*--blocks"):
        Profile.from_record(record)


@pytest.mark.slow
def test_record_then_replay(embedded, tmp_path):
    """A real engine drafting random K (lossless is checked elsewhere: the
    drafts here are what vLLM verifies), then the replay of its record."""
    record = tmp_path / "steps.json"
    proc = subprocess.run([sys.executable, str(BENCH / "controller_replay.py"), "record", "--batch-size", "1",
                           "--blocks", "2", "--max-tokens", "24", "--k", "2", "--out", str(record)],
                          cwd=BENCH.parent, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads(record.read_text())["steps"]
    assert {s["k"] for s in steps} == {0, 1, 2} and all(s["seconds"] > 0 for s in steps)
    outcomes = [o for s in steps for o in s["outcomes"]]
    assert outcomes and all(0 <= accepted <= drafted <= 2 for drafted, accepted in outcomes)
    out = tmp_path / "replay.json"
    proc = subprocess.run([sys.executable, str(BENCH / "controller_replay.py"), "replay", str(record),
                           "--steps", "300", "--seeds", "3", "--out", str(out)],
                          cwd=BENCH.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["best_fixed_k"] in (0, 1, 2) and result["fixed_k_vs_best"][str(result["best_fixed_k"])] == 1.0
    assert 0 < result["controller_vs_best"]["min"] <= result["controller_vs_best"]["mean"]
