"""Skipping the draft forward on steps that draft nothing, and catching up later.

With adaptive K a step may draft K = 0 tokens (speculation does not pay at this
batch). vLLM still runs the draft over the step's new tokens then, only to keep
the draft's KV cache current. We skip that forward instead and remember, per
request, the first position the draft has not seen. When drafting resumes, the
tokens the draft missed are put in front of the request's part of the draft batch,
so the one PARD forward also fills the draft KV for them (a small prefill, far
cheaper per token than the decode-sized forwards it replaces).

Worked example: request r decodes without drafts at positions 40, 41, 42 (three
skipped steps; the draft last saw position 39). At the next drafting step the
target consumes position 43 only. ``DraftLag.take`` returns lag 3 for r, and
``prepend_catchup`` turns r's target slice ``[t43] @ [43]`` into
``[t40 t41 t42 t43] @ [40 41 42 43]``, with the tokens read from the runner's
token table. ``pard_vllm.draft_batch`` then lays out the masks after t43 as usual.

Lossless either way: the rejection sampler checks every draft against the target.
Catch-up only keeps acceptance as high as if the draft had never stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class DraftLag:
    """Per request: the first position whose draft KV was not written."""

    def __init__(self) -> None:
        self.behind: dict[str, int] = {}

    def skipped(self, req_ids: Sequence[str], first_positions: Sequence[int]) -> None:
        """A step without a draft forward; ``first_positions[i]`` is the first
        position the target consumed for request i in it. ``min`` because a
        preempted request recomputes from an earlier position."""
        for req, pos in zip(req_ids, first_positions):
            self.behind[req] = min(self.behind.get(req, pos), pos)

    def take(self, req_ids: Sequence[str], first_positions: Sequence[int]) -> list[int]:
        """A step with a draft forward: how many positions before this step's
        tokens each request must re-feed (0 for one that never lagged)."""
        return [max(0, pos - self.behind.pop(req, pos)) for req, pos in zip(req_ids, first_positions)]

    def forget_finished(self, live: "set[str] | dict") -> None:
        for req in [r for r in self.behind if r not in live]:
            del self.behind[req]


def cap_lags(lags: list[int], room: int) -> list[int]:
    """Largest per-request cap so that sum(min(lag, cap)) <= room. Positions left
    out stay stale in the draft cache: acceptance may dip, output cannot change."""
    if sum(lags) <= room:
        return lags
    lo, hi = 0, max(lags)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(x, mid) for x in lags) <= room else (lo, mid - 1)
    return [min(x, lo) for x in lags]


def prepend_catchup(target_token_ids: torch.Tensor, target_positions: torch.Tensor, cad,
                    lags: Sequence[int], token_table: np.ndarray, first_positions: Sequence[int]):
    """Put each request's missed tokens in front of its slice of the target batch.

    Args:
        target_token_ids, target_positions: [T] what the target consumed this step.
        cad: vLLM's CommonAttentionMetadata of that batch.
        lags: per request, how many positions before its first one to re-feed.
        token_table: the runner's ``input_batch.token_ids_cpu`` (row i = request i).
        first_positions: per request, the first position of its slice.

    Returns (token ids, positions, metadata) of the longer batch. Sequence lengths
    do not change (the missed tokens are already part of each context); query
    lengths grow by the lag, and the slot mapping is recomputed by the caller.
    """
    device = target_token_ids.device
    qsl = cad.query_start_loc_cpu.tolist()
    ids, pos = [], []
    src_ids, src_pos = target_token_ids.cpu(), target_positions.cpu()
    for i, lag in enumerate(lags):
        first = first_positions[i]
        if lag:
            ids.append(torch.from_numpy(token_table[i, first - lag:first].astype(np.int64)))
            pos.append(torch.arange(first - lag, first, dtype=torch.int64))
        ids.append(src_ids[qsl[i]:qsl[i + 1]].long())
        pos.append(src_pos[qsl[i]:qsl[i + 1]].long())
    new_ids = torch.cat(ids).to(device=device, dtype=target_token_ids.dtype)
    new_pos = torch.cat(pos).to(device=device, dtype=target_positions.dtype)
    extra = torch.tensor([0] + list(lags)).cumsum(0)  # cumsum returns int64
    qsl_cpu = (cad.query_start_loc_cpu + extra).to(cad.query_start_loc_cpu.dtype)
    query_lens = qsl_cpu[1:] - qsl_cpu[:-1]
    new_cad = cad.replace(
        query_start_loc=qsl_cpu.to(cad.query_start_loc.device),
        query_start_loc_cpu=qsl_cpu,
        num_actual_tokens=cad.num_actual_tokens + int(extra[-1]),
        max_query_len=int(query_lens.max()) if len(query_lens) else 0,
        positions=None,
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
    )
    return new_ids, new_pos, new_cad
