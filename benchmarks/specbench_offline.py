"""Offline mode of spec_bench: one ``vllm.LLM`` per method, reused for every cell.

Batch size b means b requests in flight, realised as *waves*: the prompts are cut
into groups of b, each group is submitted in one ``llm.chat`` call (the engine's
``max_num_seqs`` is the largest b, so a whole wave is scheduled together) and the
next wave starts when the slowest request of the current one has finished. Why
waves rather than a continuously refilled queue: every method then sees exactly
the same batches of the same prompts, so tokens/s and acceptance compare like for
like, and the b=1 cells are pure latency runs. The cost of the tail of each wave
is part of the measurement (the online mode measures a refilled queue instead).

Why one engine per method, shut down before the next: on a 2-core machine two
engine-core processes would fight for the cores and both numbers would be wrong.
"""

from __future__ import annotations

import time

from pard_vllm.server import kv_cache_kwargs, shutdown_engine
from specbench_common import PER_POS, SPEC_COUNTERS, spec_delta

WARMUP_PROMPT = "Say hello in one short sentence."


def counters(llm) -> dict:
    """Current spec-decode counters of an engine (summed over label sets)."""
    out: dict = {}
    for m in llm.get_metrics():
        if m.name in SPEC_COUNTERS:
            out[m.name] = out.get(m.name, 0.0) + float(m.value)
        elif m.name == PER_POS:
            vals = [float(v) for v in m.values]
            prev = out.get(PER_POS, [0.0] * len(vals))
            out[PER_POS] = [a + b for a, b in zip(prev, vals)]
    return out


def _skip_llvmlite_in_kernel_rebind() -> None:
    """Lets an in-process engine start after one with vLLM's ``ngram`` method.

    vLLM 0.32 starts every worker by scanning each loaded module's attributes
    for Triton kernels (``triton_utils.dispatcher._rebind_kernels``, reading
    ``vars(value)`` of each); ``llvmlite.binding.ffi.lib`` forwards attribute
    reads to a C function, so once the ngram proposer has imported numba, the
    next engine in the process fails with "'_lib_fn_wrapper' object has no
    attribute 'get'". The scan now runs with that module (which holds no
    Triton kernel) out of ``sys.modules``. Benchmarks only: pard-vllm itself
    does not import numba."""
    import sys

    from vllm.triton_utils import dispatcher

    original = dispatcher._rebind_kernels
    if getattr(original, "__skips_llvmlite__", False):
        return

    def rebind(overrides):
        hidden = sys.modules.pop("llvmlite.binding.ffi", None)
        try:
            return original(overrides)
        finally:
            if hidden is not None:
                sys.modules["llvmlite.binding.ffi"] = hidden

    rebind.__skips_llvmlite__ = True
    dispatcher._rebind_kernels = rebind


def make_engine(target: str, spec: dict | None, args):
    from vllm import LLM

    _skip_llvmlite_in_kernel_rebind()
    return LLM(target, speculative_config=spec, disable_log_stats=False, dtype=args.dtype,
               enforce_eager=not args.compile, **kv_cache_kwargs(), max_model_len=args.max_model_len, max_num_seqs=max(args.batch_sizes), seed=0)


free_engine = shutdown_engine


def _params(temperature: float, max_tokens: int, n: int, offset: int):
    """Per-request sampling params. At temperature > 0 each request gets its own
    seed (the prompt's index), so reruns of one method draw the same samples."""
    from vllm import SamplingParams

    if temperature == 0:
        return [SamplingParams(temperature=0, max_tokens=max_tokens)] * n
    return [SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_tokens,
                           seed=1000 + offset + i) for i in range(n)]


def run_cell(llm, prompts: list[str], batch: int, temperature: float, max_tokens: int, bar):
    """Run every prompt in waves of ``batch``; returns (token id lists, seconds, spec stats)."""
    before = counters(llm)
    ids: list[list[int]] = []
    elapsed = 0.0
    for start in range(0, len(prompts), batch):
        wave = prompts[start:start + batch]
        convs = [[{"role": "user", "content": p}] for p in wave]
        params = _params(temperature, max_tokens, len(wave), start)
        t0 = time.perf_counter()
        outs = llm.chat(convs, params, use_tqdm=False)
        elapsed += time.perf_counter() - t0
        ids += [list(o.outputs[0].token_ids) for o in outs]
        bar.update(len(wave))
    return ids, elapsed, spec_delta(before, counters(llm))


def run_method(method: str, spec: dict | None, data: dict[str, list[str]], args, bar) -> list[dict]:
    """All cells of one method; records carry raw token ids under ``_ids`` (dropped
    before saving) so the caller can compare them with ``ar``."""
    t0 = time.perf_counter()
    llm = make_engine(args.target, spec, args)
    startup = time.perf_counter() - t0
    records = []
    try:
        # Warm-up: first requests pay for lazy initialisation (allocator, thread
        # pools, one-off kernel choices); keep that out of every cell.
        warm = [[{"role": "user", "content": WARMUP_PROMPT}]] * max(args.batch_sizes)
        llm.chat(warm, _params(0, 16, len(warm), 0), use_tqdm=False)
        for ds, prompts in data.items():
            for temperature in args.temperatures:
                for batch in args.batch_sizes:
                    bar.set_postfix_str(f"{method} {ds} b={batch} T={temperature}")
                    ids, secs, stats = run_cell(llm, prompts, batch, temperature,
                                                args.max_tokens, bar)
                    ntok = sum(len(x) for x in ids)
                    records.append({
                        "method": method, "dataset": ds, "batch_size": batch,
                        "temperature": temperature, "num_prompts": len(prompts),
                        "output_tokens": ntok, "elapsed_s": secs,
                        "tokens_per_s": ntok / secs if secs else None,
                        "engine_startup_s": startup, **stats, "_ids": ids,
                    })
    finally:
        free_engine(llm)
    return records
