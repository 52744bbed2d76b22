"""The automatic per-request cut on synthetic numbers: calibration, the ledger
between drafter and scheduler, and what the controller makes of cut drafts.
(End to end, lossless with it on: tests/test_adaptive.py.)"""

from __future__ import annotations

import pytest
import torch

from pard_vllm.adaptive import GoodputController
from pard_vllm.confidence_cut import ConfidenceCalibration, ConfidenceCut


def test_docstring_example_cuts_by_threshold():
    # No data yet: a bin's rate is its midpoint (0.95, 0.65, 0.55).
    cut = ConfidenceCut()
    conf = torch.tensor([[0.93, 0.62, 0.55]])
    est = cut.calibration.prefix_estimates(conf)[0].tolist()
    assert est == pytest.approx([0.95, 0.6175, 0.3396], abs=1e-4)
    assert cut.lengths(["a"], conf, 0.4) == [2]
    assert cut.lengths(["b"], conf, 0.05) == [3]


def test_calibration_learns_an_over_confident_draft():
    cal = ConfidenceCalibration()
    for r in range(2000):  # drafts at confidence 0.95 accepted only 30% of the time
        cal.observe([0.95], 1 if r % 10 < 3 else 0)
    rates = cal.rates().tolist()
    assert rates[9] == pytest.approx(0.32, abs=0.03)
    # Non-decreasing in confidence: the measured top bin pulls the unmeasured
    # bins below it down to its rate (their priors are 0.35-0.85), not up.
    assert all(a <= b + 1e-12 for a, b in zip(rates, rates[1:]))
    assert rates[5] == pytest.approx(rates[9]) and rates[1] == pytest.approx(0.15)


def test_calibration_counts_only_drafts_the_target_reached():
    cal = ConfidenceCalibration(prior_weight=0.0)
    cal.observe([0.95, 0.55, 0.15], 1)  # first accepted, second rejected, third never reached
    assert cal.reached[9] == pytest.approx(1.0) and cal.accepted[9] == pytest.approx(1.0)
    assert cal.reached[5] == pytest.approx(1.0) and cal.accepted[5] == 0.0
    assert cal.reached[1] == 0.0


def test_ledger_settles_with_the_next_steps_rejected_counts():
    cut = ConfidenceCut(ConfidenceCalibration(prior_weight=0.0))
    conf = torch.tensor([[0.95, 0.95], [0.95, 0.05]])
    cut.begin_step(["a", "b"], None, None)  # step 1: nothing verified yet
    assert cut.lengths(["a", "b"], conf, 0.1) == [2, 1]
    # Step 2 (batch order changed): b's one draft rejected, a's first of two accepted.
    cut.begin_step(["b", "a"], [1, 2], [1, 1])
    assert cut.calibration.reached[9] == pytest.approx(3.0, rel=0.01)
    assert cut.calibration.accepted[9] == pytest.approx(1.0, rel=0.01)
    assert cut.lengths(["a"], conf[:1], 0.1) == [2]
    cut.begin_step([], None, None)  # step 3: a not scheduled (preempted)
    cut.begin_step(["a"], [2], [0])  # step 4: its step-2 draft is stale, not settled
    assert cut.calibration.reached[9] == pytest.approx(3.0, rel=0.01)
    cut.lengths(["a"], conf[:1], 0.1)
    cut.begin_step(["a"], [3], [0])  # more verified than were sent: no match
    assert cut.calibration.reached[9] == pytest.approx(3.0, rel=0.01)


def test_cut_aware_goodput_drafts_wider_when_most_drafts_are_cut():
    """Steps cost 40 ms + 5 ms per verified token. Position 1 is accepted 50% of
    the time, positions 2..8 each 10% of the way after it; without the cut
    every drafted token is verified and K = 1 is best at batch 1. When the cut
    keeps only the drafts that get accepted, longer K costs almost nothing to
    verify and the controller drafts wider."""
    def controller(keep_all: bool) -> GoodputController:
        ctl = GoodputController(max_k=8, explore=0.0)
        # Verified tokens vary apart from K (cut steps verify fewer), so the fit
        # can tell the cost of a verified token from that of a drafted position.
        for batch, tokens, k in [(1, 1, 0), (1, 4, 3), (1, 9, 8), (1, 2, 8), (4, 4, 0), (4, 36, 8), (4, 7, 8)] * 20:
            ctl.observe_step(batch, tokens, k, seconds=0.040 + 0.005 * tokens)
        for r in range(2000):
            accepted = 0 if r % 2 else (1 + (r // 2) % 10 // 9 * 7)  # 50%: 1; 5%: all 8
            ctl.observe_request(8 if keep_all else max(accepted, 1), accepted, width=8)
        return ctl

    assert controller(keep_all=True).best_k(1) <= 2
    wide = controller(keep_all=False)
    assert wide.best_k(1) == 8
    assert wide.acceptance.keep_rate()[7] < 0.1
    # The threshold it hands the drafter: a kept token must return more than it costs.
    assert 0.0 < wide.cut_threshold(1, 8) < wide.cut_threshold(16, 8)
