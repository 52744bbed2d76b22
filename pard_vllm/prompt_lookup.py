"""Prompt lookup on top of PARD's drafts (``"prompt_lookup": true``, the default).

Small targets repeat themselves: function names, docstring lines, the numbers of a
word problem, whole loops. Where a request's last tokens already occurred earlier
in its prompt or output, the tokens that followed them there are a draft that
costs nothing. PARD's single forward is already paid, so the proposer keeps the
better of the two per request:

* the longest suffix of 2..``max_n`` tokens seen before (its earliest
  occurrence, as vLLM's n-gram proposer picks): its continuation replaces the
  first drafts;
* else a 1-token match, only where its continuation starts with PARD's own first
  draft (then the looked-up tokens extend what PARD already believes);
* else PARD's drafts as they are.

A request with a looked-up continuation sends only it (PARD's later drafts
were made for PARD's own earlier ones; keeping them measured +0.3% tau offline).
When every request of a step has a match of 2+ tokens, PARD's drafts would all
be replaced, so the proposer skips the draft forward (the draft re-reads the missed tokens at its next
forward, as after a K = 0 step: ``pard_vllm.draft_catchup``). Lossless like any draft: the
target verifies every token. With probabilistic drafts the replaced positions'
draft probabilities become one-hot (the rejection sampler then accepts a token
with the target's own probability, as it does for vLLM's n-gram drafts), except
the first token of a 1-token match: it is PARD's own sample, so it keeps PARD's
probability (``one_hot_rows``).

Under the adaptive controller (``"adaptive": "goodput"``) the lookup is priced
apart from PARD's draft: the controller's K caps PARD's drafts, not a
continuation (up to the configured K; with sampled drafts, this step's K, the
width of their probability tensor); ``LookupCut`` sends each continuation as far
as its measured acceptance beats what a verified token costs at this step; a
K = 0 step ("PARD does not pay here") still sends the continuations of 2+ token
matches, with no draft forward; and the scheduler is told which requests'
drafts were looked up (``patches.DraftSourcePatch``), so they do not count as
PARD's acceptance when it chooses K.

Measured offline (greedy replay of the target's own answers, the shipped draft,
K = 8, 40 prompts per set, 64 new tokens; ``training/offline_tau.py``'s walk):
tau HumanEval 1.68 -> 2.86, GSM8K 1.59 -> 2.26, MT-Bench 1.38 -> 1.63. vLLM's
n-gram method alone (min 1, max 4) reaches 2.02 / 1.66 / 1.28 there.

Worked example, K = 4, request tokens ``... def add ( a , b ) : ... add ( a``
and PARD's drafts ``[, c ) )]``: the suffix ``add ( a`` (3 tokens) occurred
before, followed by ``, b ) :``; the drafts become ``[, b ) :]``. With tokens
``... x = 1`` where only ``1`` occurred before (followed by ``+``) and PARD
drafts ``[\\n ...]``, the 1-token continuation disagrees with PARD's first
draft, so PARD's drafts stay.

The lookup needs each request's committed tokens on the host before vLLM's
bookkeeping has appended this step's (the runner drafts first): the context is
vLLM's token table up to ``num_tokens_no_spec`` plus this step's valid sampled
tokens (``patches.DraftStepPatch`` hands them to the drafter). Async scheduling
writes placeholders into that table, so the lookup needs sync scheduling.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from pard_vllm.adaptive import AcceptanceTracker

#: A match this long or longer is used whatever PARD drafted.
MIN_TRUSTED_MATCH = 2


class Match(NamedTuple):
    """A request's suffix match: its length ``m`` (0 = none), where the earliest
    occurrence of the last m tokens ends (``end``) and that of the last token
    alone (``single``); -1 where there is none."""
    m: int
    end: int
    single: int


def request_context(token_row: np.ndarray, num_committed: int, sampled: Sequence[int]) -> np.ndarray:
    """A request's tokens after this step: the committed ones plus the valid
    sampled ones (vLLM marks rejected slots with -1)."""
    committed = token_row[:num_committed]
    new = [t for t in sampled if t >= 0]
    if not new:
        return committed
    return np.concatenate((committed, np.asarray(new, dtype=committed.dtype)))


def suffix_matches(tokens: np.ndarray, max_n: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Where the request's last tokens occurred before: (m, longest, singles).

    ``m`` is the longest match length (<= max_n, 0 = the last token is new),
    ``longest`` the end positions j of the earlier occurrences of the last m
    tokens (tokens[j-m+1..j] == tokens[-m:], j < len(tokens) - 1, ascending),
    ``singles`` those of the last token alone. One numpy pass per length over
    the surviving candidates, ~10 us for a 1000-token request. (vLLM's own
    n-gram matcher is numba-compiled, and importing numba into a process that
    later starts another vLLM engine breaks that start in vLLM 0.32.)"""
    n = tokens.shape[0]
    if n < 2:
        empty = np.empty(0, dtype=np.int64)
        return 0, empty, empty
    singles = np.flatnonzero(tokens[: n - 1] == tokens[n - 1])
    longest, m = singles, int(singles.size > 0)
    while 0 < m < min(max_n, n - 1):
        ends = longest[longest >= m]
        ends = ends[tokens[ends - m] == tokens[n - 1 - m]]
        if ends.size == 0:
            break
        longest, m = ends, m + 1
    return m, longest, singles


class PromptLookup:
    def __init__(self, max_n: int):
        if max_n < MIN_TRUSTED_MATCH:
            raise ValueError(f"prompt_lookup_max must be >= {MIN_TRUSTED_MATCH}")
        self.max_n = max_n

    def match(self, context: np.ndarray) -> Match:
        """Where the request's last tokens occurred before (``suffix_matches``),
        kept per request for the step: the proposer asks twice (before PARD's
        forward, to see whether it can be skipped, and after it)."""
        m, longest, singles = suffix_matches(context, self.max_n)
        return Match(m, int(longest[0]) if m else -1, int(singles[0]) if singles.size else -1)

    def trusted(self, context: np.ndarray, k: int, match: Match | None = None) -> list[int]:
        """The continuation of a match of >= MIN_TRUSTED_MATCH tokens ([] = none):
        used whatever PARD drafts, so when every request has one the proposer
        skips the draft forward."""
        match = self.match(context) if match is None else match
        return self._after(context, match.end, k) if match.m >= MIN_TRUSTED_MATCH else []

    @staticmethod
    def _after(context: np.ndarray, end: int, k: int) -> list[int]:
        # the earliest occurrence, as vLLM's n-gram proposer picks
        return context[end + 1: end + 1 + k].tolist()

    def continuation(self, context: np.ndarray, k: int, pard_first: int, match: Match | None = None) -> list[int]:
        """The looked-up drafts for one request ([] = keep PARD's): a trusted
        match's continuation, else a 1-token match's when it starts with PARD's
        first draft."""
        match = self.match(context) if match is None else match
        if match.m >= MIN_TRUSTED_MATCH:
            return self._after(context, match.end, k)
        if match.m == 1 and int(context[match.single + 1]) == pard_first:
            return self._after(context, match.single, k)
        return []

    def continuations(self, contexts: Sequence[np.ndarray], pard_first: Sequence[int],
                      matches: Sequence[Match] | None = None, width: int = 8) -> tuple[list[list[int]], list[int]]:
        """Each request's looked-up continuation, up to ``width`` tokens ([] =
        keep PARD's drafts; ``pard_first``: PARD's first draft per request).
        Also, per request, the first looked-up position whose draft
        distribution is a point mass (``one_hot_rows``): 0 for a trusted match;
        1 for a 1-token match, whose first token is PARD's own draw."""
        matches = [self.match(c) for c in contexts] if matches is None else matches
        found = [self.continuation(c, width, first, match) for c, first, match in zip(contexts, pard_first, matches)]
        return found, [0 if match.m >= MIN_TRUSTED_MATCH else 1 for match in matches]


class LookupCut:
    """How much of a looked-up continuation to send, under the adaptive
    controller: the drafter's twin of ``confidence_cut.ConfidenceCut`` for
    drafts that are not the draft model's.

    A looked-up token is verified by the target like any draft, so it pays
    while its chance of being accepted (every earlier draft of the request
    accepted too) beats the controller's threshold (what a verified token costs
    at this step: ``GoodputController.cut_threshold``). That chance is measured
    online per match length (1, 2, 3, 4+ tokens: a longer match repeats
    more) and per position (``adaptive.AcceptanceTracker``); a ledger of what
    was sent is settled one step later with vLLM's rejected counts.

    Worked example: nothing measured yet, so position i of any match is
    accepted with the tracker's prior 0.7, 0.49, 0.34, 0.24, 0.17, ... At
    batch 16 on the 2-core CPU here a verified token costs about 1.5 ms and
    plain decoding makes ~145 tokens/s, a threshold of ~0.22: the first 4
    tokens of a continuation are sent. At batch 1 (threshold ~0.02) all of
    them are.
    """

    #: Match lengths pooled from here on.
    LONGEST_BUCKET = 4

    def __init__(self, max_k: int):
        self.trackers = [AcceptanceTracker(max_k, prior=0.7) for _ in range(self.LONGEST_BUCKET)]
        self.step = 0
        self._sent: dict[str, tuple[int, int]] = {}  # req_id -> (step, match length)

    def bucket(self, m: int) -> AcceptanceTracker:
        return self.trackers[min(max(m, 1), self.LONGEST_BUCKET) - 1]

    def begin_step(self, req_ids: Sequence[str], verified: Sequence[int] | None,
                   rejected: Sequence[int] | None) -> None:
        """Once per drafter step, before drafting: what the target did with the
        looked-up drafts sent last step (``verified[i]`` checked, ``rejected[i]``
        of them rejected)."""
        self.step += 1
        if verified is not None and rejected is not None:
            for req_id, n, bad in zip(req_ids, verified, rejected):
                entry = self._sent.pop(req_id, None)
                if entry is not None and entry[0] == self.step - 1 and n > 0:
                    self.bucket(entry[1]).observe(n, n - bad)
        if len(self._sent) > 4096:  # requests that finished with drafts in flight
            self._sent = {r: e for r, e in self._sent.items() if e[0] >= self.step - 1}

    def length(self, m: int, available: int, threshold: float) -> int:
        """How many of ``available`` looked-up tokens of an m-token match to send."""
        prefix = self.bucket(m).prefix_accept()
        n = 0
        while n < available and prefix[n] >= threshold:
            n += 1
        return n

    def sent(self, req_id: str, m: int) -> None:
        self._sent[req_id] = (self.step, m)


def one_hot_rows(probs: torch.Tensor, drafts: torch.Tensor, looked: Sequence[int],
                 point_from: Sequence[int]) -> None:
    """In place: the draft distribution of each looked-up position from
    ``point_from[i]`` on becomes a point mass on its token (``probs`` [batch,
    K, vocab]). Why not the first token of a 1-token match: the lookup was used
    because PARD *sampled* that token, so it was drawn from PARD's distribution
    and the rejection sampler must see that one; what follows it is fixed by
    the context and the sample, a point mass."""
    for i, (n, start) in enumerate(zip(looked, point_from)):
        if n > start:
            probs[i, start:n].zero_()
            probs[i, torch.arange(start, n), drafts[i, start:n].long()] = 1.0
