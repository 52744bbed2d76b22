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
slower than not speculating at a bucket, the controller does not speculate
there, whatever the model predicts; probes keep both sides measured.

Worked example (batch 4): the controller drafts K = 1 and its steady steps
produce 4 + 1.6 accepted = 5.6 tokens in 100 ms (56 tok/s); the floor probes'
plain steps produce 4 tokens in 66 ms (61 tok/s). 56 / 61 = 0.92 < 1, so the
next steps at batch 4 draft nothing, although the model predicted K = 1 15%
faster. At batch 1 the same engine may measure 1.3 / 45 ms against 1 / 40 ms
(1.16): speculation stays on there.

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
    cells: dict[tuple[bool, int], list[float]] = field(default_factory=dict)  # -> [steps, tokens, seconds]

    def observe(self, batch_size: int, speculating: bool, tokens: float, seconds: float) -> None:
        """One steady step: ``tokens`` produced (one per request plus the drafts accepted)."""
        if seconds <= 0 or tokens <= 0:
            return
        cell = self.cells.setdefault((speculating, _bucket(batch_size)), [0.0, 0.0, 0.0])
        for i, x in enumerate((1.0, tokens, seconds)):
            cell[i] = cell[i] * self.decay + x

    def rate(self, batch_size: int, speculating: bool) -> float | None:
        """Measured tokens per second of that regime at this batch size; None while thin."""
        cell = self.cells.get((speculating, _bucket(batch_size)))
        if cell is None or cell[0] < self.min_steps:
            return None
        return cell[1] / cell[2]

    def speculation_ratio(self, batch_size: int) -> float | None:
        """Speculating over plain tokens per second at this batch size (None: not both measured)."""
        spec, plain = self.rate(batch_size, True), self.rate(batch_size, False)
        return None if spec is None or plain is None else spec / plain
