"""Structured PARD attention for CPU tensors (forward and backward, exact).

Why this design (measured on the 2-core AVX-512 dev box, see benchmarks/ATTENTION.md):

* FlexAttention has no CPU backward in torch 2.13 ("FlexAttention does not support
  backward on CPU"), its forward needs 11-19 s of torch.compile and was 2.4x slower than
  this path's forward: its 128-wide blocks spend a whole block on each one-key diagonal.
  Not usable for training here.
* PyTorch's fused CPU flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``
  and its backward) is several times faster per score than chunked matmul + softmax
  written in PyTorch, keeps memory linear in T, and returns the log-sum-exp we need for merging.

So the work is split along the mask's structure (see ``plan.py``):

1. Prefix part. Queries are visited in ``q_order`` (sorted by the end of their real-token
   prefix, so a run of queries needs a narrow key range), in chunks of ``chunk`` queries.
   Each chunk calls the fused kernel on the real-token keys ``[lo, hi)`` the chunk needs,
   with a small additive mask for the staircase edge. Total scores ~ T * L / 2 instead
   of the dense T * T, with no (T, T) tensor anywhere.
2. Diagonal part. Each query has at most K-1 single keys (one per earlier mask block);
   they are gathered per block ``j`` and scored with row-wise dot products in fp32.
3. Merge by log-sum-exp into the exact softmax over the union of both key sets.

Backward reuses the fused kernel's backward on each prefix chunk, fed with the *merged*
output and log-sum-exp: its recomputed probabilities and ``rowsum(dO * O)`` are then those
of the full softmax, so the prefix gradients are exact without any correction. The
diagonal gradients are written out by hand with the same quantities.
"""

from __future__ import annotations

import torch

from .plan import PardPlan

__all__ = ["pard_attention_cpu", "DEFAULT_CHUNK"]

# Queries per fused-kernel call: big enough to amortise the call, small enough that the
# staircase edge (keys computed then masked) stays a few percent of the work.
DEFAULT_CHUNK = 512

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _row_schedule(plan: PardPlan, row: int, chunk: int) -> dict:
    """Query order, prefix chunks and diagonal pairs of one layout row (cached on the plan)."""
    key = ("cpu", row, chunk)
    if key in plan.cache:
        return plan.cache[key]
    order = plan.q_order[row]
    lo = plan.pre_lo[row][order]
    hi = plan.pre_hi[row][order]
    has_prefix = hi > lo
    order, lo, hi = order[has_prefix], lo[has_prefix], hi[has_prefix]
    chunks = []
    for start in range(0, order.numel(), chunk):
        end = min(start + chunk, order.numel())
        # lo and hi are non-decreasing along q_order, so the chunk's key range is:
        key_lo, key_hi = int(lo[start]), int(hi[end - 1])
        chunks.append((start, end, key_lo, key_hi))
    diag = []
    for j in range(plan.n_diag):
        keys = plan.diag_idx[row, :, j]
        rows = (keys >= 0).nonzero().flatten()
        if rows.numel():
            diag.append((rows, keys[rows]))
    n_real = int(plan.n_real[row])
    sched = {
        "order": order,
        "lo": lo,
        "hi": hi,
        "chunks": chunks,
        "diag": diag,
        "real": plan.real_idx[row, :n_real],
    }
    plan.cache[key] = sched
    return sched


def _edge_mask(lo: torch.Tensor, hi: torch.Tensor, key_lo: int, key_hi: int, dtype) -> torch.Tensor:
    """Additive [C, R] mask keeping keys lo <= r < hi of each query (the fused kernel wants q's dtype)."""
    r = torch.arange(key_lo, key_hi)
    drop = r >= hi.unsqueeze(1)
    if int(lo[-1]) > key_lo:  # only chunks spanning two documents have a ragged left edge
        drop |= r < lo.unsqueeze(1)
    return torch.where(drop, float("-inf"), 0.0).to(dtype)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hq, N, D] -> [B, Hkv, G, N, D] view, so a kv head broadcasts over its q heads."""
    b, h, n, d = x.shape
    return x.view(b, h // groups, groups, n, d)


def _forward_row(q, k, v, sched, n_diag, scale):
    """Merged output and fp32 log-sum-exp ([B, Hq, T]) for one layout row."""
    bsz, hq, seq, dim = q.shape
    groups = hq // k.shape[1]
    real = sched["real"]
    k_real = k[:, :, real].repeat_interleave(groups, dim=1)
    v_real = v[:, :, real].repeat_interleave(groups, dim=1)
    order = sched["order"]
    q_sorted = q[:, :, order]
    out_pre = torch.empty_like(q_sorted)
    lse_pre_sorted = torch.empty(bsz, hq, order.numel(), dtype=torch.float32)
    for start, end, key_lo, key_hi in sched["chunks"]:
        mask = _edge_mask(sched["lo"][start:end], sched["hi"][start:end], key_lo, key_hi, q.dtype)
        o, lse = _flash_fwd(
            q_sorted[:, :, start:end], k_real[:, :, key_lo:key_hi], v_real[:, :, key_lo:key_hi],
            0.0, False, attn_mask=mask, scale=scale,
        )
        out_pre[:, :, start:end] = o
        lse_pre_sorted[:, :, start:end] = lse

    lse_pre = torch.full((bsz, hq, seq), float("-inf"))
    lse_pre[:, :, order] = lse_pre_sorted
    diag_scores = torch.full((bsz, hq, seq, max(n_diag, 1)), float("-inf"))
    qg = _grouped(q, groups)
    for j, (rows, keys) in enumerate(sched["diag"]):
        s = (qg[:, :, :, rows].float() * k[:, :, keys].float().unsqueeze(2)).sum(-1) * scale
        diag_scores[:, :, rows, j] = s.reshape(bsz, hq, rows.numel())

    peak = torch.maximum(lse_pre, diag_scores.amax(-1))  # finite: every query sees itself
    total = torch.exp(lse_pre - peak) + torch.exp(diag_scores - peak.unsqueeze(-1)).sum(-1)
    lse = peak + torch.log(total)

    out = torch.zeros(bsz, hq, seq, dim, dtype=torch.float32)
    out[:, :, order] = out_pre.float() * torch.exp(lse_pre_sorted - lse[:, :, order]).unsqueeze(-1)
    for j, (rows, keys) in enumerate(sched["diag"]):
        p = torch.exp(diag_scores[:, :, rows, j] - lse[:, :, rows])
        contrib = _grouped(p.unsqueeze(-1), groups) * v[:, :, keys].float().unsqueeze(2)
        out[:, :, rows] += contrib.reshape(bsz, hq, rows.numel(), dim)
    return out.to(q.dtype), lse


def _backward_row(dout, q, k, v, out, lse, sched, scale):
    bsz, hq, seq, dim = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    real = sched["real"]
    order = sched["order"]
    dq = torch.zeros(bsz, hq, seq, dim, dtype=torch.float32)
    dk = torch.zeros(bsz, hkv, seq, dim, dtype=torch.float32)
    dv = torch.zeros(bsz, hkv, seq, dim, dtype=torch.float32)

    if sched["chunks"]:
        k_real = k[:, :, real].repeat_interleave(groups, dim=1)
        v_real = v[:, :, real].repeat_interleave(groups, dim=1)
        q_sorted, do_sorted, o_sorted = q[:, :, order], dout[:, :, order], out[:, :, order]
        lse_sorted = lse[:, :, order].contiguous()
        dq_sorted = torch.empty(bsz, hq, order.numel(), dim, dtype=torch.float32)
        dk_real = torch.zeros(bsz, hq, real.numel(), dim, dtype=torch.float32)
        dv_real = torch.zeros_like(dk_real)
        for start, end, key_lo, key_hi in sched["chunks"]:
            mask = _edge_mask(sched["lo"][start:end], sched["hi"][start:end], key_lo, key_hi, q.dtype)
            gq, gk, gv = _flash_bwd(
                do_sorted[:, :, start:end], q_sorted[:, :, start:end],
                k_real[:, :, key_lo:key_hi], v_real[:, :, key_lo:key_hi],
                o_sorted[:, :, start:end], lse_sorted[:, :, start:end],
                0.0, False, attn_mask=mask, scale=scale,
            )
            dq_sorted[:, :, start:end] = gq
            dk_real[:, :, key_lo:key_hi] += gk
            dv_real[:, :, key_lo:key_hi] += gv
        dq[:, :, order] = dq_sorted
        dk[:, :, real] = _grouped(dk_real, groups).sum(2)
        dv[:, :, real] = _grouped(dv_real, groups).sum(2)

    if sched["diag"]:
        delta = (dout.float() * out.float()).sum(-1)
        qg, dog = _grouped(q, groups), _grouped(dout, groups)
        lse_g, delta_g = lse.view(bsz, hkv, groups, seq), delta.view(bsz, hkv, groups, seq)
        for rows, keys in sched["diag"]:
            q_j = qg[:, :, :, rows].float()
            do_j = dog[:, :, :, rows].float()
            k_j = k[:, :, keys].float().unsqueeze(2)
            v_j = v[:, :, keys].float().unsqueeze(2)
            p = torch.exp((q_j * k_j).sum(-1) * scale - lse_g[:, :, :, rows])
            ds = p * ((do_j * v_j).sum(-1) - delta_g[:, :, :, rows])
            # rows are distinct within one diagonal block j, keys are not (a mask key is
            # seen by the whole chain after it), hence plain indexing vs index_add_.
            dq[:, :, rows] += (ds.unsqueeze(-1) * k_j * scale).reshape(bsz, hq, rows.numel(), dim)
            dk.index_add_(2, keys, (ds.unsqueeze(-1) * q_j).sum(2) * scale)
            dv.index_add_(2, keys, (p.unsqueeze(-1) * do_j).sum(2))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _row_slices(plan: PardPlan, batch: int):
    """(layout row, batch slice) pairs: one call for a shared layout, one per row otherwise."""
    if plan.rows == 1:
        return [(0, slice(0, batch))]
    return [(r, slice(r, r + 1)) for r in range(plan.rows)]


class _PardAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, chunk):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32)
        for row, sl in _row_slices(plan, q.shape[0]):
            sched = _row_schedule(plan, row, chunk)
            out[sl], lse[sl] = _forward_row(q[sl], k[sl], v[sl], sched, plan.n_diag, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.chunk = plan, scale, chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for row, sl in _row_slices(ctx.plan, q.shape[0]):
            sched = _row_schedule(ctx.plan, row, ctx.chunk)
            dq[sl], dk[sl], dv[sl] = _backward_row(
                dout[sl], q[sl], k[sl], v[sl], out[sl], lse[sl], sched, ctx.scale
            )
        return dq, dk, dv, None, None, None


def pard_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: PardPlan,
    scale: float,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Exact PARD attention on CPU tensors (inputs already validated by the caller)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _PardAttentionCPU.apply(q, k, v, plan, scale, chunk)
