"""Per-request draft length from the draft's own confidence (``"confidence_threshold": "auto"``).

PARD's single draft forward gives, at every draft position, the draft's
probability for the token it proposes. Most drafts past the first one or two
are rejected, and each still costs the target a verified token; cutting a
request's draft where its estimated acceptance falls too low keeps most of the
accepted tokens for far fewer verified ones. Measured with the shipped draft
(K = 8, greedy, 64 GSM8K + MT-Bench prompts, 4282 request-steps): verifying all
8 drafts gains 0.396 accepted tokens per step; cutting where the running
product of confidences drops below 0.05 keeps 1.52 drafts and 0.378 of those
tokens (95%), below 0.1 it keeps 1.16 drafts and 0.358 (90%).

Who does what (the scheduler and the drafter may live in different processes:
vLLM's CPU build always runs the worker in its own process):

* the scheduler's ``GoodputController.cut_threshold`` sets, every step, the
  estimated acceptance a kept draft must reach (it must return more than its
  verification costs) and sends it to the worker on the scheduler output
  (``patches.DraftStepPatch``);
* the drafter's ``ConfidenceCut`` turns confidences into calibrated prefix
  estimates, cuts each request there, and remembers what it sent; one step
  later vLLM hands the drafter each request's rejected count, which settles
  that memory into ``ConfidenceCalibration``. A draft's confidence is not the
  target's acceptance rate (a head-vocabulary draft normalises over 8192 ids; a
  weak draft is over-confident), so the measured rate per confidence bin is what
  the cut uses.

Worked example: no data yet, so a bin's rate is its midpoint; confidences 0.93,
0.62, 0.55 rate 0.95, 0.65, 0.55, prefix estimates 0.95, 0.62, 0.34. With
threshold 0.4 (a larger batch, say) the request sends two drafts to the target,
with 0.05 (batch 1) all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from pard_vllm.adaptive import lengths_from_confidence


@dataclass
class ConfidenceCalibration:
    """Decayed counts, per confidence bin, of drafts the target reached (every
    earlier draft of the request accepted) and of those it accepted. A bin's
    rate starts at its own confidence (``prior_weight`` pseudo-drafts) and
    moves to what is measured."""

    bins: int = 10
    prior_weight: float = 8.0
    decay: float = 0.999
    reached: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reached = [0.0] * self.bins
        self.accepted = [0.0] * self.bins

    def bin_of(self, confidence: float) -> int:
        return min(max(int(confidence * self.bins), 0), self.bins - 1)

    def observe(self, confidences: Sequence[float], num_accepted: int) -> None:
        """One request's verified drafts (their confidences, in order) and how many were accepted."""
        for i in range(self.bins):
            self.reached[i] *= self.decay
            self.accepted[i] *= self.decay
        for i, c in enumerate(confidences[:num_accepted + 1]):
            b = self.bin_of(c)
            self.reached[b] += 1.0
            self.accepted[b] += i < num_accepted

    def rates(self) -> torch.Tensor:
        """Acceptance rate per bin, made non-decreasing in confidence by
        pooling adjacent bins that disagree (weighted by their counts), so a
        measured over-confident top bin pulls the unmeasured bins below it down
        rather than being overruled by their priors."""
        pools: list[list[float]] = []  # [weighted sum, weight, bins]
        for i in range(self.bins):
            weight = max(self.reached[i] + self.prior_weight, 1e-9)  # an empty bin with no prior: its midpoint
            pools.append([self.accepted[i] + weight * (i + 0.5) / self.bins if self.reached[i] == 0
                          else self.accepted[i] + self.prior_weight * (i + 0.5) / self.bins, weight, 1])
            while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
                top = pools.pop()
                pools[-1] = [pools[-1][0] + top[0], pools[-1][1] + top[1], pools[-1][2] + top[2]]
        return torch.tensor([total / weight for total, weight, n in pools for _ in range(n)],
                            dtype=torch.float64)

    def rated(self, confidence: torch.Tensor) -> torch.Tensor:
        """Each draft's confidence replaced by its bin's measured acceptance rate."""
        bins = (confidence.float() * self.bins).long().clamp(0, self.bins - 1)
        return self.rates().to(confidence.device)[bins]

    def prefix_estimates(self, confidence: torch.Tensor) -> torch.Tensor:
        """[batch, K] confidences -> [batch, K] estimated P(drafts 1..i all accepted)."""
        return torch.cumprod(self.rated(confidence), dim=-1)


class ConfidenceCut:
    """The drafter's side of the cut: lengths from calibrated confidences, and a
    ledger of what was sent, settled one step later with vLLM's rejected counts.

    Each entry carries the drafter's step that made it; only an entry from the
    step just before is settled, so a draft that was never verified (a
    preempted or finished request) is never matched with another step's outcome.
    """

    def __init__(self, calibration: ConfidenceCalibration | None = None):
        self.calibration = calibration or ConfidenceCalibration()
        self.step = 0
        self._sent: dict[str, tuple[int, list[float]]] = {}

    def begin_step(self, req_ids: Sequence[str], verified: Sequence[int] | None,
                   rejected: Sequence[int] | None) -> None:
        """Called once per drafter step, before drafting. ``verified[i]`` /
        ``rejected[i]``: the drafts of request ``req_ids[i]`` the target just
        checked and how many of them it rejected (None: nothing was verified)."""
        self.step += 1
        if verified is not None and rejected is not None:
            for req_id, n, bad in zip(req_ids, verified, rejected):
                entry = self._sent.pop(req_id, None)
                if entry is not None and entry[0] == self.step - 1 and 0 < n <= len(entry[1]):
                    self.calibration.observe(entry[1][:n], n - bad)
        if len(self._sent) > 4096:  # requests that finished with drafts in flight
            self._sent = {r: e for r, e in self._sent.items() if e[0] >= self.step - 1}

    def lengths(self, req_ids: Sequence[str], confidence: torch.Tensor, threshold: float,
                fixed: Sequence[int] | None = None) -> list[int]:
        """How many of each request's K drafts to send for verification.
        ``fixed[i] > 0``: request i sends that many drafts that are not the
        draft's (prompt lookup's); they are neither cut nor calibrated on."""
        lengths = lengths_from_confidence(self.calibration.rated(confidence), threshold).tolist()
        for i, (req_id, row, n) in enumerate(zip(req_ids, confidence.tolist(), lengths)):
            if fixed is not None and fixed[i]:
                lengths[i] = fixed[i]
            elif n:
                self._sent[req_id] = (self.step, row[:n])
        return lengths


#: The attribute of vLLM's SchedulerOutput that carries the step's threshold to
#: the worker (a plain dataclass, pickled whole, so an extra attribute travels).
THRESHOLD_ATTR = "pard_cut_threshold"
