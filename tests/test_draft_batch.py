"""The draft-batch layout (tensor version) against the plain-Python reference."""

from __future__ import annotations

import random

import pytest
import torch

from pard_vllm.draft_batch import build_draft_batch, reference_draft_batch

M = 16  # mask token id


def _run(ids, pos, nxt, qsl, rej, k):
    b = build_draft_batch(torch.tensor(ids, dtype=torch.int32), torch.tensor(pos, dtype=torch.int64),
                          torch.tensor(nxt, dtype=torch.int32), torch.tensor(qsl, dtype=torch.int32),
                          torch.tensor(rej, dtype=torch.int32), M, k)
    return {"input_ids": b.input_ids.tolist(), "positions": b.positions.tolist(),
            "is_rejected": b.is_rejected.tolist(), "is_mask": b.is_mask.tolist(),
            "sample_indices": b.sample_indices.tolist()}


def test_docstring_example():
    b0, d1, d2, d3, c, p, q, t = 100, 101, 102, 103, 104, 200, 201, 202
    got = _run([b0, d1, d2, d3, p, q], [10, 11, 12, 13, 0, 1], [c, t], [0, 4, 6], [2, 0], k=3)
    assert got["input_ids"] == [b0, d1, c, M, M, 0, 0, p, q, t, M, M]
    assert got["positions"] == [10, 11, 12, 13, 14, 0, 0, 0, 1, 2, 3, 4]
    assert got["is_rejected"] == [False] * 5 + [True] * 2 + [False] * 5
    assert got["sample_indices"] == [2, 3, 4, 9, 10, 11]


def _random_batch(rng: random.Random, k: int):
    ids, pos, nxt, qsl, rej = [], [], [], [0], []
    for _ in range(rng.randint(1, 6)):
        decoding = rng.random() < 0.6
        n = k + 1 if decoding else rng.randint(1, 20)       # verify K+1, or a prefill chunk
        r = rng.randint(0, k) if decoding else 0             # rejected drafts
        start = rng.randint(0, 500)
        ids += [rng.randint(17, 49151) for _ in range(n)]
        pos += list(range(start, start + n))
        nxt.append(rng.randint(17, 49151))
        rej.append(r)
        qsl.append(qsl[-1] + n)
    return ids, pos, nxt, qsl, rej


@pytest.mark.parametrize("k", [0, 1, 2, 4, 8, 16, 32])  # 0: an adaptive step without drafts
def test_matches_reference_on_random_batches(k):
    rng = random.Random(k)
    for _ in range(50):
        args = _random_batch(rng, k)
        assert _run(*args, k=k) == reference_draft_batch(*args, mask_token_id=M, k=k)


def test_every_request_gets_exactly_k_drafts_at_consecutive_positions():
    rng = random.Random(0)
    k = 8
    ids, pos, nxt, qsl, rej = _random_batch(rng, k)
    got = _run(ids, pos, nxt, qsl, rej, k)
    samples = got["sample_indices"]
    assert len(samples) == k * len(nxt)
    for r in range(len(nxt)):
        rows = samples[r * k:(r + 1) * k]
        assert got["input_ids"][rows[0]] == nxt[r]
        assert all(got["input_ids"][i] == M for i in rows[1:])
        first = pos[qsl[r + 1] - 1 - rej[r]] + 1  # the position after the last accepted token
        assert [got["positions"][i] for i in rows] == list(range(first, first + k))


def test_no_rejections_argument():
    ids, pos, nxt, qsl = [5, 6, 7], [0, 1, 2], [8], [0, 3]
    b = build_draft_batch(torch.tensor(ids), torch.tensor(pos), torch.tensor(nxt),
                          torch.tensor(qsl), None, M, 2)
    assert b.input_ids.tolist() == [5, 6, 7, 8, M]
    assert b.positions.tolist() == [0, 1, 2, 3, 4]


# --- catch-up after steps that skipped the draft (pard_vllm.draft_catchup) ---

def test_draft_lag_tracks_the_first_missed_position():
    from pard_vllm.draft_catchup import DraftLag

    lag = DraftLag()
    lag.skipped(["a", "b"], [40, 7])
    lag.skipped(["a", "b"], [41, 8])
    lag.skipped(["a"], [42])
    assert lag.take(["a", "c"], [43, 5]) == [3, 0]  # a missed 40..42; c never lagged
    assert lag.behind == {"b": 7}  # b was not in that step: still behind
    lag.skipped(["b"], [3])  # preempted, recomputing from 3: the earlier position wins
    assert lag.take(["b"], [9]) == [6]
    lag.skipped(["x"], [1])
    lag.forget_finished({"y"})
    assert lag.behind == {}


def test_cap_lags_fits_the_buffer_and_cuts_the_longest_first():
    from pard_vllm.draft_catchup import cap_lags

    assert cap_lags([3, 0, 5], 100) == [3, 0, 5]
    assert cap_lags([3, 0, 50], 20) == [3, 0, 17]
    assert cap_lags([10, 10], 5) == [2, 2]
    assert sum(cap_lags([7, 1, 30, 12], 25)) <= 25


def test_prepend_catchup_docstring_example():
    import numpy as np
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from pard_vllm.draft_catchup import prepend_catchup

    # request 0 (row 0) missed positions 40..42 and now consumes 43; request 1
    # is a 2-token chunk at 0..1 that never lagged.
    table = np.zeros((2, 64), dtype=np.int32)
    table[0, 40:44] = [140, 141, 142, 143]
    qsl = torch.tensor([0, 1, 3], dtype=torch.int32)
    cad = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=torch.tensor([44, 2]),
        num_reqs=2, num_actual_tokens=3, max_query_len=2, max_seq_len=44,
        block_table_tensor=torch.zeros(2, 4, dtype=torch.int32), slot_mapping=torch.zeros(3))
    ids, pos, new = prepend_catchup(torch.tensor([143, 7, 8], dtype=torch.int32),
                                    torch.tensor([43, 0, 1]), cad, [3, 0], table, [43, 0])
    assert ids.tolist() == [140, 141, 142, 143, 7, 8] and ids.dtype == torch.int32
    assert pos.tolist() == [40, 41, 42, 43, 0, 1]
    assert new.query_start_loc_cpu.tolist() == [0, 4, 6] and new.query_start_loc.tolist() == [0, 4, 6]
    assert new.num_actual_tokens == 6 and new.max_query_len == 4
    assert new.query_start_loc.dtype == new.query_start_loc_cpu.dtype == torch.int32
    assert new.seq_lens.tolist() == [44, 2]  # the missed tokens were already in the context
    assert new.compute_num_computed_tokens().tolist() == [40, 0]
