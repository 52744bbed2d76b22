"""The PARD draft batch: what the draft model sees in its single forward pass.

Every step, each request contributes the tokens the target just consumed,
then one new token and K-1 mask tokens. Worked example, K = 3, mask id M,
two requests in one batch:

* request 0 is decoding. Last step it proposed d1 d2 d3 after the bonus b0;
  the target verified [b0 d1 d2 d3] at positions 10..13, accepted d1 only, and
  sampled the correction c. So 2 of its 4 target tokens were rejected.
* request 1 is a 2-token prefill chunk [p q] at positions 0..1; the target
  sampled its first token t.

Target side (one flat batch)::

    token ids  b0 d1 d2 d3 | p  q
    positions  10 11 12 13 | 0  1      query_start_loc = [0, 4, 6]
    num_rejected = [2, 0]

Draft batch (each request grows by K slots)::

    slot         0  1  2  3  4  5  6 |  7  8  9 10 11
    token ids   b0 d1  c  M  M  0  0 |  p  q  t  M  M
    positions   10 11 12 13 14  0  0 |  0  1  2  3  4
    rejected     .  .  .  .  .  x  x |  .  .  .  .  .
    sampled at         ^  ^  ^       |        ^  ^  ^

The accepted tokens are re-fed so their draft KV overwrites whatever the mask
tokens wrote at those positions last step (the "logical rollback" of K-1
slots). Then the new token c, then K-1 masks, at consecutive positions. The
rejected slots stay in the batch only so every request grows by exactly K
(which keeps vLLM's attention metadata a uniform extension); they are never
written to the KV cache and their logits are ignored. The K draft tokens are
read at the new token and at each mask: logits at slot 2 guess position 13,
slot 3 guesses 14, slot 4 guesses 15.

``build_draft_batch`` does this with tensor ops only (no host sync, the same
code on CPU and GPU); ``reference_draft_batch`` is the same layout written as
plain Python loops, used by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftBatch:
    input_ids: torch.Tensor  # [T + B*K]
    positions: torch.Tensor  # [T + B*K]
    is_rejected: torch.Tensor  # [T + B*K] bool: padding slots, never cached
    is_mask: torch.Tensor  # [T + B*K] bool: mask-token slots
    sample_indices: torch.Tensor  # [B*K] request-major: where the K drafts are read


def build_draft_batch(
    target_token_ids: torch.Tensor,
    target_positions: torch.Tensor,
    next_token_ids: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_rejected: torch.Tensor | None,
    mask_token_id: int,
    k: int,
    padding_token_id: int = 0,
) -> DraftBatch:
    """Lay out the draft batch (see the module docstring) with tensor ops.

    Args:
        target_token_ids: [T] tokens the target consumed this step.
        target_positions: [T] their positions.
        next_token_ids: [B] the token the target produced for each request
            (bonus or correction).
        query_start_loc: [B+1] offsets of each request in the target batch.
        num_rejected: [B] trailing target tokens that were rejected, or None.
        mask_token_id: the draft's PARD mask token.
        k: number of draft tokens per request.
    """
    device = target_token_ids.device
    num_reqs = next_token_ids.shape[0]
    num_in = target_token_ids.shape[0]
    num_out = num_in + num_reqs * k
    starts = query_start_loc[:-1].long()
    query_lens = query_start_loc[1:].long() - starts
    if num_rejected is None:
        num_valid = query_lens
    else:
        num_valid = query_lens - num_rejected.long()

    req_arange = torch.arange(num_reqs, device=device)
    out_starts = starts + req_arange * k
    # Which request each output slot belongs to, and its offset inside it.
    req_of_slot = torch.repeat_interleave(req_arange, query_lens + k, output_size=num_out)
    offset = torch.arange(num_out, device=device) - out_starts[req_of_slot]
    valid_len = num_valid[req_of_slot]

    is_valid = offset < valid_len
    is_new = (offset == valid_len) & (k > 0)  # k == 0: no draft this step
    is_mask = (offset > valid_len) & (offset < valid_len + k)
    is_rejected = offset >= valid_len + k

    src = torch.clamp(starts[req_of_slot] + offset, max=max(num_in - 1, 0))
    ids = torch.where(is_valid, target_token_ids[src], padding_token_id)
    ids = torch.where(is_new, next_token_ids[req_of_slot].to(ids.dtype), ids)
    ids = torch.where(is_mask, torch.full_like(ids, mask_token_id), ids)

    first_pos = target_positions[starts][req_of_slot]
    positions = torch.where(is_rejected, 0, first_pos + offset)

    sample_indices = (
        out_starts + num_valid
    ).unsqueeze(1) + torch.arange(k, device=device).unsqueeze(0)
    return DraftBatch(
        input_ids=ids,
        positions=positions.to(target_positions.dtype),
        is_rejected=is_rejected,
        is_mask=is_mask,
        sample_indices=sample_indices.reshape(-1).to(torch.int32),
    )


def reference_draft_batch(
    target_token_ids: list[int],
    target_positions: list[int],
    next_token_ids: list[int],
    query_start_loc: list[int],
    num_rejected: list[int],
    mask_token_id: int,
    k: int,
    padding_token_id: int = 0,
) -> dict[str, list]:
    """The same layout as ``build_draft_batch``, one request at a time."""
    ids, pos, rej, msk, sample = [], [], [], [], []
    for r in range(len(next_token_ids)):
        lo, hi = query_start_loc[r], query_start_loc[r + 1]
        valid = hi - lo - num_rejected[r]
        first = target_positions[lo]
        for j in range(valid):
            ids.append(target_token_ids[lo + j]); pos.append(first + j)
            rej.append(False); msk.append(False)
        for j in range(k):
            sample.append(len(ids))
            ids.append(next_token_ids[r] if j == 0 else mask_token_id)
            pos.append(first + valid + j); rej.append(False); msk.append(j > 0)
        for _ in range(num_rejected[r]):
            ids.append(padding_token_id); pos.append(0)
            rej.append(True); msk.append(False)
    return {"input_ids": ids, "positions": pos, "is_rejected": rej,
            "is_mask": msk, "sample_indices": sample}
