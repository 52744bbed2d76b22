"""What an engine step costs on this hardware, learned from the engine's own steps.

``StepCostModel`` fits seconds = w . ``step_features`` by decayed, non-negative
least squares; ``CostResidual`` keeps, per K and batch size, how far real steps
are from that fit, so a measured K overrules the line. Both feed
``pard_vllm.adaptive.GoodputController``; both are plain numbers, unit-tested in
tests/test_adaptive.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


def step_features(batch_size: int, tokens: float, k: int, verifying: bool | None = None,
                  prefill: float = 0.0) -> list[float]:
    """What a step's time depends on: a fixed part, the tokens the target
    verifies, the draft positions whose logits are computed (the draft's
    output layer is a large share of its cost), whether drafting ran,
    whether the step verified any drafts (the rejection sampler and vLLM's
    speculative bookkeeping; a step with none takes the plain path), and the
    prompt tokens it prefilled. ``verifying`` defaults to "more tokens than
    requests".

    Why prefill apart: a prompt token costs far less than a decode token (one
    big matmul against many small ones), and a few 600-token prefills among
    decode steps of 4-16 tokens dominate a least-squares fit; folded into one
    slope they made the fit over-state what verifying costs per token less
    than prefill's and under-state a decode step, so the controller drafted
    at batch 4 where plain decoding was faster."""
    if verifying is None:
        verifying = tokens > batch_size
    return [1.0, float(tokens), float(batch_size * k), 1.0 if k > 0 else 0.0, 1.0 if verifying else 0.0,
            float(prefill)]


@dataclass
class StepCostModel:
    """seconds(step) = w . step_features(...), by exponentially weighted ridge
    least squares on the engine's own steps.

    The first decode-only step seen seeds the ridge target: that step's time
    as the fixed part, plus as much again per ``prior_tokens`` tokens; steps
    before it are not fitted. Why decode-only: an engine's first step prefills
    a prompt (~290 ms against ~45 ms for a decode step at batch 1 here), and
    seeded from it the prior put 4.5 ms on each verified token, which the data
    took ~700 steps to outweigh; meanwhile the controller drafted K = 2 where
    K = 4 was ~4% faster (benchmarks/RESULTS.md, "The controller's start at
    batch 1").
    Where every step prefills, the seed is the 17th step (``max_skipped``).
    The ridge decays like
    the data, so measured steps of different sizes take over within a few
    dozen steps, down to a floor of ``ridge_floor`` times its first weight.
    Why the floor: when two features move together for good (with
    ``min_speculative_tokens`` >= 1 "drafting at all" is the constant column;
    a long decode-only stretch has no prefill) the decayed ridge is all that
    keeps the system solvable, and after ~5900 steps it fell below float
    precision and the solve raised "Singular matrix" inside vLLM's scheduler.
    Coefficients are clamped at 0 (cost never falls with work).
    """

    decay: float = 0.995
    prior_tokens: float = 64.0
    prior_weight: float = 0.1
    samples: int = 0
    # numpy, not torch: a few 6x6 operations per step, where torch's per-call
    # overhead (and its thread pool, busy with the model) cost ~10x more.
    _xtx: np.ndarray = field(default_factory=lambda: np.zeros((6, 6)))
    _xty: np.ndarray = field(default_factory=lambda: np.zeros(6))
    ridge_floor: float = 1e-6
    _floor: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros((6, 6)), np.zeros(6)))
    _w: list[float] | None = None
    #: Prefill steps passed over while waiting for a decode-only seed; past this
    #: many (a server whose every step prefills), the next step seeds anyway.
    max_skipped: int = 16
    _skipped: int = 0

    def observe(self, features: Sequence[float], seconds: float) -> None:
        if seconds <= 0:
            return
        x = np.asarray(features, dtype=np.float64)
        if self.samples == 0:
            if features[5] > 0 and self._skipped < self.max_skipped:
                self._skipped += 1
                return  # not a seed (see the class docstring); later prefill steps are fitted
            scale = np.array([1.0, self.prior_tokens, self.prior_tokens, 1.0, 1.0, self.prior_tokens])
            ridge = np.diag(self.prior_weight * scale ** 2)
            prior = np.array([seconds, seconds / self.prior_tokens, 0.0, 0.0, 0.0, seconds / self.prior_tokens])
            self._xtx, self._xty = ridge, ridge @ prior
            self._floor = (self.ridge_floor * ridge, self.ridge_floor * (ridge @ prior))
        self._xtx = self._xtx * self.decay + np.outer(x, x)
        self._xty = self._xty * self.decay + x * seconds
        self._w = None
        self.samples += 1

    def coefficients(self) -> list[float]:
        """[fixed s, s per verified token, s per drafted position, s when drafting,
        s when verifying drafts, s per prefilled token]."""
        if self.samples == 0:
            return [0.0] * 6
        if self._w is None:
            self._w = self._solve_nonnegative().tolist()
        return self._w

    def _solve_nonnegative(self) -> np.ndarray:
        """Least squares with every coefficient >= 0 (cost never falls with work).

        Why not solve and clamp: when two features move together (the fixed
        part and "drafting at all" while K never reaches 0, say) the free
        solution can put +1.7 s on one and -1.7 s on the other; clamping the
        negative one alone then predicts steps seconds too slow. Instead the
        most negative coefficient is fixed at 0 and the rest re-solved, until
        none is negative (an active-set pass; 6 unknowns, at most 6 solves).
        """
        xtx, xty = self._xtx + self._floor[0], self._xty + self._floor[1]
        active = list(range(xty.size))
        w = np.zeros_like(xty)
        while active:
            idx = np.array(active)
            sub = np.linalg.solve(xtx[np.ix_(idx, idx)], xty[idx])
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


@dataclass
class CostResidual:
    """How far the linear cost model is off, per K and batch size: decayed
    measured seconds over predicted seconds of the steps that drafted K at
    about that batch size (powers of two: 1, 2-3, 4-7, ...).

    Why: the model is linear in a handful of features, but a real step need
    not be (code paths that differ by K, GPU tile sizes, caches). Scaling each
    K's predicted cost by its own measured ratio lets what was observed at
    that K overrule the fit, and leaves the fit in charge where a K has rarely
    run (``prior_weight`` pseudo-steps at ratio 1). It decays per step of the
    same cell, so a K tried seldom keeps its last measured ratio. In the
    closed-loop test where K = 1 and 2 cost 25 ms more than the features can
    say, the controller reached 0.86 of the best fixed K's throughput without
    it and 0.98 with it (6 seeds; ``test_measured_cost_per_k_overrules_a_misfit_linear_model``).
    """

    decay: float = 0.97
    prior_weight: float = 8.0
    cells: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # -> [steps, seconds, *features]

    def observe(self, batch_size: int, k: int, seconds: float, features: Sequence[float]) -> None:
        cell = self.cells.setdefault((k, batch_size.bit_length()), [0.0] * (2 + len(features)))
        for i, x in enumerate((1.0, seconds, *features)):
            cell[i] = cell[i] * self.decay + x

    def ratio(self, batch_size: int, k: int, coefficients: Sequence[float]) -> float:
        """Measured / predicted seconds, pulled towards 1 by the prior. The
        cell keeps feature sums, not predictions, so it is always measured
        against the current fit (an early, unsettled fit leaves no trace)."""
        bucket = batch_size.bit_length()
        measured_ks = [j for j, b in self.cells if b == bucket]
        if not measured_ks:
            return 1.0
        # A K not measured at this batch size borrows its nearest measured
        # neighbour's ratio: the misfit varies smoothly with K, and ratio 1
        # there would make every unmeasured K look like a bargain.
        cell = self.cells[(min(measured_ks, key=lambda j: (abs(j - k), j)), bucket)]
        steps, measured, features = cell[0], cell[1], cell[2:]
        predicted = max(sum(w * x for w, x in zip(coefficients, features)), 1e-9)
        prior = self.prior_weight * predicted / steps  # pseudo-steps of the cell's typical length
        return (measured + prior) / (predicted + prior)
