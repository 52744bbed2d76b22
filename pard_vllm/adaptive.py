"""How many tokens to draft: the goodput-optimal K per step, and per request.

vLLM drafts a fixed K, or follows a batch-size table the user writes by hand.
Both waste target compute when the draft is weak or the batch is large: every
drafted token is verified by the target whether it is accepted or not. Here
the engine measures, online, what decides whether drafting pays:

* how often draft position i is accepted (``AcceptanceTracker``), pooled over
  requests and decayed so the estimate follows the workload;
* what a step costs (``StepCostModel``): seconds = a + b * tokens verified
  + c * draft positions + d when drafting at all + e when verifying any
  drafts (vLLM's rejection sampler and speculative bookkeeping; a step with
  none takes the plain path), fitted by decayed least
  squares on the engine's own step times, so it is the real hardware, not a
  guess (on a CPU the draft's output layer makes c large; on a GPU at small
  batch b and c are near zero and speculation is almost free; ``pard_vllm.step_cost``);
* how far that linear fit is off at each K and batch size (``CostResidual``):
  real steps are not linear, and the measured ratio at a K overrules the fit;
* whether speculating has in fact produced more tokens per second than not
  speculating at this batch size (``pard_vllm.measured_goodput``): where it
  has not, the controller does not speculate, whatever the fit predicts.

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

K prices PARD's drafts only. The prompt lookup's drafts (``pard_vllm.prompt_lookup``)
are reported apart (``observe_request(looked_up=True)``) and sent at any K, K = 0
included, as far as their own measured acceptance pays (``LookupCut``, with the
threshold below): they cost no draft forward, so whether PARD's forward pays is a
question about PARD's acceptance alone.

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

from pard_vllm.measured_goodput import MeasuredGoodput
from pard_vllm.step_cost import CostResidual, StepCostModel, step_features

__all__ = ["AcceptanceTracker", "CostResidual", "GoodputController", "StepCostModel", "expected_accepted",
           "length_from_confidence", "lengths_from_confidence", "step_features"]


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
        self._cache: dict[str, list[float]] = {}  # the smoothed lists, until the next observe

    def observe(self, num_drafted: int, num_accepted: int, width: int | None = None) -> None:
        """One request's outcome in one step: drafts verified (what vLLM's
        rejection sampler reports), of them accepted, and the K the step
        drafted before the cut (defaults to ``num_drafted``: no cut)."""
        width = num_drafted if width is None else width
        self._cache.clear()
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
        if "through" not in self._cache:
            self._cache["through"] = self._smoothed(self.through, self.prior)
        return self._cache["through"]

    def keep_rate(self) -> list[float]:
        """Share of request-steps offered position i that kept it for verification."""
        if "kept" not in self._cache:
            self._cache["kept"] = self._smoothed(self.kept, 1.0)
        return self._cache["kept"]


class GoodputController:
    """Chooses K per step. It speaks vLLM's dynamic-speculation interface:
    the scheduler reads ``controller[batch_size]`` exactly where it would read
    its hand-written batch-size table (see ``patches.AdaptiveKPatch``).

    Args:
        max_k: the configured ``num_speculative_tokens`` (the drafter's width).
        min_k: never draft fewer (0 lets it turn speculation off).
        explore: share of steps that try a K other than the best one, so the
            cost slope and long-prefix acceptance stay measured.
        probe_steps: an exploring K is held this many steps in a row, so it is
            also measured in its steady state (its first step resumes drafting
            and carries the draft's catch-up, which ``CostResidual`` leaves out).
        probe_band: only K predicted within this share of the best are probed;
            a probe exists to catch the model being wrong, and a K predicted
            far worse is not worth the price (at batch 64 one K = 1 step costs
            about two plain ones).
        calibrate: the first this-many steps cycle K through the floor, the
            floor + 1, the middle and the top of the range. Why: a step's cost has a part that only appears when
            drafting at all, and the fixed part and that one cannot be told
            apart from steps that all draft (or all do not); without a few
            steps of each, the fit can be wrong about K = 0 for a long time.
            The top is capped so that a calibration step verifies no more
            tokens than batch 4 at the full K (but at least floor + 2, so the
            slope in K is seen at two points): at batch 16 here two K = 8 and
            two K = 4 steps cost an estimated 2 s (40 ms + ~6 ms per verified
            token), 5% of the first 64 requests, and
            K = 0-2 tell the fit the same; longer drafts keep their optimistic
            acceptance prior and are still tried where they are cheap.
        floor_every: afterwards, every this-many-th step starts a probe of
            the floor K (``probe_steps`` long; when the best K is above it),
            for the same reason: with only exploration's occasional floor
            steps the cost of drafting at all was absorbed into the fixed
            part, the controller believed a drafting step barely dearer than a
            plain one, and kept drafting at batch 4 where plain decoding was
            faster. A lone floor step still verifies the drafts of the step
            before it; only the second one in a row is a plain step, so a
            probe measures the plain step itself instead of extrapolating it.
            3 steps in 48 cost about 1% of a 1.2x speculative gain, more
            with the step that resumes drafting after them (it verifies
            nothing). While speculating measures faster than plain decoding
            beyond noise (``measured``), each probe doubles the wait (96, 192,
            ... up to 16 times), and it is back to ``floor_every`` as soon as
            that verdict lapses: at batch 1 here floor probes were 27 of 370
            steps of a cell that speculation sped up 1.2x.
        floor_every_unmeasured: the same, while the guard (``measured``) has
            too few plain steps at this batch size to judge. Why: at batch 16
            the first floor probe came at step 48, and until then the model
            drafted K = 1-3 where plain decoding was 1.2x faster; probes every
            8 steps give the guard its plain steps by step ~35.
        margin: speculate only when the best K is predicted at least this much
            faster than not speculating. The linear cost model misses costs
            of the speculative path (catch-up after skipped steps, bookkeeping)
            by several percent; at batch 4 here it predicted K = 1 and K = 0
            level while K = 1 measured about 8% slower. While it holds K at 0
            the model's K is still probed now and then ("mirror" in
            ``choose``): the prediction rests on acceptance that only drafting
            steps measure. Waived where
            speculating has measured at least ``margin`` faster at this batch
            size, ``waive_z`` standard errors included (``measured``): the
            measurement then shows the gain the margin asks of the model. It
            must clear the margin too, not just 1: it sees only steady steps
            (not the steps that start or stop drafting, nor prefill), and its
            plain steps run in the speculating engine, a few % slower than a
            plain engine's; at batch 4 here it measured 1.03-1.12 where
            speculating was level with plain decoding or behind it.
        margin_probe_steps: how long a probe of the model's K lasts while the
            margin holds K at 0 (every ``floor_every`` steps). Why longer than
            ``probe_steps``: it is there to re-measure acceptance, which a
            3-step probe at batch 1 samples twice. Replaying 30 starts on
            each of two batch-1 sampled records (``benchmarks/controller_replay.py``,
            benchmarks/results/replay/record_b1_t07*.json), 3 and 3 spent
            330-1342 of 1500 steps at K = 0 with 3-step probes whose wait
            doubled; 1 (421 steps) and 0 with 8-step probes every 48.
        waive_z: 1 standard error, not the guard's 2. Why: at batch 1 here
            speculating pays 1.1-1.4x, about 2 standard errors of what a cell
            measures, and the margin stopped drafting for 26 (greedy) and 99
            (sampled) of ~360 steps, in runs of up to 60. A waiver on a lucky
            stretch costs little: the model must still predict a gain, and
            the guard still acts on a measured loss.
        measured: the check on the model (``pard_vllm.measured_goodput``):
            where steady speculating steps have measured fewer tokens per
            second than steady plain ones at this batch size, K = 0 whatever
            the model predicts; where more, beyond noise, the margin is
            waived and floor probes thin out. ``guard=False`` turns it off.
    """

    def __init__(self, max_k: int, min_k: int = 0, explore: float = 0.02, seed: int = 0,
                 acceptance: AcceptanceTracker | None = None, cost: StepCostModel | None = None,
                 calibrate: int | None = None, floor_every: int = 48, floor_every_unmeasured: int = 8,
                 margin: float = 0.05,
                 residual: CostResidual | None = None, probe_steps: int = 3,
                 probe_band: float = 0.25, measured: MeasuredGoodput | None = None, guard: bool = True,
                 waive_z: float = 1.0, margin_probe_steps: int = 8):
        if not 0 <= min_k <= max_k:
            raise ValueError(f"need 0 <= min_k <= max_k, got {min_k}, {max_k}")
        self.max_k, self.min_k, self.explore, self.floor_every = max_k, min_k, explore, floor_every
        self.margin, self.floor_every_unmeasured = margin, floor_every_unmeasured
        self.calibrate = 2 * len(self.calibration_ks(1)) if calibrate is None else calibrate
        self.steps = 0
        self.acceptance = acceptance or AcceptanceTracker(max_k)
        self.lookup_acceptance = AcceptanceTracker(max_k)  # the prompt lookup's drafts, for the log
        self.cost = cost or StepCostModel()
        self.residual = residual or CostResidual()
        self.measured = measured or MeasuredGoodput()
        self.guard, self.waive_z = guard, waive_z
        self._accepted = 0.0  # drafts accepted in the step being measured (observe_request)
        self.probe_steps, self._probe, self.probe_band = max(1, probe_steps), [], probe_band
        self.margin_probe_steps = max(1, margin_probe_steps)
        self._last_k: int | None = None
        self._overruled = 0  # the model's K when the guard or the margin last held K at 0, else 0
        self._mirror_every, self._next_mirror = floor_every, None  # speculating probes while it holds
        self._floor_backoff = 1  # floor probes every floor_every * this steps (see floor_every)
        self.rng = random.Random(seed)
        self.history: dict[int, int] = {}  # K -> steps it was chosen
        self.reasons: dict[str, int] = {}  # which rule chose K -> steps (see choose)
        self._why = "model"
        self._whys: tuple[str | None, str | None] = (None, None)  # rules of the last two choices

    def goodput(self, batch_size: int, k: int) -> float:
        """Expected accepted tokens per second for this batch at this K (in a
        steady state, where the step verifies B * (1 + the K drafts that
        survive the confidence cut) tokens; all K without the cut)."""
        gain = batch_size * expected_accepted(self.acceptance.prefix_accept(), k)
        verified = batch_size * (1.0 + sum(self.acceptance.keep_rate()[:k]))
        # Steady state: a step at K > 0 also verifies the previous step's drafts.
        seconds = self.cost.predict(step_features(batch_size, verified, k, verifying=k > 0))
        return gain / (seconds * self.residual.ratio(batch_size, k, self.cost.coefficients()))

    def calibration_ks(self, batch_size: int) -> list[int]:
        """The K the start-up cycles through at this batch size, largest first (see ``calibrate``)."""
        cap = 4 * (self.max_k + 1) // batch_size - 1  # verify at most what batch 4 does at full K
        top = min(self.max_k, max(self.min_k + 2, cap))
        return sorted({self.min_k, min(self.min_k + 1, top), (self.min_k + top) // 2, top}, reverse=True)

    def best_k(self, batch_size: int) -> int:
        """The model's K, or 0 where the margin or the guard says no; which
        of the three decided is left in ``_why`` for ``reasons``."""
        self._overruled, self._why = 0, "model"
        if self.cost.samples == 0:
            return self.max_k  # nothing measured yet: draft fully and learn
        best = max(range(self.min_k, self.max_k + 1), key=lambda k: self.goodput(batch_size, k))
        if self.min_k == 0 and best > 0 and self.goodput(batch_size, best) < (1 + self.margin) * self.goodput(batch_size, 0):
            # A predicted gain inside the model's error is not worth the risk,
            # unless speculating has measured faster here: then the measurement,
            # not the model's error, decides (see margin).
            if not (self.guard and self.measured.speculation_faster(batch_size, self.waive_z, by=self.margin)):
                # Held like the guard's verdict, so mirror probes keep testing it
                # (see choose): the margin compares with an acceptance estimate
                # that only speculating steps can correct.
                self._overruled, self._why = best, "margin"
                return 0
            self._why = "measured"
        if self.guard and self.min_k == 0 and best > 0 and self.measured.speculation_slower(batch_size):
            self._overruled, self._why = best, "guard"
            return 0  # measured slower than plain decoding here, beyond noise: the model is wrong
        return best

    def choose(self, batch_size: int) -> int:
        """This step's K. Which rule chose it is counted in ``reasons``:
        calibrate, probe (the rest of a probe begun earlier), model, margin,
        guard (``best_k``), floor, mirror, explore."""
        self.steps += 1
        if self.steps <= self.calibrate:
            ks = self.calibration_ks(max(batch_size, 1))
            k, why = ks[(self.steps - 1) % len(ks)], "calibrate"
        elif self._probe:
            k, self._probe, why = self._probe[0], self._probe[1:], "probe"
        else:
            k = self.best_k(max(batch_size, 1))
            why = self._why
            if not self._overruled:
                self._mirror_every, self._next_mirror = self.floor_every, None
            elif self._next_mirror is None:
                self._next_mirror = self.steps + self._mirror_every
            # The back-off (see floor_every): the verdict is read only while it
            # is in effect or when a probe is due, not on every step.
            if self._floor_backoff > 1 and not self._clearly_pays(max(batch_size, 1)):
                self._floor_backoff = 1  # back to the base rate as soon as the verdict lapses
            every = self._floor_every(max(batch_size, 1)) * self._floor_backoff
            if every and self.steps % every == 0 and k != self.min_k:
                k, why = self.min_k, "floor"  # keeps the floor's cost measured (see floor_every)
                self._probe = [k] * (self.probe_steps - 1)
                if self._clearly_pays(max(batch_size, 1)):  # still ahead: double the wait
                    self._floor_backoff = min(2 * self._floor_backoff, 16)
            elif self._overruled and self.floor_every and self.steps >= self._next_mirror:
                # The mirror image while the guard or the margin holds K at 0
                # against the model: keep the speculating side measured too, so a
                # verdict reached on an unlucky stretch (or before the VM slowed
                # the plain steps) can be revised, not frozen until exploration
                # happens by. For the margin the unlucky stretch is in the
                # acceptance: a first few dozen rejections can put the predicted
                # gain under the margin, and only drafting steps re-measure it
                # (benchmarks/RESULTS.md, "The controller's start at batch 1";
                # tests/test_adaptive.py::test_margin_held_off_is_revisited). Under
                # the guard each probe that leaves the verdict standing doubles the
                # wait (48 steps up to 768): at batch 16 here a drafting step costs
                # ~1.5 plain ones, so 3 in every 48 for good would cost ~3%. Under
                # the margin the model predicts the probed K at least level with
                # K = 0, so the probes cost about nothing: every 48 steps, and
                # ``margin_probe_steps`` long (see there).
                k, why = self._overruled, "mirror"
                held_by_guard = self._why == "guard"
                self._probe = [k] * ((self.probe_steps if held_by_guard else self.margin_probe_steps) - 1)
                if held_by_guard:  # a measured loss: probing it costs, so thin out
                    self._mirror_every = min(2 * self._mirror_every, 16 * self.floor_every)
                self._next_mirror = self.steps + self._mirror_every
            elif self.max_k > self.min_k and self.rng.random() < self.explore / self.probe_steps:
                # Explore next to the best K (it measures the slope that matters and
                # costs at most one token per request) or at the floor, which keeps
                # the cost of not drafting measured; for a few steps in a row, so
                # the explored K is also seen in its steady state (not only as the
                # step that resumes drafting and carries the draft's catch-up).
                # Only where the model could plausibly be wrong: a K predicted
                # far worse is not worth a probe (at batch 64 one K = 1 step
                # costs about two plain ones).
                batch, best = max(batch_size, 1), self.goodput(max(batch_size, 1), k)
                near = sorted({x for x in (k - 1, k + 1, k + 2, self.min_k) if self.min_k <= x <= self.max_k
                               and x != k and self.goodput(batch, x) >= (1 - self.probe_band) * best})
                if near:
                    k, why = self.rng.choice(near), "explore"
                    self._probe = [k] * (self.probe_steps - 1)
        self.history[k] = self.history.get(k, 0) + 1
        self.reasons[why] = self.reasons.get(why, 0) + 1
        self._whys = (self._whys[1], why)
        return k

    __getitem__ = choose

    def _clearly_pays(self, batch_size: int) -> bool:
        return self.guard and self.measured.speculation_faster(batch_size)

    def _floor_every(self, batch_size: int) -> int:
        unjudged = self.guard and self.min_k == 0 and self.measured.rate(batch_size, False) is None
        if unjudged and self.floor_every and self.floor_every_unmeasured:
            return min(self.floor_every, self.floor_every_unmeasured)
        return self.floor_every

    def summary(self) -> str:
        """One log line: what was chosen and why."""
        fixed, per_token, per_draft, drafting, verifying, per_prompt = (c * 1e3 for c in self.cost.coefficients())
        p = ", ".join(f"{x:.2f}" for x in self.acceptance.prefix_accept())
        kept = ", ".join(f"{x:.2f}" for x in self.acceptance.keep_rate())
        looked = ", ".join(f"{x:.2f}" for x in self.lookup_acceptance.prefix_accept())
        ratios = ", ".join(f"K={k} B~{2 ** (b - 1)}: {self.residual.ratio(2 ** (b - 1), k, self.cost.coefficients()):.2f}"
                           for k, b in sorted(self.residual.cells))
        return (f"K chosen {dict(sorted(self.history.items()))} by {dict(sorted(self.reasons.items()))}; "
                f"step = {fixed:.1f} ms + "
                f"{per_token:.2f} ms/verified token + {per_draft:.2f} ms/drafted token + "
                f"{drafting:.1f} ms when drafting + {verifying:.1f} ms when verifying drafts + "
                f"{per_prompt:.2f} ms/prefilled token; "
                f"prefix acceptance [{p}]; kept after the cut [{kept}]; looked-up drafts' prefix acceptance "
                f"[{looked}]; measured/fitted step time [{ratios}]; "
                f"measured speculating/plain tok/s [{self._measured_summary()}]")

    def _measured_summary(self) -> str:
        sizes = sorted({b for _, b in self.measured.cells})
        ratios = ((b, self.measured.speculation_ratio(b)) for b in sizes)
        return ", ".join(f"B~{b}: {r:.2f}" for b, r in ratios if r is not None)

    # What the scheduler reports back.
    def observe_request(self, num_drafted: int, num_accepted: int, width: int | None = None,
                        looked_up: bool = False) -> None:
        """One request's verified drafts. Drafts the prompt lookup supplied
        (``looked_up``) count for the step's measured tokens but not for PARD's
        acceptance: they are there whatever K is (even at K = 0), so crediting
        them to PARD's drafts would overprice K > 0."""
        if looked_up:
            self.lookup_acceptance.observe(num_drafted, num_accepted)
        else:
            self.acceptance.observe(num_drafted, num_accepted, width)
        self._accepted += num_accepted

    def observe_step(self, batch_size: int, tokens: int, k: int, seconds: float,
                     verifying: bool | None = None, prefill: int = 0) -> None:
        """One scheduling step: requests, decode tokens (one per request plus
        the drafts verified), K drafted, wall time, whether it verified drafts
        (default: more tokens than requests) and prompt tokens prefilled."""
        features = step_features(batch_size, tokens, k, verifying, prefill)
        resumed = self._last_k == 0 and k > 0  # carries the draft's catch-up: not steady state
        steady = self._last_k is not None and (self._last_k > 0) == (k > 0) and not prefill
        outlier = self.cost.is_outlier(features, seconds)
        # Start-up steps (and the step verifying their drafts) draft a K chosen
        # to teach the fit, not to pay: at batch 1 the K = 8 and 4 ones verify
        # 9 and 5 tokens for ~1.5; counted as "speculating" they would price
        # that side by steps the controller never chooses afterwards.
        calibration = "calibrate" in self._whys
        if steady and not outlier and not calibration:
            # The requests' outcomes of this step arrived before it is measured
            # (vLLM reports them as the step finishes): 1 token each + accepted drafts.
            self.measured.observe(batch_size, k > 0, batch_size + self._accepted, seconds)
        self._accepted = 0.0
        self._last_k = k
        if tokens + prefill > 0 and not outlier:
            if not resumed and not prefill:  # the residual is about decode steps only
                self.residual.observe(batch_size, k, seconds, features)
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
