"""Prompt lookup on top of PARD's drafts (pard_vllm/prompt_lookup.py): the matcher
against a brute-force reference, the rule that picks between lookup and PARD, and
the offline replay of the same rule. The engine side (lossless, the skipped draft
forwards, vLLM's counters equal to the replay) is in tests/test_e2e_offline.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pard_vllm.confidence_cut import ConfidenceCut
from pard_vllm.prompt_lookup import LookupCut, PromptLookup, one_hot_rows, request_context, suffix_matches
from pard_vllm.training.offline_tau import replay, with_prompt_lookup


def brute_force_matches(tokens: list[int], max_n: int):
    """(m, ends of the last m tokens' earlier occurrences, ends of the last token's)."""
    n = len(tokens)
    def ends(m):
        return [j for j in range(m - 1, n - 1) if tokens[j - m + 1: j + 1] == tokens[n - m:]]
    m = 0
    while m < min(max_n, n - 1) and ends(m + 1):
        m += 1
    return m, ends(m) if m else [], ends(1) if n > 1 else []


@pytest.mark.parametrize("seed", range(40))
def test_matcher_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    tokens = rng.integers(0, 1 + seed % 5, size=n).astype(np.int32)  # small vocabularies repeat a lot
    max_n = int(rng.integers(2, 9))
    m, longest, singles = suffix_matches(tokens, max_n)
    want_m, want_longest, want_singles = brute_force_matches(tokens.tolist(), max_n)
    assert (m, longest.tolist(), singles.tolist()) == (want_m, want_longest, want_singles)


def test_docstring_examples():
    lookup = PromptLookup(max_n=8)
    words = "def add ( a , b ) : return a + b <nl> print ( add ( a".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    ids = np.array([vocab[w] for w in words], dtype=np.int32)
    # "add ( a" occurred before, followed by ", b ) :": used whatever PARD drafted
    want = [vocab[w] for w in ", b ) :".split()]
    assert lookup.continuation(ids, 4, pard_first=vocab["+"]) == want
    assert lookup.trusted(ids, 4) == want
    # a 1-token match is used only when it starts with PARD's own first draft
    ids1 = np.array([5, 7, 9, 8, 1, 7], dtype=np.int32)  # 7 was followed by 9
    assert lookup.continuation(ids1, 3, pard_first=9) == [9, 8, 1]
    assert lookup.continuation(ids1, 3, pard_first=4) == []
    assert lookup.trusted(ids1, 3) == []
    assert lookup.continuation(np.array([1, 2, 3], dtype=np.int32), 3, pard_first=1) == []


def test_the_earliest_occurrence_is_used_and_k_caps_the_continuation():
    lookup = PromptLookup(max_n=2)
    ids = np.array([1, 2, 10, 11, 1, 2, 20, 21, 1, 2], dtype=np.int32)
    assert lookup.trusted(ids, 8) == [10, 11, 1, 2, 20, 21, 1, 2]
    assert lookup.trusted(ids, 3) == [10, 11, 1]


def test_request_context_appends_valid_sampled_tokens():
    row = np.array([4, 5, 6, 0, 0], dtype=np.int32)
    assert request_context(row, 3, [7, -1, -1]).tolist() == [4, 5, 6, 7]
    assert request_context(row, 2, [-1]).tolist() == [4, 5]


def test_continuations_per_request_and_one_hot_probabilities():
    lookup = PromptLookup(max_n=4)
    contexts = [np.array([1, 2, 3, 1, 2], dtype=np.int32),   # "1 2" seen: 3 1 2 follow (trusted)
                np.array([9, 8, 7], dtype=np.int32),          # nothing repeats
                np.array([5, 6, 4, 5], dtype=np.int32)]       # "5" seen, then 6: PARD drew 6 too
    drafts = torch.tensor([[50, 51, 52, 53], [60, 61, 62, 63], [6, 71, 72, 73]])
    matches = [lookup.match(c) for c in contexts]
    assert [m.m for m in matches] == [2, 0, 1]
    found, point_from = lookup.continuations(contexts, drafts[:, 0].tolist(), matches, width=4)
    assert (found, point_from) == ([[3, 1, 2], [], [6, 4, 5]], [0, 1, 1])
    assert lookup.continuations(contexts, [50, 60, 7], width=2)[0] == [[3, 1], [], []]  # PARD drew 7: no
    for i, row in enumerate(found):
        drafts[i, :len(row)] = torch.tensor(row)
    looked = [len(row) for row in found]
    uniform = torch.full((70,), 1 / 70)
    probs = uniform.repeat(3, 4, 1)
    one_hot_rows(probs, drafts, looked, point_from)
    assert torch.equal(probs[0, :3].argmax(-1), torch.tensor([3, 1, 2]))
    assert torch.all(probs[0, :3].sum(-1) == 1) and probs[0, :3].max() == 1
    assert torch.equal(probs[0, 3], uniform) and torch.equal(probs[1], uniform.repeat(4, 1))
    # a 1-token match: its first token is PARD's own draw, so its probability stays PARD's
    assert torch.equal(probs[2, 0], uniform)
    assert torch.equal(probs[2, 1:3].argmax(-1), torch.tensor([4, 5])) and probs[2, 1:3].max() == 1
    assert torch.equal(probs[2, 3], uniform)


def test_lookup_cut_prices_each_match_length_by_what_the_target_accepted():
    """The worked example of LookupCut: the prior sends 4 tokens at threshold
    0.22; then 2-token matches that are always rejected at their second token
    and 4+ token matches always accepted move the two buckets apart."""
    cut = LookupCut(max_k=8)
    assert cut.length(2, 8, 0.22) == 4 and cut.length(5, 3, 0.22) == 3 and cut.length(2, 8, 0.02) == 8
    for step in range(200):
        cut.begin_step(["a", "b"], [4, 4], [3, 0])  # last step: "a" accepted 1 of 4, "b" all 4
        cut.sent("a", 2)
        cut.sent("b", 6)
    assert cut.length(2, 8, 0.22) == 1  # only the first token of a 2-token match pays
    assert cut.length(6, 8, 0.22) >= 4 and cut.length(8, 8, 0.5) >= 4
    assert cut.length(3, 8, 0.22) == 4  # an unmeasured bucket keeps the prior
    # an entry from an older step is dropped, not matched with this step's outcome
    cut.sent("c", 2)
    cut.begin_step([], None, None)
    before = sum(cut.bucket(2).offered)
    cut.begin_step(["c"], [4], [4])
    assert sum(cut.bucket(2).offered) == before  # nothing observed


def test_cut_keeps_looked_up_rows_whole_and_out_of_its_calibration():
    cut = ConfidenceCut()
    cut.begin_step((), None, None)
    confidence = torch.tensor([[0.05, 0.05, 0.05], [0.95, 0.95, 0.05]])
    assert cut.lengths(["a", "b"], confidence, 0.5, fixed=[3, 0]) == [3, 2]
    assert set(cut._sent) == {"b"}  # only the draft's own row is settled against its confidences


def test_offline_replay_sends_lookups_alone():
    lookup = PromptLookup(max_n=8)
    tokens = torch.tensor([1, 2, 3, 4, 1, 2, 3, 4, 5])
    guesses = torch.full((9, 3), 99)
    guesses[4, 0] = 2  # anchor 4: "1" seen once, followed by 2, as PARD guessed: looked up
    table = with_prompt_lookup(guesses, tokens, 4, lookup)
    assert table[4].tolist() == [2, 3, 4]
    assert table[5].tolist() == [3, 4, 1]          # "1 2" -> 3 4 1
    assert table[3].tolist() == [99, 99, 99]       # before the answer: untouched
    guesses[4, 0] = 7                               # PARD disagrees with the 1-token match: PARD's row
    assert with_prompt_lookup(guesses, tokens, 4, lookup)[4].tolist() == [7, 99, 99]
    walk = replay(table, tokens, 4, 8)             # anchor 4: 2 3 4 accepted, then anchor 8 ends it
    assert walk == {"drafts": 1, "accepted": 3, "per_pos": [1, 1, 1]}
