"""PARD parallel-mask attention (importable as ``pard_vllm.kernels``).

``pard_attention`` computes softmax attention over a packed PARD training sequence
(real tokens followed by mask blocks, optionally conditionally dropped) without ever
building the ``(T, T)`` mask: every query needs only a causal prefix of the real tokens
plus at most K-1 single "diagonal" mask keys. See ``reference.py`` for the exact rule
and a worked example, ``layout.py`` to build packed layouts, ``plan.py`` for the index
pre-pass shared by the backends.

Backends:
    "triton": Triton forward/backward kernels (CUDA or ROCm tensors; ``pard_attention_triton``;
              CPU tensors only under TRITON_INTERPRET=1, which the tests use).
    "torch":  the structured CPU implementation on PyTorch's fused CPU flash kernel
              (``pard_attention_cpu``); it also accepts GPU tensors by round-tripping
              through host memory, which is only meant for debugging.
    "auto":   "triton" for GPU tensors, "torch" otherwise.
"""

from __future__ import annotations

import math
import os

import torch

from .layout import cod_block_sizes, pack_documents, pard_layout
from .plan import PardPlan, build_plan
from .reference import dense_pard_attention, pard_mask

__all__ = [
    "pard_attention",
    "pard_layout",
    "pack_documents",
    "cod_block_sizes",
    "build_plan",
    "PardPlan",
    "pard_mask",
    "dense_pard_attention",
]

_BACKENDS = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"pard_attention: q, k, v must be 4-D [B, H, T, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"pard_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    bq, hq, tq, dq = q.shape
    bk, hkv, tk, dk = k.shape
    if (bq, tq, dq) != (bk, tk, dk):
        raise ValueError(
            f"pard_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, length and head dim"
        )
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"pard_attention: Hq={hq} must be a multiple of Hkv={hkv} (GQA); repeat or regroup the kv heads"
        )
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"pard_attention: q, k, v must share one dtype among float32/float16/bfloat16, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError("pard_attention: q, k, v must be on the same device")


def pard_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_ids: torch.Tensor | None,
    pos_ids: torch.Tensor | None,
    scale: float | None = None,
    backend: str = "auto",
    *,
    doc_ids: torch.Tensor | None = None,
    plan: PardPlan | None = None,
) -> torch.Tensor:
    """Exact, differentiable attention under the PARD parallel mask.

    Args:
        q: ``[B, Hq, T, D]`` queries; k, v: ``[B, Hkv, T, D]`` with Hq a multiple of Hkv.
        block_ids, pos_ids: integer ``[T]`` (shared by the batch) or ``[B, T]``: block id
            (0 = real token) and original position of every packed token. Any order and
            any conditional-drop subset are accepted if each kept mask (b, p), p >= 1,
            keeps its predecessor (b-1, p-1).
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: "auto", "triton" or "torch" (see the module docstring).
        doc_ids: optional ``[T]``/``[B, T]`` document ids for several packed documents.
        plan: a ``build_plan(block_ids, pos_ids, doc_ids)`` result to reuse across layers
            (then block_ids/pos_ids/doc_ids are ignored and may be None).

    Returns:
        ``[B, Hq, T, D]`` in q's dtype.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"pard_attention: backend must be one of {_BACKENDS}, got {backend!r}")
    _check_inputs(q, k, v)
    if plan is None:
        if block_ids is None or pos_ids is None:
            raise ValueError("pard_attention: pass block_ids and pos_ids (or a prebuilt plan=)")
        plan = build_plan(block_ids.to(q.device), pos_ids.to(q.device),
                          None if doc_ids is None else doc_ids.to(q.device))
    if plan.seq_len != q.shape[2]:
        raise ValueError(
            f"pard_attention: the layout has T={plan.seq_len} tokens but q has T={q.shape[2]}; "
            "pass block_ids/pos_ids of the packed sequence"
        )
    if plan.rows not in (1, q.shape[0]):
        raise ValueError(
            f"pard_attention: block_ids has {plan.rows} rows but the batch is {q.shape[0]}; pass [T] or [B, T]"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])

    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton":
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ValueError(
                "pard_attention: backend='triton' needs CUDA/ROCm tensors; use backend='torch' on CPU"
            )
        from .pard_attention_triton import pard_attention_triton

        return pard_attention_triton(q, k, v, plan, scale)

    from .pard_attention_cpu import pard_attention_cpu

    if q.device.type != "cpu":
        cpu_plan = build_plan_on_cpu(plan)
        out = pard_attention_cpu(q.cpu(), k.cpu(), v.cpu(), cpu_plan, scale)
        return out.to(q.device)
    return pard_attention_cpu(q, k, v, plan, scale)


def build_plan_on_cpu(plan: PardPlan) -> PardPlan:
    """A host copy of a device plan (for the "torch" backend on GPU tensors)."""
    if "cpu_copy" not in plan.cache:
        fields = {name: getattr(plan, name) for name in PardPlan.__dataclass_fields__ if name != "cache"}
        plan.cache["cpu_copy"] = PardPlan(
            **{n: (x.cpu() if isinstance(x, torch.Tensor) else x) for n, x in fields.items()}
        )
    return plan.cache["cpu_copy"]
