"""Packed PARD training layouts: which (block, position) pairs a training sequence holds.

A PARD training sample for a sequence of L real tokens and K subtasks is packed as
block 0 (the L real tokens, positions 0..L-1) followed by K-1 blocks of mask tokens.
Every packed token is described by two integers, its block id ``b`` and its original
position ``p``; the attention kernels need nothing else (see ``reference.pard_mask``).

Conditional drop (COD, ../shared/PARD.md) shrinks the mask blocks: block ``i`` keeps
``int(L * max(r**i, r_min))`` positions, drawn only among ``p + 1`` for the positions
``p`` that block ``i - 1`` kept. The drawing rule is what guarantees the invariant the
kernels rely on and check: a kept ``(b, p)`` with ``b >= 1, p >= 1`` always has its
predecessor ``(b - 1, p - 1)`` kept, so every kept mask query still sees the whole
chain of earlier masks it would see at inference time.

The training code reuses these functions to build its inputs, so they return plain
int64 tensors and take an optional ``torch.Generator`` for reproducible drops.
"""

from __future__ import annotations

import torch

__all__ = ["pard_layout", "cod_block_sizes", "pack_documents"]


def cod_block_sizes(seq_len: int, k: int, cod_r: float | None = None, cod_min: float = 0.2) -> list[int]:
    """Target number of kept positions per block (block 0 first).

    Without COD (``cod_r is None``) every block keeps all ``seq_len`` positions. With COD,
    block ``i >= 1`` asks for ``int(seq_len * max(cod_r**i, cod_min))``; ``pard_layout``
    may keep fewer when block ``i - 1`` left too few candidates (only for tiny ``seq_len``).
    """
    if seq_len < 1 or k < 1:
        raise ValueError(f"pard_layout: need seq_len >= 1 and k >= 1, got seq_len={seq_len}, k={k}")
    if cod_r is None:
        return [seq_len] * k
    if not (0.0 < cod_r <= 1.0 and 0.0 <= cod_min <= 1.0):
        raise ValueError(f"pard_layout: need 0 < cod_r <= 1 and 0 <= cod_min <= 1, got {cod_r}, {cod_min}")
    return [seq_len] + [int(seq_len * max(cod_r**i, cod_min)) for i in range(1, k)]


def pard_layout(
    seq_len: int,
    k: int,
    cod_r: float | None = None,
    cod_min: float = 0.2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ids and positions of one packed PARD training sample.

    Args:
        seq_len: L, the number of real tokens (block 0).
        k: K, the number of subtasks (block 0 plus K-1 mask blocks).
        cod_r: conditional-drop ratio r (PARD-1 uses 0.7); ``None`` keeps every mask.
        cod_min: the floor r_min of the kept fraction per block (PARD-1 uses 0.2).
        generator: CPU generator for the random drop; ``None`` uses torch's global one.

    Returns:
        ``(block_ids, pos_ids)``, two int64 tensors of the packed length T. Tokens are
        ordered block by block and, inside a block, by position (the "canonical" order
        the kernels are fastest on; any order of the same pairs is also accepted).
        Without COD, T = K * L; with r=0.7, r_min=0.2 and K=8, T is about 3.37 * L.
    """
    sizes = cod_block_sizes(seq_len, k, cod_r, cod_min)
    kept = torch.arange(seq_len, dtype=torch.int64)
    blocks = [torch.zeros(seq_len, dtype=torch.int64)]
    positions = [kept]
    for block in range(1, k):
        if cod_r is None:
            kept = torch.arange(seq_len, dtype=torch.int64)
        else:
            # Only a successor of a position kept in the previous block may be kept here.
            candidates = kept + 1
            candidates = candidates[candidates < seq_len]
            n_keep = min(sizes[block], candidates.numel())
            pick = torch.randperm(candidates.numel(), generator=generator)[:n_keep]
            kept = candidates[pick].sort().values
        blocks.append(torch.full((kept.numel(),), block, dtype=torch.int64))
        positions.append(kept)
    return torch.cat(blocks), torch.cat(positions)


def pack_documents(
    layouts: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate several per-document layouts into one packed row.

    Returns ``(block_ids, pos_ids, doc_ids)``; pass ``doc_ids`` to ``pard_attention`` so
    that no token attends across documents.
    """
    if not layouts:
        raise ValueError("pack_documents: pass at least one (block_ids, pos_ids) layout")
    doc_ids = [torch.full_like(b, i) for i, (b, _) in enumerate(layouts)]
    return (
        torch.cat([b for b, _ in layouts]),
        torch.cat([p for _, p in layouts]),
        torch.cat(doc_ids),
    )
