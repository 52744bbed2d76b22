"""How many tokens to draft: the goodput-optimal K per step, and per request.

vLLM drafts a fixed K, or follows a batch-size table the user writes by hand.
Both waste target compute when the draft is weak or the batch is large: every
drafted token is verified by the target whether it is accepted or not. Here
the engine measures, online, the two things that decide what pays:

* how often draft position i is accepted (``AcceptanceTracker``), pooled over
  requests and decayed so the estimate follows the workload;
* what a step costs (``StepCostModel``): seconds = a + b * tokens verified
  + c * draft positions + d when drafting at all + e when verifying any
  drafts (vLLM's rejection sampler and speculative bookkeeping; a step with
  none takes the plain path), fitted by decayed least
  squares on the engine's own step times, so it is the real hardware, not a
  guess (on a CPU the draft's output layer makes c large; on a GPU at small
  batch b and c are near zero and speculation is almost free).

``GoodputController`` then picks, every step, the K that maximises expected
accepted tokens per second for the current batch size B::

    goodput(K) = B * (1 + p_1 + ... + p_K) / (a + b * B * (1 + K) + c * B * K + (d + e) * [K > 0])

where p_i is the probability that the first i drafts are all accepted. K = 0
means "do not speculate this step". A worked example with c = d = e = 0: a = 40 ms,
b = 5 ms per token, p = (0.5, 0.25, 0.1, ...). At B = 1, K = 0 gives
1 / 45 ms = 22 tok/s; K = 2 gives 1.75 / 55 ms = 32 tok/s; K = 3 gives
1.85 / 60 ms = 31 tok/s; so K = 2. At B = 16 the per-token term dominates:
K = 0 gives 16 / 120 ms = 133 tok/s, K = 1 gives 24 / 200 ms = 120 tok/s, so
the controller stops speculating.

The per-request policy (``pard_vllm.confidence_cut``) truncates one request's
draft where the draft's own, calibrated, confidence says the next token is not
worth verifying: a token whose prefix is accepted with probability q adds q
tokens for b seconds, which raises throughput only if q > b * (tokens/s now)
(``GoodputController.cut_threshold``).

Everything here is plain Python on small numbers, so it is unit-tested on
synthetic inputs (tests/test_adaptive.py) and costs microseconds per step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch


def expected_accepted(prefix_accept: Sequence[float], k: int) -> float:
    """Tokens one request gains from a step that drafts ``k`` tokens: the
    target's own token plus every draft whose whole prefix was accepted."""
    return 1.0 + sum(prefix_accept[:k])


@dataclass
class AcceptanceTracker:
    """Decayed counts, per draft position i, of request-steps that were
    *offered* position i (the step drafted at least i + 1 tokens), that *kept*
    it after the per-request confidence cut (``pard_vllm.confidence_cut``),
    and that had drafts 1..i all accepted.

    p_i = accepted-through-i / offered is the expected gain of position i at
    a given K, and keep_i = kept / offered the share of it the target verifies
    (1 without the cut). ``prior`` (weight ``prior_weight`` pseudo-requests)
    stands in where data is thin: a position never drafted yet is assumed to
    halve the chance of the one before, optimistic enough that long drafts get
    tried, never more optimistic than what was measured before it.
    """

    max_k: int
    prior: float = 0.5
    prior_weight: float = 4.0
    decay: float = 0.995
    offered: list[float] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)
    through: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offered, self.kept, self.through = ([0.0] * self.max_k for _ in range(3))

    def observe(self, num_drafted: int, num_accepted: int, width: int | None = None) -> None:
        """One request's outcome in one step: drafts verified (what vLLM's
        rejection sampler reports), of them accepted, and the K the step
        drafted before the cut (defaults to ``num_drafted``: no cut)."""
        width = num_drafted if width is None else width
        for counts in (self.offered, self.kept, self.through):
            for i in range(self.max_k):
                counts[i] *= self.decay
        for i in range(min(width, self.max_k)):
            self.offered[i] += 1.0
            self.kept[i] += i < num_drafted
            self.through[i] += i < num_accepted

    def _smoothed(self, counts: list[float], shrink: float) -> list[float]:
        out, prev = [], 1.0
        for i in range(self.max_k):
            prior = shrink * prev
            est = (counts[i] + prior * self.prior_weight) / (self.offered[i] + self.prior_weight)
            prev = min(est, prev)  # a longer prefix is never likelier
            out.append(prev)
        return out

    def prefix_accept(self) -> list[float]:
        """p_i = P(drafts 1..i all accepted) per request-step offered i, non-increasing in i."""
        return self._smoothed(self.through, self.prior)

    def keep_rate(self) -> list[float]:
        """Share of request-steps offered position i that kept it for verification."""
        return self._smoothed(self.kept, 1.0)


def step_features(batch_size: int, tokens: float, k: int, verifying: bool | None = None) -> list[float]:
    """What a step's time depends on: a fixed part, the tokens the target
    verifies, the draft positions whose logits are computed (the draft's
    output layer is a large share of its cost), whether drafting ran, and
    whether the step verified any drafts (the rejection sampler and vLLM's
    speculative bookkeeping; a step with none takes the plain path).
    ``verifying`` defaults to "more tokens than requests"."""
    if verifying is None:
        verifying = tokens > batch_size
    return [1.0, float(tokens), float(batch_size * k), 1.0 if k > 0 else 0.0, 1.0 if verifying else 0.0]


@dataclass
class StepCostModel:
    """seconds(step) = w . step_features(...), by exponentially weighted ridge
    least squares on the engine's own steps.

    The first step seen seeds the ridge target: that step's time as the fixed
    part, plus as much again per ``prior_tokens`` tokens. The ridge decays like
    the data, so measured steps of different sizes take over within a few
    dozen steps. Coefficients are clamped at 0 (cost never falls with work).
    """

    decay: float = 0.995
    prior_tokens: float = 64.0
    prior_weight: float = 0.1
    samples: int = 0
    _xtx: torch.Tensor = field(default_factory=lambda: torch.zeros(5, 5, dtype=torch.float64))
    _xty: torch.Tensor = field(default_factory=lambda: torch.zeros(5, dtype=torch.float64))
    _w: torch.Tensor | None = None

    def observe(self, features: Sequence[float], seconds: float) -> None:
        if seconds <= 0:
            return
        x = torch.tensor(features, dtype=torch.float64)
        if self.samples == 0:
            scale = torch.tensor([1.0, self.prior_tokens, self.prior_tokens, 1.0, 1.0], dtype=torch.float64)
            ridge = torch.diag(self.prior_weight * scale ** 2)
            prior = torch.tensor([seconds, seconds / self.prior_tokens, 0.0, 0.0, 0.0], dtype=torch.float64)
            self._xtx, self._xty = ridge, ridge @ prior
        self._xtx = self._xtx * self.decay + torch.outer(x, x)
        self._xty = self._xty * self.decay + x * seconds
        self._w = None
        self.samples += 1

    def coefficients(self) -> list[float]:
        """[fixed s, s per verified token, s per drafted position, s when drafting,
        s when verifying drafts]."""
        if self.samples == 0:
            return [0.0] * 4
        if self._w is None:
            self._w = self._solve_nonnegative()
        return self._w.tolist()

    def _solve_nonnegative(self) -> torch.Tensor:
        """Least squares with every coefficient >= 0 (cost never falls with work).

        Why not solve and clamp: when two features move together (the fixed
        part and "drafting at all" while K never reaches 0, say) the free
        solution can put +1.7 s on one and -1.7 s on the other; clamping the
        negative one alone then predicts steps seconds too slow. Instead the
        most negative coefficient is fixed at 0 and the rest re-solved, until
        none is negative (an active-set pass; 5 unknowns, at most 5 solves).
        """
        active = list(range(self._xty.numel()))
        w = torch.zeros_like(self._xty)
        while active:
            idx = torch.tensor(active)
            sub = torch.linalg.solve(self._xtx[idx][:, idx], self._xty[idx])
            if (sub >= 0).all():
                w[idx] = sub
                break
            active.pop(int(sub.argmin()))
        return w

    def predict(self, features: Sequence[float]) -> float:
        return max(sum(w * x for w, x in zip(self.coefficients(), features)), 1e-6)

    def is_outlier(self, features: Sequence[float], seconds: float) -> bool:
        """Idle gaps between requests are not step cost."""
        return self.samples >= 8 and seconds > 8.0 * self.predict(features)


class GoodputController:
    """Chooses K per step. It speaks vLLM's dynamic-speculation interface:
    the scheduler reads ``controller[batch_size]`` exactly where it would read
    its hand-written batch-size table (see ``patches.AdaptiveKPatch``).

    Args:
        max_k: the configured ``num_speculative_tokens`` (the drafter's width).
        min_k: never draft fewer (0 lets it turn speculation off).
        explore: share of steps that try a K other than the best one, so the
            cost slope and long-prefix acceptance stay measured.
        calibrate: the first this-many steps cycle K through the floor, the
            floor + 1, the middle and the top of the range. Why: a step's cost has a part that only appears when
            drafting at all, and the fixed part and that one cannot be told
            apart from steps that all draft (or all do not); without a few
            steps of each, the fit can be wrong about K = 0 for a long time.
        floor_every: afterwards, every this-many-th step drafts the floor K
            (when the best K is above it), for the same reason: with only
            exploration's occasional floor steps the cost of drafting at all
            was absorbed into the fixed part, the controller believed a
            drafting step barely dearer than a plain one, and kept drafting at
            batch 4 where plain decoding was faster. At 1/32 of steps it costs
            about 1% of the speculative gain.
        margin: speculate only when the best K is predicted at least this much
            faster than not speculating. The linear cost model misses costs
            of the speculative path (catch-up after skipped steps, bookkeeping)
            by several percent; at batch 4 here it predicted K = 1 and K = 0
            level while K = 1 measured about 8% slower.
    """

    def __init__(self, max_k: int, min_k: int = 0, explore: float = 0.02, seed: int = 0,
                 acceptance: AcceptanceTracker | None = None, cost: StepCostModel | None = None,
                 calibrate: int | None = None, floor_every: int = 32, margin: float = 0.05):
        if not 0 <= min_k <= max_k:
            raise ValueError(f"need 0 <= min_k <= max_k, got {min_k}, {max_k}")
        self.max_k, self.min_k, self.explore, self.floor_every = max_k, min_k, explore, floor_every
        self.margin = margin
        self._calibration = sorted({min_k, min(min_k + 1, max_k), (min_k + max_k) // 2, max_k},
                                   reverse=True)
        self.calibrate = 2 * len(self._calibration) if calibrate is None else calibrate
        self.steps = 0
        self.acceptance = acceptance or AcceptanceTracker(max_k)
        self.cost = cost or StepCostModel()
        self.rng = random.Random(seed)
        self.history: dict[int, int] = {}  # K -> steps it was chosen

    def goodput(self, batch_size: int, k: int) -> float:
        """Expected accepted tokens per second for this batch at this K (in a
        steady state, where the step verifies B * (1 + the K drafts that
        survive the confidence cut) tokens; all K without the cut)."""
        gain = batch_size * expected_accepted(self.acceptance.prefix_accept(), k)
        verified = batch_size * (1.0 + sum(self.acceptance.keep_rate()[:k]))
        # Steady state: a step at K > 0 also verifies the previous step's drafts.
        return gain / self.cost.predict(step_features(batch_size, verified, k, verifying=k > 0))

    def best_k(self, batch_size: int) -> int:
        if self.cost.samples == 0:
            return self.max_k  # nothing measured yet: draft fully and learn
        best = max(range(self.min_k, self.max_k + 1), key=lambda k: self.goodput(batch_size, k))
        if self.min_k == 0 and best > 0 and self.goodput(batch_size, best) < (1 + self.margin) * self.goodput(batch_size, 0):
            return 0  # a predicted gain inside the model's error is not worth the risk
        return best

    def choose(self, batch_size: int) -> int:
        self.steps += 1
        if self.steps <= self.calibrate:
            k = self._calibration[(self.steps - 1) % len(self._calibration)]
        else:
            k = self.best_k(max(batch_size, 1))
            if self.floor_every and self.steps % self.floor_every == 0:
                k = self.min_k  # keeps the floor's cost measured (see floor_every)
        if self.steps > self.calibrate and self.max_k > self.min_k and self.rng.random() < self.explore:
            # Explore next to the best K (it measures the slope that matters and
            # costs at most one token per request) or at the floor, which keeps
            # the cost of not drafting measured.
            k = self.rng.choice(sorted({x for x in (k - 1, k + 1, self.min_k)
                                        if self.min_k <= x <= self.max_k and x != k}))
        self.history[k] = self.history.get(k, 0) + 1
        return k

    __getitem__ = choose

    def summary(self) -> str:
        """One log line: what was chosen and why."""
        fixed, per_token, per_draft, drafting, verifying = (c * 1e3 for c in self.cost.coefficients())
        p = ", ".join(f"{x:.2f}" for x in self.acceptance.prefix_accept())
        kept = ", ".join(f"{x:.2f}" for x in self.acceptance.keep_rate())
        return (f"K chosen {dict(sorted(self.history.items()))}; step = {fixed:.1f} ms + "
                f"{per_token:.2f} ms/verified token + {per_draft:.2f} ms/drafted token + "
                f"{drafting:.1f} ms when drafting + {verifying:.1f} ms when verifying drafts; "
                f"prefix acceptance [{p}]; kept after the cut [{kept}]")

    # What the scheduler reports back.
    def observe_request(self, num_drafted: int, num_accepted: int, width: int | None = None) -> None:
        self.acceptance.observe(num_drafted, num_accepted, width)

    def observe_step(self, batch_size: int, tokens: int, k: int, seconds: float,
                     verifying: bool | None = None) -> None:
        """One scheduling step: requests, tokens verified, K drafted, wall time,
        and whether it verified drafts (default: more tokens than requests)."""
        features = step_features(batch_size, tokens, k, verifying)
        if tokens > 0 and not self.cost.is_outlier(features, seconds):
            self.cost.observe(features, seconds)

    def cut_threshold(self, batch_size: int, k: int) -> float:
        """Estimated prefix acceptance below which verifying one more drafted
        token lowers throughput. Once the draft forward has run its cost is
        spent; a kept token still costs its verification (b seconds) and returns
        q tokens, so it pays while q > b * (tokens per second now)."""
        per_token = self.cost.coefficients()[1]
        return per_token * self.goodput(max(batch_size, 1), k)


def length_from_confidence(confidence: Sequence[float], threshold: float) -> int:
    """Longest draft prefix whose estimated acceptance stays >= threshold.

    ``confidence[i]`` is the draft's probability for its own token at position
    i (its max-probability for greedy drafts); the prefix estimate is the
    running product. The first token is always kept when threshold <= 1 and
    confidence[0] >= threshold.
    """
    q, length = 1.0, 0
    for c in confidence:
        q *= float(c)
        if q < threshold:
            break
        length += 1
    return length


def lengths_from_confidence(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """``length_from_confidence`` for a [batch, K] tensor, in one pass."""
    prefix = torch.cumprod(confidence.float(), dim=-1)
    return (prefix >= threshold).to(torch.int64).cumprod(dim=-1).sum(dim=-1)
