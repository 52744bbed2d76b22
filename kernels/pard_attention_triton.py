"""Triton forward and backward kernels for PARD parallel-mask attention.

The mask is never materialised. ``plan.py`` turns the packed layout into per-query
indices once per layout, and the kernels only follow them:

* prefix: query ``t`` attends the real tokens ``real_idx[pre_lo[t]:pre_hi[t]]``. Queries
  are visited in ``q_order`` (sorted by ``pre_hi``), so a tile of BLOCK_M queries shares
  almost the same key range and the prefix is an ordinary causal flash-attention loop
  with a per-query offset: masked tiles only on the ragged edges, unmasked in between.
* diagonal: at most ``N_DIAG = K - 1`` single keys per query (``diag_idx``), scored with
  row-wise dot products and folded into the same online softmax.

Work per (batch, head) is ~ T * L / 2 prefix scores + T * (K - 1) diagonal scores,
against (T)^2 for a dense mask (benchmarks/ATTENTION.md has the full model).

Backward (FlashAttention-2 style, recomputing probabilities from the saved log-sum-exp):

* ``_bwd_dq_kernel``: per query tile, the forward's loops again, accumulating dq.
* ``_bwd_dkdv_real_kernel``: per tile of real keys, the queries that see them are a
  contiguous run of ``q_order`` (``key_q_start``/``key_q_end``), looped like a causal
  flash backward; all query heads of the kv group accumulate into one dk/dv tile (GQA).
* ``_bwd_dkdv_diag_kernel``: per mask key, the <= K-1 queries that see it on their
  diagonal (``rdiag_idx``) are gathered and accumulated in registers.

Why gathers instead of atomics for dk/dv: real keys and mask keys are disjoint sets, and
each of them is owned by exactly one program, so every dk/dv row is written once with a
plain store. This is deterministic (bitwise reproducible training), needs no fp32
scratch buffers or zero-initialisation, lets the autotuner re-run kernels safely, and
avoids fp32 atomics whose throughput and ordering differ between NVIDIA and AMD. The
price is that the query tiles are loaded once more (by the dq kernel), the usual FA2
trade-off.

Portability: only ``tl.dot``, masked loads/stores and gathers by index; no TMA, no
warp-specialisation, no wgmma-specific layouts. Autotune configs use num_warps 4/8
(valid for 32- and 64-wide wavefronts) and num_stages 1/2 (the AMD stream pipeliner's
useful range). fp32 dots use ``input_precision="ieee"`` (exact, and MI250 has no TF32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .plan import PardPlan

__all__ = ["pard_attention_triton"]

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _configs(block_a, block_b, name_a, name_b):
    return [
        triton.Config({name_a: a, name_b: b}, num_warps=w, num_stages=s)
        for a in block_a
        for b in block_b
        for w in (4, 8)
        for s in (1, 2)
        if not (w == 8 and a * b < 64 * 64)
    ]


_FWD_CONFIGS = _configs((64, 128), (32, 64), "BLOCK_M", "BLOCK_N")
_DQ_CONFIGS = _configs((32, 64, 128), (32, 64), "BLOCK_M", "BLOCK_N")
_DKDV_CONFIGS = _configs((32, 64, 128), (32, 64), "BLOCK_N", "BLOCK_M")
_DIAG_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w) for n in (32, 64, 128) for w in (4, 8)]
# Small fixed tiles for the interpreter (tests): several tiles per problem, every code path.
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16}


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. "upcast" is only used under TRITON_INTERPRET for
    bfloat16, whose numpy-based tl.dot mishandles bf16 storage: bf16 products are exact in
    fp32, so upcasting computes what a bf16 MMA with fp32 accumulation computes."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT_PRECISION == "ieee":
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)  # the backend's default (e.g. gfx90a rejects an explicit "tf32")


@triton.jit
def _fwd_prefix_tile(acc, l_i, m_i, q, k_base, v_base, real_row, start_n, lo, hi, key_end,
                     stride_kt, offs_d, d_ok, qk_scale,
                     MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over real keys [start_n, start_n + BLOCK_N) of real_idx."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < key_end
    kidx = tl.load(real_row + offs_n, mask=n_ok, other=0).to(tl.int64)
    kt = tl.load(k_base + kidx[None, :] * stride_kt + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    s = _dot(q, kt, DOT_PRECISION) * qk_scale
    if MASKED:
        keep = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None]) & n_ok[None, :]
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    vt = tl.load(v_base + kidx[:, None] * stride_kt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, DOT_PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, RealIdx, PreLo, PreHi, Diag, QOrder,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                plan_stride, T, H, GROUPS, qk_scale,
                N_DIAG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    q_base = Q + b * stride_qb + h.to(tl.int64) * stride_qh
    o_base = Out + b * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b * stride_kb + (h // GROUPS).to(tl.int64) * stride_kh
    v_base = V + b * stride_kb + (h // GROUPS).to(tl.int64) * stride_kh
    plan_off = b * plan_stride

    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs < T
    row = tl.load(QOrder + plan_off + offs, mask=m_ok, other=0).to(tl.int64)
    lo = tl.load(PreLo + plan_off + row, mask=m_ok, other=0)
    hi = tl.load(PreHi + plan_off + row, mask=m_ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_base + row[:, None] * stride_qt + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # Diagonal keys: one mask per earlier block (itself included), <= N_DIAG per query.
    qf = q.to(tl.float32)
    for j in range(N_DIAG):
        didx = tl.load(Diag + (plan_off + row) * N_DIAG + j, mask=m_ok, other=-1)
        has = didx >= 0
        dptr = didx.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
        kd = tl.load(k_base + dptr, mask=has[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(has, tl.sum(qf * kd, 1) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        vd = tl.load(v_base + dptr, mask=has[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + p[:, None] * vd
        l_i = l_i * alpha + p
        m_i = m_new

    # Prefix: masked edge tiles around an unmasked middle valid for every row of the tile.
    key_start = tl.min(tl.where(m_ok, lo, 2147483647))
    key_end = tl.max(tl.where(m_ok, hi, 0))
    full_lo = tl.max(tl.where(m_ok, lo, 0))
    full_hi = tl.min(tl.where(m_ok, hi, 2147483647))
    mid_end = full_lo + tl.maximum(full_hi - full_lo, 0) // BLOCK_N * BLOCK_N
    real_row = RealIdx + plan_off
    for start_n in range(key_start, full_lo, BLOCK_N):
        acc, l_i, m_i = _fwd_prefix_tile(acc, l_i, m_i, q, k_base, v_base, real_row, start_n, lo, hi,
                                         tl.minimum(full_lo, start_n + BLOCK_N), stride_kt, offs_d, d_ok,
                                         qk_scale, True, BLOCK_N, DOT_PRECISION)
    for start_n in range(full_lo, mid_end, BLOCK_N):
        acc, l_i, m_i = _fwd_prefix_tile(acc, l_i, m_i, q, k_base, v_base, real_row, start_n, lo, hi,
                                         mid_end, stride_kt, offs_d, d_ok, qk_scale, False, BLOCK_N, DOT_PRECISION)
    for start_n in range(mid_end, key_end, BLOCK_N):
        acc, l_i, m_i = _fwd_prefix_tile(acc, l_i, m_i, q, k_base, v_base, real_row, start_n, lo, hi,
                                         key_end, stride_kt, offs_d, d_ok, qk_scale, True, BLOCK_N, DOT_PRECISION)

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # only padding rows can be empty: each query sees itself
    out = acc / l_safe[:, None]
    tl.store(o_base + row[:, None] * stride_qt + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * T + row, m_i + tl.log2(l_safe), mask=m_ok)


@triton.jit
def _dq_prefix_tile(dq, q, do, lse, delta, k_base, v_base, real_row, start_n, lo, hi, key_end,
                    stride_kt, offs_d, d_ok, qk_scale,
                    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < key_end
    kidx = tl.load(real_row + offs_n, mask=n_ok, other=0).to(tl.int64)
    kt = tl.load(k_base + kidx[None, :] * stride_kt + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    vt = tl.load(v_base + kidx[None, :] * stride_kt + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    p = tl.exp2(_dot(q, kt, DOT_PRECISION) * qk_scale - lse[:, None])
    if MASKED:
        keep = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None]) & n_ok[None, :]
        p = tl.where(keep, p, 0.0)
    dp = _dot(do, vt, DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(kt.dtype), tl.trans(kt), DOT_PRECISION)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, Lse, Delta, RealIdx, PreLo, PreHi, Diag, QOrder,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   plan_stride, T, H, GROUPS, qk_scale, sm_scale,
                   N_DIAG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    head_off = b * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b * stride_kb + (h // GROUPS).to(tl.int64) * stride_kh
    v_base = V + b * stride_kb + (h // GROUPS).to(tl.int64) * stride_kh
    plan_off = b * plan_stride

    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs < T
    row = tl.load(QOrder + plan_off + offs, mask=m_ok, other=0).to(tl.int64)
    lo = tl.load(PreLo + plan_off + row, mask=m_ok, other=0)
    hi = tl.load(PreHi + plan_off + row, mask=m_ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qd_ptr = row[:, None] * stride_qt + offs_d[None, :]
    qd_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + head_off + qd_ptr, mask=qd_ok, other=0.0)
    do = tl.load(DO + head_off + qd_ptr, mask=qd_ok, other=0.0)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * T + row, mask=m_ok, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * T + row, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    qf = q.to(tl.float32)
    dof = do.to(tl.float32)
    for j in range(N_DIAG):
        didx = tl.load(Diag + (plan_off + row) * N_DIAG + j, mask=m_ok, other=-1)
        has = didx >= 0
        dptr = didx.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
        kd = tl.load(k_base + dptr, mask=has[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        vd = tl.load(v_base + dptr, mask=has[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        p = tl.where(has, tl.exp2(tl.sum(qf * kd, 1) * qk_scale - lse), 0.0)
        ds = p * (tl.sum(dof * vd, 1) - delta)
        dq += ds[:, None] * kd

    key_start = tl.min(tl.where(m_ok, lo, 2147483647))
    key_end = tl.max(tl.where(m_ok, hi, 0))
    full_lo = tl.max(tl.where(m_ok, lo, 0))
    full_hi = tl.min(tl.where(m_ok, hi, 2147483647))
    mid_end = full_lo + tl.maximum(full_hi - full_lo, 0) // BLOCK_N * BLOCK_N
    real_row = RealIdx + plan_off
    for start_n in range(key_start, full_lo, BLOCK_N):
        dq = _dq_prefix_tile(dq, q, do, lse, delta, k_base, v_base, real_row, start_n, lo, hi,
                             tl.minimum(full_lo, start_n + BLOCK_N), stride_kt, offs_d, d_ok, qk_scale,
                             True, BLOCK_N, DOT_PRECISION)
    for start_n in range(full_lo, mid_end, BLOCK_N):
        dq = _dq_prefix_tile(dq, q, do, lse, delta, k_base, v_base, real_row, start_n, lo, hi,
                             mid_end, stride_kt, offs_d, d_ok, qk_scale, False, BLOCK_N, DOT_PRECISION)
    for start_n in range(mid_end, key_end, BLOCK_N):
        dq = _dq_prefix_tile(dq, q, do, lse, delta, k_base, v_base, real_row, start_n, lo, hi,
                             key_end, stride_kt, offs_d, d_ok, qk_scale, True, BLOCK_N, DOT_PRECISION)
    tl.store(DQ + head_off + qd_ptr, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_ok)


@triton.jit
def _dkdv_query_tile(dk, dv, k, v, offs_n, Q, DO, Lse, Delta, head_off, lse_off, order_row, pre_lo_row,
                     pre_hi_row, start_m, q_end, stride_qt, offs_d, d_ok, qk_scale,
                     MASKED: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate one tile of (q_order-sorted) queries into a tile of real keys' dk/dv."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_end
    row = tl.load(order_row + offs_m, mask=m_ok, other=0).to(tl.int64)
    qd_ptr = row[:, None] * stride_qt + offs_d[None, :]
    qd_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + head_off + qd_ptr, mask=qd_ok, other=0.0)
    do = tl.load(DO + head_off + qd_ptr, mask=qd_ok, other=0.0)
    lse = tl.load(Lse + lse_off + row, mask=m_ok, other=0.0)
    delta = tl.load(Delta + lse_off + row, mask=m_ok, other=0.0)
    p_t = tl.exp2(_dot(k, tl.trans(q), DOT_PRECISION) * qk_scale - lse[None, :])
    if MASKED:
        lo = tl.load(pre_lo_row + row, mask=m_ok, other=0)
        hi = tl.load(pre_hi_row + row, mask=m_ok, other=0)
        keep = (offs_n[:, None] >= lo[None, :]) & (offs_n[:, None] < hi[None, :]) & m_ok[None, :]
        p_t = tl.where(keep, p_t, 0.0)
    dv += _dot(p_t.to(do.dtype), do, DOT_PRECISION)
    dp_t = _dot(v, tl.trans(do), DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_real_kernel(Q, K, V, DO, DK, DV, Lse, Delta, RealIdx, NReal, PreLo, PreHi, QOrder,
                          KeyQStart, KeyQEnd,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          plan_stride, nreal_stride, T, H, GROUPS, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)  # over B * Hkv
    hkv_count = H // GROUPS
    b = (pid_bh // hkv_count).to(tl.int64)
    hkv = pid_bh % hkv_count
    plan_off = b * plan_stride
    n_real = tl.load(NReal + b * nreal_stride)
    n0 = pid_n * BLOCK_N
    if n0 < n_real:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_real
        kidx = tl.load(RealIdx + plan_off + offs_n, mask=n_ok, other=0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        kv_off = b * stride_kb + hkv.to(tl.int64) * stride_kh
        kd_ptr = kidx[:, None] * stride_kt + offs_d[None, :]
        kd_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off + kd_ptr, mask=kd_ok, other=0.0)
        v = tl.load(V + kv_off + kd_ptr, mask=kd_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

        # Queries seeing any key of the tile: a run of q_order. Inside [a, mid_end) every
        # query sees every key of the tile (prefix ends after the last key, starts before
        # the first), so only the two edges need the mask.
        n_last = tl.minimum(n0 + BLOCK_N, n_real) - 1
        q_start = tl.load(KeyQStart + plan_off + n0)
        q_end = tl.load(KeyQEnd + plan_off + n_last)
        a = tl.minimum(tl.maximum(tl.load(KeyQStart + plan_off + n_last), q_start), q_end)
        full_end = tl.maximum(tl.minimum(tl.load(KeyQEnd + plan_off + n0), q_end), a)
        mid_end = a + (full_end - a) // BLOCK_M * BLOCK_M
        order_row = QOrder + plan_off
        lo_row = PreLo + plan_off
        hi_row = PreHi + plan_off
        for g in range(GROUPS):
            h = hkv * GROUPS + g
            head_off = b * stride_qb + h.to(tl.int64) * stride_qh
            lse_off = (b * H + h) * T
            for start_m in range(q_start, a, BLOCK_M):
                dk, dv = _dkdv_query_tile(dk, dv, k, v, offs_n, Q, DO, Lse, Delta, head_off, lse_off, order_row,
                                          lo_row, hi_row, start_m, a, stride_qt, offs_d, d_ok, qk_scale,
                                          True, BLOCK_M, DOT_PRECISION)
            for start_m in range(a, mid_end, BLOCK_M):
                dk, dv = _dkdv_query_tile(dk, dv, k, v, offs_n, Q, DO, Lse, Delta, head_off, lse_off, order_row,
                                          lo_row, hi_row, start_m, mid_end, stride_qt, offs_d, d_ok, qk_scale,
                                          False, BLOCK_M, DOT_PRECISION)
            for start_m in range(mid_end, q_end, BLOCK_M):
                dk, dv = _dkdv_query_tile(dk, dv, k, v, offs_n, Q, DO, Lse, Delta, head_off, lse_off, order_row,
                                          lo_row, hi_row, start_m, q_end, stride_qt, offs_d, d_ok, qk_scale,
                                          True, BLOCK_M, DOT_PRECISION)
        tl.store(DK + kv_off + kd_ptr, (dk * sm_scale).to(DK.dtype.element_ty), mask=kd_ok)
        tl.store(DV + kv_off + kd_ptr, dv.to(DV.dtype.element_ty), mask=kd_ok)


@triton.jit
def _bwd_dkdv_diag_kernel(Q, K, V, DO, DK, DV, Lse, Delta, RDiag,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          plan_stride, T, H, GROUPS, qk_scale, sm_scale,
                          N_DIAG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)  # over B * Hkv
    hkv_count = H // GROUPS
    b = (pid_bh // hkv_count).to(tl.int64)
    hkv = pid_bh % hkv_count
    plan_off = b * plan_stride
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < T
    # rdiag[n, 0] is n itself for a mask key and -1 for a real token (owned by the other kernel).
    is_mask = tl.load(RDiag + (plan_off + offs_n) * N_DIAG, mask=n_ok, other=-1) >= 0
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_off = b * stride_kb + hkv.to(tl.int64) * stride_kh
    kd_ptr = offs_n.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
    kd_ok = is_mask[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off + kd_ptr, mask=kd_ok, other=0.0).to(tl.float32)
    v = tl.load(V + kv_off + kd_ptr, mask=kd_ok, other=0.0).to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUPS):
        h = hkv * GROUPS + g
        head_off = b * stride_qb + h.to(tl.int64) * stride_qh
        lse_off = (b * H + h) * T
        for t in range(N_DIAG):
            qi = tl.load(RDiag + (plan_off + offs_n) * N_DIAG + t, mask=is_mask, other=-1)
            has = qi >= 0
            qi = qi.to(tl.int64)
            qd_ptr = qi[:, None] * stride_qt + offs_d[None, :]
            q = tl.load(Q + head_off + qd_ptr, mask=has[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            do = tl.load(DO + head_off + qd_ptr, mask=has[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            lse = tl.load(Lse + lse_off + qi, mask=has, other=0.0)
            delta = tl.load(Delta + lse_off + qi, mask=has, other=0.0)
            p = tl.where(has, tl.exp2(tl.sum(q * k, 1) * qk_scale - lse), 0.0)
            ds = p * (tl.sum(do * v, 1) - delta)
            dv += p[:, None] * do
            dk += ds[:, None] * q
    tl.store(DK + kv_off + kd_ptr, (dk * sm_scale).to(DK.dtype.element_ty), mask=kd_ok)
    tl.store(DV + kv_off + kd_ptr, dv.to(DV.dtype.element_ty), mask=kd_ok)


_KEY = ["HEAD_DIM", "N_DIAG"]
_fwd = triton.autotune(_FWD_CONFIGS, key=_KEY)(_fwd_kernel)
_bwd_dq = triton.autotune(_DQ_CONFIGS, key=_KEY)(_bwd_dq_kernel)
_bwd_dkdv_real = triton.autotune(_DKDV_CONFIGS, key=["HEAD_DIM"])(_bwd_dkdv_real_kernel)
_bwd_dkdv_diag = triton.autotune(_DIAG_CONFIGS, key=_KEY)(_bwd_dkdv_diag_kernel)


def _launch(kernel, grid, *args, **kwargs):
    """Autotuned launch, or fixed small tiles under TRITON_INTERPRET (no GPU to time configs)."""
    if _interpreting():
        meta = {name: val for name, val in _INTERPRET_META.items() if name in kernel.fn.arg_names}
        kernel.fn[grid(meta)](*args, **kwargs, **meta)
    else:
        kernel[grid](*args, **kwargs)


def _device_plan(plan: PardPlan, device: torch.device) -> dict:
    """int32 copies of the plan's index tensors on the kernels' device (cached on the plan)."""
    key = ("triton", str(device))
    if key not in plan.cache:
        def i32(x):
            x = x.to(device=device, dtype=torch.int32).contiguous()
            return x if x.numel() else torch.full((1,), -1, dtype=torch.int32, device=device)

        plan.cache[key] = {
            name: i32(getattr(plan, name))
            for name in ("real_idx", "n_real", "pre_lo", "pre_hi", "diag_idx", "q_order",
                         "key_q_start", "key_q_end", "rdiag_idx")
        }
    return plan.cache[key]


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"  # exact fp32 (the 1e-4 contract), and portable: MI250 has no TF32
    if dtype == torch.bfloat16 and _interpreting():
        return "upcast"
    return "default"  # 16-bit inputs: native fp16/bf16 MMA with fp32 accumulation


def _common(q, k, plan):
    bsz, hq, seq, dim = q.shape
    return dict(
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kt=k.stride(2),
        plan_stride=0 if plan.rows == 1 else seq, T=seq, H=hq, GROUPS=hq // k.shape[1],
        HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
        DOT_PRECISION=_dot_precision(q.dtype),
    )


class _PardAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        bsz, hq, seq, _ = q.shape
        idx = _device_plan(plan, q.device)
        out = torch.empty_like(q)
        lse = torch.empty((bsz, hq, seq), dtype=torch.float32, device=q.device)
        common = _common(q, k, plan)
        _launch(_fwd, lambda m: (triton.cdiv(seq, m["BLOCK_M"]), bsz * hq),
                q, k, v, out, lse, idx["real_idx"], idx["pre_lo"], idx["pre_hi"], idx["diag_idx"], idx["q_order"],
                qk_scale=scale * LOG2E, N_DIAG=plan.n_diag, **common)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        dout = dout.contiguous()
        bsz, hq, seq, _ = q.shape
        hkv = k.shape[1]
        idx = _device_plan(plan, q.device)
        delta = (dout.float() * out.float()).sum(-1)  # [B, Hq, T], rowsum(dO * O)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = _common(q, k, plan)
        scales = dict(qk_scale=scale * LOG2E, sm_scale=scale)
        _launch(_bwd_dq, lambda m: (triton.cdiv(seq, m["BLOCK_M"]), bsz * hq),
                q, k, v, dout, dq, lse, delta, idx["real_idx"], idx["pre_lo"], idx["pre_hi"], idx["diag_idx"],
                idx["q_order"], N_DIAG=plan.n_diag, **scales, **common)
        real_common = {name: val for name, val in common.items() if name != "DOT_PRECISION"}
        _launch(_bwd_dkdv_real, lambda m: (triton.cdiv(seq, m["BLOCK_N"]), bsz * hkv),
                q, k, v, dout, dk, dv, lse, delta, idx["real_idx"], idx["n_real"], idx["pre_lo"], idx["pre_hi"],
                idx["q_order"], idx["key_q_start"], idx["key_q_end"],
                nreal_stride=0 if plan.rows == 1 else 1, DOT_PRECISION=common["DOT_PRECISION"],
                **scales, **real_common)
        if plan.n_diag > 0:
            diag_common = {name: val for name, val in common.items() if name != "DOT_PRECISION"}
            _launch(_bwd_dkdv_diag, lambda m: (triton.cdiv(seq, m["BLOCK_N"]), bsz * hkv),
                    q, k, v, dout, dk, dv, lse, delta, idx["rdiag_idx"], N_DIAG=plan.n_diag,
                    **scales, **diag_common)
        return dq, dk, dv, None, None


def pard_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PardPlan, scale: float):
    """Exact PARD attention with the Triton kernels (inputs already validated by the caller)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _PardAttentionTriton.apply(q, k, v, plan, scale)
