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

Measured offline (greedy replay of the target's own answers, the shipped draft,
K = 8, 40 prompts per set, 64 new tokens; ``training/offline_tau.py``'s walk):
tau HumanEval 1.68 -> 2.87, GSM8K 1.59 -> 2.26, MT-Bench 1.38 -> 1.63. vLLM's
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

from typing import Sequence

import numpy as np
import torch

#: A match this long or longer is used whatever PARD drafted.
MIN_TRUSTED_MATCH = 2


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

    def trusted(self, context: np.ndarray, k: int) -> list[int]:
        """The continuation of a match of >= MIN_TRUSTED_MATCH tokens ([] = none):
        used whatever PARD drafts, so when every request has one the proposer
        skips the draft forward."""
        m, longest, _ = suffix_matches(context, self.max_n)
        return self._after(context, longest, k) if m >= MIN_TRUSTED_MATCH else []

    @staticmethod
    def _after(context: np.ndarray, ends: np.ndarray, k: int) -> list[int]:
        j = int(ends[0])  # the earliest occurrence, as vLLM's n-gram proposer picks
        return context[j + 1: j + 1 + k].tolist()

    def continuation(self, context: np.ndarray, k: int, pard_first: int) -> list[int]:
        """The looked-up drafts for one request ([] = keep PARD's)."""
        return self._lookup(context, k, pard_first)[0]

    def _lookup(self, context: np.ndarray, k: int, pard_first: int) -> tuple[list[int], bool]:
        """(drafts, whether they are trusted: chosen without looking at PARD's)."""
        m, longest, singles = suffix_matches(context, self.max_n)
        if m >= MIN_TRUSTED_MATCH:
            return self._after(context, longest, k), True
        if m == 1 and int(context[int(singles[0]) + 1]) == pard_first:
            return self._after(context, singles, k), False
        return [], False

    def apply(self, drafts: torch.Tensor, contexts: Sequence[np.ndarray]) -> tuple[list[int], list[int]]:
        """In place on ``drafts`` [batch, K] (PARD's): each request's looked-up
        prefix. Returns per request how many leading drafts were looked up
        (0 = none) and the first of them whose draft distribution is a point
        mass: 0 for a trusted match; 1 for a 1-token match, whose first token
        is PARD's own draw (so its probability stays PARD's)."""
        k = drafts.shape[1]
        looked, point_from = [0] * drafts.shape[0], [0] * drafts.shape[0]
        for i, (first, context) in enumerate(zip(drafts[:, 0].tolist(), contexts)):
            found, trusted = self._lookup(context, k, first)
            if found:
                drafts[i, :len(found)] = torch.tensor(found, dtype=drafts.dtype)
                looked[i], point_from[i] = len(found), 0 if trusted else 1
        return looked, point_from


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
