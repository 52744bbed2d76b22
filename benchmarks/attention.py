"""Time and peak memory of PARD attention (forward + backward) on this machine's CPU.

Methods:
    dense       the dense-mask reference (kernels/reference.py): explicit [B, H, T, T]
                scores, the way a mask-based trainer computes them. The goal's baseline.
    sdpa-dense  PyTorch's fused CPU SDPA fed the same dense mask (as an additive float
                mask): a stronger dense baseline that never stores the scores.
    structured  pard_attention(backend="torch"), the CPU path of kernels/.

Each (L, K, drop, method) cell runs in two fresh subprocesses, so numbers do not mix:

* memory: the child warms the method up on a tiny problem (code pages, thread pools and
  allocator arenas are then resident), records its RSS, runs one full-size forward +
  backward and reports ``ru_maxrss - RSS_before``. ``ru_maxrss`` is the kernel's own
  high-water mark of resident memory, so it sees every torch CPU allocation (tracemalloc
  does not). The child runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then maps every
  block >= 64 KiB separately and unmaps it on free, so RSS follows live tensors. With the
  default dynamic threshold, freed 1-32 MiB blocks stay in the heap and inflated the
  dense path's peak by up to 3x in a first run of this script.
* time: default allocator, the median of ``--repeats`` runs after one warm-up run. The
  dense child saves its output and gradients; the structured child compares against
  them (max abs error over out, dq, dk, dv; fp32 against fp32).

    .venv/bin/python benchmarks/attention.py --out benchmarks/attention_table.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

METHODS = ("dense", "sdpa-dense", "structured")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _make_problem(length, k, cod, heads, kv_heads, dim, seed=0):
    import torch

    from pard_vllm.kernels import pard_layout

    gen = torch.Generator().manual_seed(seed)
    block_ids, pos_ids = pard_layout(length, k, 0.7 if cod else None, 0.2, generator=gen)
    t = block_ids.numel()
    q = torch.randn(1, heads, t, dim, generator=gen)
    kk = torch.randn(1, kv_heads, t, dim, generator=gen)
    v = torch.randn(1, kv_heads, t, dim, generator=gen)
    dout = torch.randn(1, heads, t, dim, generator=gen)
    return q, kk, v, dout, block_ids, pos_ids


def _step_fn(method, q, k, v, block_ids, pos_ids):
    """A closure running one forward + backward; returns (out, dq, dk, dv)."""
    import torch
    import torch.nn.functional as F

    from pard_vllm.kernels import build_plan, dense_pard_attention, pard_attention, pard_mask

    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    if method == "structured":
        plan = build_plan(block_ids, pos_ids)  # built once per layout, reused by every layer

        def forward():
            return pard_attention(q, k, v, None, None, backend="torch", plan=plan)
    elif method == "dense":
        def forward():
            return dense_pard_attention(q, k, v, block_ids, pos_ids)
    else:
        def forward():
            allowed = pard_mask(block_ids, pos_ids, block_ids, pos_ids)
            bias = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)

    def step(dout):
        q.grad = k.grad = v.grad = None
        out = forward()
        out.backward(dout)
        return out.detach(), q.grad, k.grad, v.grad

    return step


def run_cell(args) -> dict:
    """Child process: measure one method on one problem and print a JSON line."""
    import torch

    torch.set_num_threads(args.threads)

    small = _make_problem(16, args.k, args.cod, args.heads, args.kv_heads, args.dim)
    _step_fn(args.method, *small[:3], *small[4:])(small[3])  # warm-up on a tiny problem
    q, k, v, dout, block_ids, pos_ids = _make_problem(
        args.length, args.k, args.cod, args.heads, args.kv_heads, args.dim
    )
    step = _step_fn(args.method, q, k, v, block_ids, pos_ids)
    record = {"tokens": q.shape[2]}
    if args.measure == "memory":
        rss_before = _rss_mb()
        step(dout)
        record["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
        print("CELL " + json.dumps(record), flush=True)
        return record
    times = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        result = step(dout)
        times.append(time.perf_counter() - t0)
    record["time_s"] = statistics.median(times[1:])
    if args.method == "dense" and args.save:
        torch.save(result, args.save)
    if args.method == "structured" and args.save and os.path.exists(args.save):
        ref = torch.load(args.save)
        record["max_err"] = max(float((a - b).abs().max()) for a, b in zip(result, ref))
    print("CELL " + json.dumps(record), flush=True)
    return record


def _spawn(method, length, k, cod, args, save):
    record = {}
    for measure in ("time", "memory"):
        cmd = [sys.executable, os.path.abspath(__file__), "--cell", method, "--measure", measure,
               "--length", str(length), "--k", str(k), "--heads", str(args.heads), "--kv-heads",
               str(args.kv_heads), "--dim", str(args.dim), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--save", save] + (["--cod"] if cod else [])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        if measure == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("CELL ")]
        if not lines:
            raise RuntimeError(f"benchmark cell failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        record.update(json.loads(lines[-1][5:]))
    return record


def _dense_estimate_gb(tokens, heads):
    # Measured: the dense path peaks at ~3 score-sized fp32 tensors during backward.
    return 3 * heads * tokens * tokens * 4 / 2**30


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads per cell; 1 keeps timings stable on a shared 2-core box")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dense-max-gb", type=float, default=10.0,
                        help="skip dense cells whose estimated peak exceeds this (shared machines)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    # Internal: run one cell in this process.
    parser.add_argument("--cell", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cod", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        args.method = args.cell
        run_cell(args)
        return

    import torch

    header = (
        "| L | K | COD | T | dense s | dense MB | sdpa-dense s | sdpa-dense MB | structured s | structured MB "
        "| speedup vs dense | memory vs dense | speedup vs sdpa-dense | max abs err |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for length in args.lengths:
            for k in args.ks:
                for cod in (False, True):
                    save = os.path.join(tmp, f"dense_{length}_{k}_{int(cod)}.pt")
                    cells = {}
                    for method in args.methods:
                        tokens = length * k if not cod else None
                        if method != "structured" and tokens and _dense_estimate_gb(tokens, args.heads) > args.dense_max_gb:
                            continue
                        cells[method] = _spawn(method, length, k, cod, args, save)
                    tokens = next(iter(cells.values()))["tokens"] if cells else "?"
                    lines.append(_row(length, k, cod, tokens, cells))
                    print(lines[-1], flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    footer = (
        f"\nB=1, Hq={args.heads}, Hkv={args.kv_heads}, D={args.dim}, fp32, forward+backward, median of "
        f"{args.repeats}; torch {torch.__version__}, {args.threads} thread(s); {stamp}.\n"
        f"Command: {' '.join([os.path.relpath(sys.executable)] + sys.argv)}\n"
    )
    print(footer)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n" + footer)


def _row(length, k, cod, tokens, cells):
    def fmt(method, key, spec):
        return format(cells[method][key], spec) if method in cells else "skipped"

    def ratio(num_method, den_method, key):
        if num_method in cells and den_method in cells:
            return f"{cells[num_method][key] / cells[den_method][key]:.1f}x"
        return "-"

    err = cells.get("structured", {}).get("max_err")
    mem_ratio = (f"1/{cells['dense']['peak_mb'] / cells['structured']['peak_mb']:.0f}"
                 if "dense" in cells and "structured" in cells else "-")
    return (
        f"| {length} | {k} | {'r=0.7' if cod else 'no'} | {tokens} | {fmt('dense', 'time_s', '.3f')} "
        f"| {fmt('dense', 'peak_mb', '.0f')} | {fmt('sdpa-dense', 'time_s', '.3f')} "
        f"| {fmt('sdpa-dense', 'peak_mb', '.0f')} | {fmt('structured', 'time_s', '.3f')} "
        f"| {fmt('structured', 'peak_mb', '.0f')} | {ratio('dense', 'structured', 'time_s')} "
        f"| {mem_ratio} | {ratio('sdpa-dense', 'structured', 'time_s')} "
        f"| {'-' if err is None else format(err, '.1e')} |"
    )


if __name__ == "__main__":
    main()
