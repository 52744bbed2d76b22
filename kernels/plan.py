"""Per-query index tensors that turn a packed PARD layout into a structured problem.

Every backend runs this cheap integer pre-pass once per layout (it can be reused across
layers via ``build_plan``), then never looks at block or position ids again:

* ``real_idx``: packed indices of the real (block-0) tokens, sorted by (document,
  position). A query's real-token keys are a contiguous run ``[pre_lo, pre_hi)`` of
  this list, whatever order the packed sequence uses, which is what lets the kernels
  treat the prefix as a causal flash-attention loop with a per-query offset.
* ``diag_idx[t, j - 1]``: packed index of the block-``j`` mask at position
  ``p - b + j`` that query ``t = (b, p)`` sees, or -1 when ``j > b`` or it was dropped.
* For backward, the key-side view of the same relation:
  ``q_order`` sorts queries by ``(pre_hi, pre_lo)``, so the queries that see real key
  ``r`` are the run ``[key_q_start[r], key_q_end[r])`` of that order (minus those whose
  prefix ends before ``r``, which a kernel masks); ``rdiag_idx[n, t]`` lists the
  queries ``(b' + t, p' + t)`` that see mask key ``n = (b', p')`` on their diagonal.

Lookups use one sort plus ``searchsorted`` on packed integer codes, so they are exact for
any order of any set of distinct (document, block, position) triples. Validation rejects
what the contract rules out: negative ids, duplicate pairs, and masks whose predecessor
``(b - 1, p - 1)`` is missing (the conditional-drop invariant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["PardPlan", "build_plan"]


@dataclass
class PardPlan:
    """Index tensors of one layout per row; ``rows`` is 1 when the batch shares a layout.

    All tensors are int64 on the ids' device with a leading ``rows`` dimension; padding
    entries of ``real_idx``/``key_q_*`` past ``n_real`` are 0 and never used.
    """

    rows: int
    seq_len: int
    n_diag: int
    n_real: torch.Tensor  # [rows]
    real_idx: torch.Tensor  # [rows, T]
    pre_lo: torch.Tensor  # [rows, T]
    pre_hi: torch.Tensor  # [rows, T]
    diag_idx: torch.Tensor  # [rows, T, n_diag]
    q_order: torch.Tensor  # [rows, T]
    key_q_start: torch.Tensor  # [rows, T]
    key_q_end: torch.Tensor  # [rows, T]
    rdiag_idx: torch.Tensor  # [rows, T, n_diag]
    # Backend-specific derived data (int32 copies, CPU chunk lists), filled lazily.
    cache: dict = field(default_factory=dict, repr=False, compare=False)


def _as_rows(ids: torch.Tensor, name: str) -> torch.Tensor:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"pard_attention: {name} must be an integer tensor, got {ids.dtype}")
    if ids.dim() == 1:
        return ids.long().unsqueeze(0)
    if ids.dim() == 2:
        return ids.long()
    raise ValueError(f"pard_attention: {name} must have shape [T] or [B, T], got {tuple(ids.shape)}")


def build_plan(
    block_ids: torch.Tensor,
    pos_ids: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    validate: bool = True,
) -> PardPlan:
    """Validate a packed layout and compute the index tensors every backend needs.

    Args:
        block_ids, pos_ids: integer tensors ``[T]`` (shared by the batch) or ``[B, T]``.
        doc_ids: optional ``[T]``/``[B, T]`` document ids; tokens of different documents
            never attend each other.
        validate: check the COD invariant and uniqueness (one reduction; keep it on
            unless the layout comes from ``pard_layout``).
    """
    blocks = _as_rows(block_ids, "block_ids")
    pos = _as_rows(pos_ids, "pos_ids")
    if blocks.shape != pos.shape:
        raise ValueError(
            f"pard_attention: block_ids {tuple(block_ids.shape)} and pos_ids {tuple(pos_ids.shape)} "
            "must have the same shape"
        )
    rows, seq_len = blocks.shape
    device = blocks.device
    if doc_ids is None:
        docs = torch.zeros_like(blocks)
    else:
        docs = _as_rows(doc_ids, "doc_ids").to(device)
        if docs.shape != blocks.shape:
            raise ValueError(
                f"pard_attention: doc_ids {tuple(doc_ids.shape)} must have the shape of block_ids "
                f"{tuple(block_ids.shape)}"
            )
        docs = torch.unique(docs, return_inverse=True)[1].view(rows, seq_len)
    if seq_len == 0:
        raise ValueError("pard_attention: the packed sequence is empty (T == 0)")
    if validate and (int(blocks.min()) < 0 or int(pos.min()) < 0):
        raise ValueError("pard_attention: block_ids and pos_ids must be >= 0 (block 0 = real tokens)")

    n_blocks = int(blocks.max()) + 1
    n_pos = int(pos.max()) + 1
    n_docs = int(docs.max()) + 1
    n_diag = n_blocks - 1
    row = torch.arange(rows, device=device).unsqueeze(1)

    def code(r, d, b, p):
        return ((r * n_docs + d) * n_blocks + b) * n_pos + p

    codes = code(row, docs, blocks, pos).flatten()
    sorted_codes, sort_perm = codes.sort()
    if validate and seq_len > 1 and bool((sorted_codes[1:] == sorted_codes[:-1]).any()):
        raise ValueError(
            "pard_attention: the layout repeats a (block, position) pair in one document; "
            "give each packed token a distinct pair (pass doc_ids when packing documents)"
        )

    def find(r, d, b, p):
        """Packed index (within its row) of token (r, d, b, p), or -1 when absent."""
        valid = (p >= 0) & (p < n_pos) & (b >= 0) & (b < n_blocks)
        wanted = code(r, d, b.clamp(0, n_blocks - 1), p.clamp(0, n_pos - 1))
        at = torch.searchsorted(sorted_codes, wanted.flatten()).clamp_max(sorted_codes.numel() - 1)
        hit = (sorted_codes[at] == wanted.flatten()).view(wanted.shape) & valid
        return torch.where(hit, (sort_perm[at] % seq_len).view(wanted.shape), -1)

    if validate:
        needs_pred = (blocks >= 1) & (pos >= 1)
        pred = find(row, docs, blocks - 1, pos - 1)
        broken = needs_pred & (pred < 0)
        if bool(broken.any()):
            r, t = (int(x) for x in broken.nonzero()[0])
            raise ValueError(
                f"pard_attention: layout breaks the COD invariant: token {t} (block {int(blocks[r, t])}, "
                f"pos {int(pos[r, t])}) has no (block-1, pos-1) predecessor; build layouts with "
                "pard_vllm.kernels.pard_layout"
            )

    # Real tokens sorted by (document, position); later rows of the sort are padding.
    is_real = blocks == 0
    sentinel = n_docs * n_pos
    real_key = torch.where(is_real, docs * n_pos + pos, sentinel)
    real_sorted, real_perm = real_key.sort(dim=1)
    n_real = is_real.sum(dim=1)
    real_idx = torch.where(real_sorted < sentinel, real_perm, 0)

    anchor = pos - blocks  # the last real position a query sees
    pre_lo = torch.searchsorted(real_sorted, docs * n_pos, side="left")
    pre_hi = torch.searchsorted(real_sorted, docs * n_pos + anchor.clamp_min(0), side="right")
    pre_hi = torch.where(anchor >= 0, pre_hi, pre_lo)

    j = torch.arange(1, n_blocks, device=device)  # diagonal blocks 1..K-1
    diag_idx = find(row.unsqueeze(-1), docs.unsqueeze(-1), j, (anchor.unsqueeze(-1) + j))
    diag_idx = torch.where(j <= blocks.unsqueeze(-1), diag_idx, -1)

    t = torch.arange(n_diag, device=device)  # a mask key (b', p') is seen by (b'+t, p'+t)
    rdiag_idx = find(row.unsqueeze(-1), docs.unsqueeze(-1), blocks.unsqueeze(-1) + t, pos.unsqueeze(-1) + t)
    rdiag_idx = torch.where(blocks.unsqueeze(-1) >= 1, rdiag_idx, -1)

    q_order = torch.sort(pre_hi * (seq_len + 1) + pre_lo, dim=1, stable=True).indices
    hi_sorted = pre_hi.gather(1, q_order)
    lo_sorted = pre_lo.gather(1, q_order)
    ranks = torch.arange(seq_len, device=device).expand(rows, seq_len).contiguous()
    key_q_start = torch.searchsorted(hi_sorted, ranks, side="right")
    key_q_end = torch.searchsorted(lo_sorted, ranks, side="right")

    return PardPlan(
        rows=rows,
        seq_len=seq_len,
        n_diag=n_diag,
        n_real=n_real,
        real_idx=real_idx,
        pre_lo=pre_lo,
        pre_hi=pre_hi,
        diag_idx=diag_idx,
        q_order=q_order,
        key_q_start=key_q_start,
        key_q_end=key_q_end,
        rdiag_idx=rdiag_idx,
    )
