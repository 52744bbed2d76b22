"""The adaptive controller's check on itself: measured tokens per second of
speculating steps against plain ones, at each batch size.

``GoodputController`` picks K from a fitted cost model and the acceptance it
has seen. Both can be wrong in ways the fit cannot show: the draft's catch-up
after skipped steps, requests finishing apart, a code path whose cost is not
linear in the features. This tracker keeps what actually happened instead:
for steps in a steady regime (the step and the one before it both drafted, or
neither did), the tokens they produced and the seconds they took, per batch
size (each size below 16, then powers of two: 16-31, 32-63, ...; throughput
grows with the batch, so a wide bucket would compare a regime seen at 7
requests with one seen at 4). When speculating has measured
slower than not speculating at a bucket, beyond the noise of both
measurements, the controller does not speculate there, whatever the model
predicts; probes keep both sides measured. Where it has measured faster
beyond noise, the controller trusts that over its model's margin of error
and probes the plain side less often.

Worked example (batch 4): the controller drafts K = 1 and its steady steps
produce 4 + 1.6 accepted = 5.6 tokens in 100 ms (56 tok/s); the floor probes'
plain steps produce 4 tokens in 66 ms (61 tok/s). 56 / 61 = 0.92, and the steps' spread
puts the ratio's standard error at 3%: 0.92 * (1 + 2 * 0.03) = 0.97 < 1, so the
next steps at batch 4 draft nothing, although the model predicted K = 1 15%
faster. Had the error been 5% (fewer or noisier steps), 0.92 * 1.10 > 1: the
verdict waits for more steps and the model's choice stands meanwhile. At
batch 1 the same engine may measure 1.3 / 45 ms against 1 / 40 ms (1.16):
speculation stays on there.

Why steady steps only: a step that resumes drafting carries the draft's
catch-up and verifies nothing; the first plain step after drafting still
verifies the drafts before it. Both are transitions, and counting them would
price a regime by the cost of entering it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _bucket(batch_size: int) -> int:
    return batch_size if batch_size < 16 else 1 << (batch_size.bit_length() - 1)


@dataclass
class MeasuredGoodput:
    #: Each cell decays only when it is observed, so the sparse side (plain
    #: steps come from floor probes while speculating) keeps its samples.
    decay: float = 0.97
    #: Steps each side needs before its measurement may overrule the model.
    min_steps: float = 4.0
    #: One-sided standard errors the measured ratio must sit below 1 before it
    #: overrules the model. Why: at batch 1 a speculating step yields 1 to K + 1
    #: tokens and the plain side is a handful of probe steps on a VM whose step
    #: time wanders by 10%; a bare ``ratio < 1`` turned drafting off after ~40
    #: steps where drafting paid. 2 errors: a 2% false alarm per verdict in
    #: theory, 5% with only 5 plain steps (tests/test_adaptive.py's simulation).
    z: float = 2.0
    #: (speculating, bucket) -> [steps, tokens, seconds] decayed by ``decay``,
    #: then [steps, tokens^2, tokens*seconds, seconds^2] decayed by ``decay``^2
    #: (the squared weights a weighted ratio's variance needs).
    cells: dict[tuple[bool, int], list[float]] = field(default_factory=dict)

    def observe(self, batch_size: int, speculating: bool, tokens: float, seconds: float) -> None:
        """One steady step: ``tokens`` produced (one per request plus the drafts accepted)."""
        if seconds <= 0 or tokens <= 0:
            return
        cell = self.cells.setdefault((speculating, _bucket(batch_size)), [0.0] * 7)
        d2 = self.decay * self.decay
        for i, (x, d) in enumerate(((1.0, self.decay), (tokens, self.decay), (seconds, self.decay), (1.0, d2),
                                    (tokens * tokens, d2), (tokens * seconds, d2), (seconds * seconds, d2))):
            cell[i] = cell[i] * d + x

    def rate(self, batch_size: int, speculating: bool) -> float | None:
        """Measured tokens per second of that regime at this batch size; None while thin."""
        cell = self.cells.get((speculating, _bucket(batch_size)))
        if cell is None or cell[0] < self.min_steps:
            return None
        return cell[1] / cell[2]

    def relative_error(self, batch_size: int, speculating: bool) -> float | None:
        """Standard error of ``rate`` over ``rate`` (None while thin).

        The rate is a weighted ratio R = sum(w t) / sum(w s); to first order
        its variance is sum(w^2 (t - R s)^2) / sum(w s)^2, scaled by
        n / (n - 1) for the effective number of steps n = sum(w)^2 / sum(w^2)
        (with 4 steps the plain estimate would otherwise look 15% surer than it is).
        """
        r = self.rate(batch_size, speculating)
        if r is None:
            return None
        steps, _, seconds, steps2, tt, ts, ss = self.cells[(speculating, _bucket(batch_size))]
        n_eff = steps * steps / steps2
        spread = max(tt - 2 * r * ts + r * r * ss, 0.0) / (seconds * seconds)
        return (spread * n_eff / max(n_eff - 1, 1e-9)) ** 0.5 / r

    def speculation_ratio(self, batch_size: int) -> float | None:
        """Speculating over plain tokens per second at this batch size (None: not both measured)."""
        spec, plain = self.rate(batch_size, True), self.rate(batch_size, False)
        return None if spec is None or plain is None else spec / plain

    def speculation_slower(self, batch_size: int) -> bool:
        """Has speculating measured slower than plain decoding here, beyond noise?
        The ratio plus ``z`` of its standard errors must stay below 1."""
        bounds = self._ratio_bounds(batch_size)
        return bounds is not None and bounds[1] < 1.0

    def speculation_faster(self, batch_size: int, z: float | None = None, by: float = 0.0) -> bool:
        """The mirror question: the ratio minus ``z`` (default ``self.z``)
        standard errors above 1 + ``by``."""
        bounds = self._ratio_bounds(batch_size, z)
        return bounds is not None and bounds[0] > 1.0 + by

    def _ratio_bounds(self, batch_size: int, z: float | None = None) -> tuple[float, float] | None:
        ratio = self.speculation_ratio(batch_size)
        if ratio is None:
            return None
        z = self.z if z is None else z
        error = (self.relative_error(batch_size, True) ** 2 + self.relative_error(batch_size, False) ** 2) ** 0.5
        return ratio * (1 - z * error), ratio * (1 + z * error)
