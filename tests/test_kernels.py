"""PARD attention kernels against the dense-mask reference (issue 4).

* the mask semantics and the worked example of kernels/reference.py (run as doctests);
* layouts with and without conditional drop, and the plan's validation errors;
* the CPU path: outputs and dq/dk/dv against a float64 dense reference, for random COD
  layouts, GQA, odd lengths, K = 1..8, several packed documents, shuffled token orders,
  per-row layouts, three dtypes, and a realistic L = 256, K = 8 shape;
* the Triton kernels under the Triton interpreter, in a child process: TRITON_INTERPRET
  is read when Triton decorates kernels and is inherited by subprocesses (vLLM engines
  started by other tests), so it must never be set in this process;
* the Triton kernels compiled ahead of time for NVIDIA (sm_90) and AMD (gfx90a/gfx942)
  targets, which needs no GPU and catches backend-specific rejections.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from pard_vllm.kernels import (
    build_plan,
    cod_block_sizes,
    dense_pard_attention,
    pack_documents,
    pard_attention,
    pard_layout,
    pard_mask,
)
from pard_vllm.kernels import reference as reference_module

# Relative Frobenius error allowed per dtype (fp32 also has an absolute 1e-4 bound).
REL_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}


@dataclass(frozen=True)
class Case:
    name: str
    length: int
    k: int
    cod: bool = False
    batch: int = 1
    heads: int = 2
    kv_heads: int = 1
    dim: int = 16
    dtype: str = "float32"
    docs: tuple = ()  # extra documents' lengths, packed after the first one
    shuffle: bool = False  # random order of the packed tokens
    per_row: bool = False  # [B, T] ids: row 1 is a shuffled copy of row 0
    seed: int = 0


def make_inputs(case: Case):
    gen = torch.Generator().manual_seed(case.seed)
    cod_r = 0.7 if case.cod else None
    layouts = [pard_layout(n, case.k, cod_r, generator=gen) for n in (case.length, *case.docs)]
    block_ids, pos_ids, doc_ids = pack_documents(layouts)
    if case.shuffle:
        perm = torch.randperm(block_ids.numel(), generator=gen)
        block_ids, pos_ids, doc_ids = block_ids[perm], pos_ids[perm], doc_ids[perm]
    if case.per_row:
        perm = torch.randperm(block_ids.numel(), generator=gen)
        block_ids = torch.stack([block_ids, block_ids[perm]])
        pos_ids = torch.stack([pos_ids, pos_ids[perm]])
        doc_ids = torch.stack([doc_ids, doc_ids[perm]])
    t = block_ids.shape[-1]
    dtype = getattr(torch, case.dtype)
    q, k, v = (torch.randn(case.batch, h, t, case.dim, generator=gen).to(dtype)
               for h in (case.heads, case.kv_heads, case.kv_heads))
    dout = torch.randn(case.batch, case.heads, t, case.dim, generator=gen).to(dtype)
    return q, k, v, dout, block_ids, pos_ids, (doc_ids if case.docs else None)


def measure_errors(case: Case, backend: str) -> dict:
    """Max abs and relative Frobenius errors of out, dq, dk, dv against float64 dense."""
    q, k, v, dout, block_ids, pos_ids, doc_ids = make_inputs(case)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = pard_attention(*leaves, block_ids, pos_ids, backend=backend, doc_ids=doc_ids)
    got = [out, *torch.autograd.grad(out, leaves, dout)]
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out = dense_pard_attention(*ref_leaves, block_ids, pos_ids, doc_ids=doc_ids)
    want = [ref_out, *torch.autograd.grad(ref_out, ref_leaves, dout.double())]
    errors = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == q.dtype and a.shape == b.shape, name
        diff = a.detach().double() - b.detach()
        errors[name] = {"abs": float(diff.abs().max()), "rel": float(diff.norm() / b.detach().norm().clamp_min(1e-30))}
    return errors


def assert_close(errors: dict, dtype: str):
    for name, err in errors.items():
        assert err["rel"] <= REL_TOL[dtype], f"{name}: {err}"
        if dtype == "float32":
            assert err["abs"] <= 1e-4, f"{name}: {err}"


# ---------------------------------------------------------------------------- semantics


def test_reference_docstring_worked_example():
    result = doctest.testmod(reference_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 6 and result.failed == 0


def test_worked_example_views():
    """The bullet points of the reference docstring, key by key (L = 3, K = 3)."""
    b = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    p = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    mask = pard_mask(b, p, b, p)
    seen = {i: mask[i].nonzero().flatten().tolist() for i in range(9)}
    assert seen[2] == [0, 1, 2]
    assert seen[4] == [0, 4]
    assert seen[8] == [0, 4, 8]
    assert seen[7] == [3, 7]
    assert all(mask[i, i] for i in range(9))


def test_mask_matches_inference_view():
    """A block-b query at p sees what a draft sees with context x[0..p-b] and b masks."""
    block_ids, pos_ids = pard_layout(6, 4)
    mask = pard_mask(block_ids, pos_ids, block_ids, pos_ids)
    for i, (b, p) in enumerate(zip(block_ids.tolist(), pos_ids.tolist())):
        expected = {(0, x) for x in range(p - b + 1)} | {(j, p - b + j) for j in range(1, b + 1) if p - b + j >= 0}
        got = {(block_ids[j].item(), pos_ids[j].item()) for j in mask[i].nonzero().flatten().tolist()}
        assert got == expected, (b, p)


def test_documents_do_not_attend_each_other():
    block_ids, pos_ids, doc_ids = pack_documents([pard_layout(3, 2), pard_layout(4, 2)])
    mask = pard_mask(block_ids, pos_ids, block_ids, pos_ids, doc_ids, doc_ids)
    assert not (mask & (doc_ids[:, None] != doc_ids[None, :])).any()


# ------------------------------------------------------------------------------ layouts


def test_layout_without_drop():
    block_ids, pos_ids = pard_layout(5, 3)
    assert block_ids.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert pos_ids.tolist() == list(range(5)) * 3


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_layout_with_drop(k):
    length = 1000
    gen = torch.Generator().manual_seed(k)
    block_ids, pos_ids = pard_layout(length, k, cod_r=0.7, cod_min=0.2, generator=gen)
    counts = torch.bincount(block_ids, minlength=k).tolist()
    assert counts == cod_block_sizes(length, k, 0.7, 0.2)
    assert counts[0] == length
    build_plan(block_ids, pos_ids)  # validates the COD invariant
    if k == 8:
        assert abs(block_ids.numel() / length - 3.37) < 0.01
    again = pard_layout(length, k, 0.7, 0.2, generator=torch.Generator().manual_seed(k))
    assert torch.equal(again[1], pos_ids)


# ------------------------------------------------------------------------ input errors


def _qkv(t, hq=2, hkv=1, d=8):
    return torch.randn(1, hq, t, d), torch.randn(1, hkv, t, d), torch.randn(1, hkv, t, d)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: (*_qkv(6, hq=3, hkv=2), *pard_layout(3, 2)), "multiple of Hkv"),
        (lambda: (*_qkv(7), *pard_layout(3, 2)), "T=6"),
        (lambda: (torch.randn(1, 2, 6, 8), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), *pard_layout(3, 2)),
         "head dim"),
        (lambda: (*_qkv(3), torch.tensor([0, 0, 2]), torch.tensor([0, 1, 2])), "COD invariant"),
        (lambda: (*_qkv(3), torch.tensor([0, 0, 0]), torch.tensor([0, 1, 1])), "repeats"),
        (lambda: (*_qkv(3), torch.tensor([0, -1, 0]), torch.tensor([0, 1, 2])), ">= 0"),
        (lambda: (*_qkv(3), torch.tensor([0.0, 0, 0]), torch.tensor([0, 1, 2])), "integer"),
        (lambda: (*_qkv(3), torch.tensor([0, 0, 0]), torch.tensor([0, 1])), "same shape"),
        (lambda: (*_qkv(6), torch.zeros(3, 6, dtype=torch.long), torch.arange(6).repeat(3, 1)), "rows"),
    ],
)
def test_bad_inputs_raise_one_line_value_error(make, fragment):
    q, k, v, block_ids, pos_ids = make()
    with pytest.raises(ValueError) as info:
        pard_attention(q, k, v, block_ids, pos_ids)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_bad_backend_and_device():
    q, k, v = _qkv(6)
    block_ids, pos_ids = pard_layout(3, 2)
    with pytest.raises(ValueError, match="backend"):
        pard_attention(q, k, v, block_ids, pos_ids, backend="cuda")
    with pytest.raises(ValueError, match="CUDA/ROCm"):
        pard_attention(q, k, v, block_ids, pos_ids, backend="triton")


# ----------------------------------------------------------------------- the CPU path

CPU_CASES = [
    *(Case(f"k{k}-{'cod' if cod else 'full'}", length=37, k=k, cod=cod, seed=k)
      for k in range(1, 9) for cod in (False, True)),
    Case("gqa-odd", length=61, k=5, cod=True, batch=2, heads=6, kv_heads=2, dim=24),
    Case("mha", length=29, k=3, heads=3, kv_heads=3, dim=32),
    Case("docs-shuffled", length=23, k=4, cod=True, docs=(9, 1, 17), shuffle=True, heads=4, kv_heads=2),
    Case("per-row", length=19, k=6, cod=True, batch=2, docs=(7,), per_row=True),
    Case("fp16", length=40, k=8, cod=True, dtype="float16", dim=32),
    Case("bf16", length=40, k=8, cod=True, dtype="bfloat16", dim=32, heads=4, kv_heads=2),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.name)
def test_cpu_path_matches_dense(case):
    assert_close(measure_errors(case, backend="torch"), case.dtype)


@pytest.mark.parametrize("cod", [False, True], ids=["full", "cod"])
def test_cpu_path_realistic_shape(cod):
    case = Case("realistic", length=256, k=8, cod=cod, heads=4, kv_heads=2, dim=64, seed=3)
    assert_close(measure_errors(case, backend="torch"), "float32")


def test_plan_reuse_across_layers():
    q, k, v, _, block_ids, pos_ids, _ = make_inputs(Case("reuse", length=33, k=4, cod=True))
    plan = build_plan(block_ids, pos_ids)
    first = pard_attention(q, k, v, None, None, plan=plan)
    second = pard_attention(q * 0.5, k, v, None, None, plan=plan)
    assert torch.allclose(first, pard_attention(q, k, v, block_ids, pos_ids), atol=1e-6)
    assert torch.allclose(second, dense_pard_attention(q * 0.5, k, v, block_ids, pos_ids), atol=1e-5)


# ----------------------------------------------------------- Triton, interpreted (child)

TRITON_CASES = [
    Case("k1", length=21, k=1),
    Case("k2-full", length=19, k=2),
    Case("k3-cod", length=33, k=3, cod=True),
    Case("k5-full-gqa", length=13, k=5, heads=4, kv_heads=2),
    Case("k8-full", length=20, k=8),
    Case("k8-cod-odd-dim", length=45, k=8, cod=True, dim=24),
    Case("docs-shuffled", length=11, k=4, cod=True, docs=(6, 9), shuffle=True, batch=2, heads=4, kv_heads=2),
    Case("per-row", length=9, k=3, docs=(5,), per_row=True, batch=2),
    Case("fp16", length=23, k=6, cod=True, dtype="float16", dim=32),
    Case("bf16", length=23, k=6, cod=True, dtype="bfloat16", dim=32, heads=4, kv_heads=2),
]


def _run_triton_child() -> None:
    """Entry point of the interpreter child: one JSON line of errors per case name."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {case.name: measure_errors(case, backend="triton") for case in TRITON_CASES}
    print("RESULTS " + json.dumps(results), flush=True)


@pytest.fixture(scope="module")
def triton_interpreted_errors():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--triton-interpreter-child"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.name)
def test_triton_interpreted_matches_dense(case, triton_interpreted_errors):
    assert_close(triton_interpreted_errors[case.name], case.dtype)


def test_interpreter_flag_stays_in_the_child(triton_interpreted_errors):
    assert "TRITON_INTERPRET" not in os.environ


# ------------------------------------------------------ Triton, compiled for GPU targets


def _signature(fn, dtype, constexprs):
    ints = {"T", "H", "GROUPS"}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"):
            sig[name] = "*" + dtype
        elif name in ("Lse", "Delta"):
            sig[name] = "*fp32"
        elif name[0].isupper() and name not in ints:
            sig[name] = "*i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


@pytest.mark.parametrize(
    "backend, arch, warp, dtype",
    [("cuda", 90, 32, "bf16"), ("hip", "gfx90a", 64, "fp16"), ("hip", "gfx942", 64, "fp32")],
)
def test_triton_kernels_compile_for_gpu_targets(backend, arch, warp, dtype):
    """Ahead-of-time compile (no GPU needed) of every kernel at its smallest autotune tile,
    which must fit AMD's 64 KiB LDS so the autotuner always has a config to pick."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pard_vllm.kernels import pard_attention_triton as kernels

    common = dict(HEAD_DIM=128, BLOCK_D=128)
    precision = "ieee" if dtype == "fp32" else "default"
    jobs = [
        (kernels._fwd_kernel, dict(common, N_DIAG=7, DOT_PRECISION=precision, BLOCK_M=64, BLOCK_N=32)),
        (kernels._bwd_dq_kernel, dict(common, N_DIAG=7, DOT_PRECISION=precision, BLOCK_M=32, BLOCK_N=32)),
        (kernels._bwd_dkdv_real_kernel, dict(common, DOT_PRECISION=precision, BLOCK_N=32, BLOCK_M=32)),
        (kernels._bwd_dkdv_diag_kernel, dict(common, N_DIAG=7, BLOCK_N=32)),
    ]
    for fn, constexprs in jobs:
        compiled = triton.compile(ASTSource(fn, _signature(fn, dtype, constexprs), constexprs),
                                  target=GPUTarget(backend, arch, warp), options={"num_warps": 4, "num_stages": 1})
        binary = "cubin" if backend == "cuda" else "hsaco"
        assert compiled.asm.get(binary), fn.__name__
        assert compiled.metadata.shared <= 64 * 1024, (fn.__name__, compiled.metadata.shared)


if __name__ == "__main__" and sys.argv[1:] == ["--triton-interpreter-child"]:
    _run_triton_child()
