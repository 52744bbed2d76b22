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
