"""The PARD attention contract, written out densely (tests and benchmarks only).

Every packed token carries a block id ``b`` (0 = real token, 1..K-1 = mask block) and
its original position ``p``. A query ``(b, p)`` attends a key ``(b', p')`` iff

* ``b' == 0 and p' <= p - b``: the real tokens a draft would have as context when it
  is asked for the token ``b`` steps past ``x[p - b]``, or
* ``1 <= b' <= b and p' == p - b + b'``: one mask from each earlier mask block, the
  chain of masks that follows that context at inference time, itself included.

Optionally each token also has a document id and nothing attends across documents.

Worked example, L = 3 real tokens and K = 3 (no drop), packed block by block::

    index   0     1     2     3     4     5     6     7     8
    (b,p) (0,0) (0,1) (0,2) (1,0) (1,1) (1,2) (2,0) (2,1) (2,2)

* Block 0 is plain causal attention: query 2 = (0,2) sees keys 0, 1, 2.
* Query 4 = (1,1) sees real tokens with p' <= 0 (key 0) and the block-1 mask at
  position 1 - 1 + 1 = 1, which is itself (key 4).
* Query 8 = (2,2) sees the real token x0 (key 0), the block-1 mask at position 1
  (key 4) and itself (key 8): the same view as a draft holding context x0 followed by
  two masks at positions 1 and 2.
* Query 7 = (2,1) has no real token at all (p - b = -1); it sees the block-1 mask at
  position 0 (key 3) and itself. Every query sees at least itself, so no row is empty.

>>> import torch
>>> b = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
>>> p = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
>>> print(mask_to_text(pard_mask(b, p, b, p)))
x . . . . . . . .
x x . . . . . . .
x x x . . . . . .
. . . x . . . . .
x . . . x . . . .
x x . . . x . . .
. . . . . . x . .
. . . x . . . x .
x . . . x . . . x

Conditional drop removes pairs but keeps every mask's predecessor ``(b-1, p-1)``. With
block 1 keeping positions {1, 2} and block 2 keeping {2}, the compacted sequence is
(0,0) (0,1) (0,2) (1,1) (1,2) (2,2) and query (2,2) still sees x0, (1,1) and itself:

>>> b = torch.tensor([0, 0, 0, 1, 1, 2])
>>> p = torch.tensor([0, 1, 2, 1, 2, 2])
>>> print(mask_to_text(pard_mask(b, p, b, p)))
x . . . . .
x x . . . .
x x x . . .
x . . x . .
x x . . x .
x . . x . x
"""

from __future__ import annotations

import math

import torch

__all__ = ["pard_mask", "mask_to_text", "dense_pard_attention"]


def pard_mask(
    block_ids_q: torch.Tensor,
    pos_ids_q: torch.Tensor,
    block_ids_k: torch.Tensor,
    pos_ids_k: torch.Tensor,
    doc_ids_q: torch.Tensor | None = None,
    doc_ids_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask ``[..., Tq, Tk]``: True where query i may attend key j.

    Inputs are integer tensors ``[..., Tq]`` / ``[..., Tk]`` with matching leading dims.
    """
    bq = block_ids_q.long().unsqueeze(-1)
    pq = pos_ids_q.long().unsqueeze(-1)
    bk = block_ids_k.long().unsqueeze(-2)
    pk = pos_ids_k.long().unsqueeze(-2)
    anchor = pq - bq  # the last real position the query may see
    sees_prefix = (bk == 0) & (pk <= anchor)
    sees_chain = (bk >= 1) & (bk <= bq) & (pk == anchor + bk)
    allowed = sees_prefix | sees_chain
    if doc_ids_q is not None or doc_ids_k is not None:
        if doc_ids_q is None or doc_ids_k is None:
            raise ValueError("pard_mask: pass doc ids for both queries and keys, or for neither")
        allowed = allowed & (doc_ids_q.long().unsqueeze(-1) == doc_ids_k.long().unsqueeze(-2))
    return allowed


def mask_to_text(mask: torch.Tensor) -> str:
    """Render a 2-D boolean mask as rows of ``x`` (attends) and ``.`` (masked)."""
    return "\n".join(" ".join("x" if v else "." for v in row) for row in mask.tolist())


def dense_pard_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_ids: torch.Tensor,
    pos_ids: torch.Tensor,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with the full ``(T, T)`` mask, the way a mask-based trainer computes it.

    It materialises ``B * Hq * T * T`` scores (and autograd keeps the probabilities for
    backward), which is exactly the cost the structured kernels avoid. It is computed in
    the inputs' dtype; tests pass float64 copies to get a trustworthy reference.

    Shapes: q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]``, ids ``[T]`` or ``[B, T]``.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    mask = pard_mask(block_ids, pos_ids, block_ids, pos_ids, doc_ids, doc_ids)
    if mask.dim() == 3:  # [B, T, T] -> broadcast over heads
        mask = mask.unsqueeze(1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)
