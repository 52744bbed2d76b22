"""Online mode of spec_bench: a real ``vllm serve`` (with the plugin) per method,
driven over HTTP on 127.0.0.1 by an async OpenAI client.

Concurrency c means at most c requests in flight (an asyncio semaphore): as soon
as one finishes the next starts, which is how a server is loaded in practice, in
contrast to the offline mode's waves. Every request streams, so we can time the
first content chunk (TTFT) and the rest (TPOT = time after the first token /
(tokens - 1)). With speculation a chunk may carry several tokens; the token count
comes from the final usage chunk, not from counting chunks.

Bounded by design: a fixed number of requests per level (``--requests``, default
2 x c, at least 4), a per-request timeout, loopback only, and the server is shut
down (process group) before the next method starts.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path

from specbench_common import PER_POS, SPEC_COUNTERS, method_spec, percentile, spec_delta, unsupported_reason

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def server_counters(server) -> dict:
    """/metrics -> the same counter dict the offline mode builds."""
    out: dict = {}
    per_pos: dict[int, float] = {}
    for key, value in server.metrics().items():
        name = key.split("{")[0].removesuffix("_total")
        if name in SPEC_COUNTERS:
            out[name] = out.get(name, 0.0) + value
        elif name == PER_POS:
            m = re.search(r'position="(\d+)"', key)
            if m:
                per_pos[int(m.group(1))] = per_pos.get(int(m.group(1)), 0.0) + value
    if per_pos:
        out[PER_POS] = [per_pos[i] for i in sorted(per_pos)]
    return out


async def _one(client, model, prompt, temperature, max_tokens, seed, timeout):
    t0 = time.perf_counter()
    first = None
    text, tokens = [], None
    kwargs = {"seed": seed} if temperature > 0 else {}
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=temperature, stream=True, stream_options={"include_usage": True},
        timeout=timeout, **kwargs)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    tokens = tokens if tokens is not None else len(text)
    tpot = (end - first) / (tokens - 1) if tokens > 1 else None
    return {"ttft": first - t0, "tpot": tpot, "tokens": tokens, "text": "".join(text)}


async def drive(url, model, prompts, concurrency, temperature, max_tokens, timeout):
    """Send ``prompts`` with at most ``concurrency`` in flight; results in prompt order."""
    import httpx
    from openai import AsyncOpenAI

    http = httpx.AsyncClient(trust_env=False, timeout=timeout)  # loopback: ignore proxies
    client = AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", http_client=http, max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def guarded(i, p):
        async with sem:
            return await _one(client, model, p, temperature, max_tokens, 1000 + i, timeout)

    try:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(i, p) for i, p in enumerate(prompts)))
        return results, time.perf_counter() - t0
    finally:
        await client.close()


def _method_cells(server, target, data, args, bar) -> list[dict]:
    records = []
    asyncio.run(drive(server.url, target, ["Say hello in one short sentence."], 1, 0, 16,
                      args.request_timeout))  # warm-up
    for ds, prompts in data.items():
        for temperature in args.temperatures:
            for c in args.batch_sizes:
                n = args.requests or max(4, 2 * c)
                reqs = [prompts[i % len(prompts)] for i in range(n)]
                before = server_counters(server)
                results, wall = asyncio.run(drive(server.url, target, reqs, c, temperature,
                                                  args.max_tokens, args.request_timeout))
                stats = spec_delta(before, server_counters(server))
                ntok = sum(r["tokens"] for r in results)
                rec = {"dataset": ds, "temperature": temperature, "concurrency": c,
                       "batch_size": c, "num_requests": n, "output_tokens": ntok,
                       "elapsed_s": wall, "tokens_per_s": ntok / wall, **stats,
                       "_ids": [r["text"] for r in results]}
                for key in ("ttft", "tpot"):
                    vals = [r[key] for r in results if r[key] is not None]
                    for q in (50, 90, 99):
                        p = percentile(vals, q)
                        rec[f"{key}_p{q}_ms"] = None if p is None else 1000 * p
                records.append(rec)
                bar.update(1)
    return records


def run_online(args, data, env, config) -> list[dict]:
    from tqdm import tqdm

    from pard_vllm.server import VllmServer, free_port, serve_command
    from spec_bench import compare_with_ar

    records = []
    per_method = len(data) * len(args.temperatures) * len(args.batch_sizes)
    with tqdm(total=per_method * len(args.methods), desc="spec_bench online", unit="cell") as bar:
        for method in args.methods:
            spec = method_spec(method, args.draft, args.k)
            base = {"method": method, "speculative_config": spec, **config, **env}
            reason = unsupported_reason(method)
            if reason is None:
                port = free_port()
                extra = ["--max-num-seqs", str(max(args.batch_sizes)), "--seed", "0"]
                if spec is not None:
                    extra += ["--speculative-config", json.dumps(spec)]
                cmd = serve_command(args.target, None, dtype=args.dtype, port=port,
                                    eager=not args.compile, extra_args=extra)
                bar.set_postfix_str(f"{method}: starting vllm serve")
                try:
                    with VllmServer(cmd, port) as server:
                        bar.set_postfix_str(method)
                        for r in _method_cells(server, args.target, data, args, bar):
                            records.append({**base, **r, "status": "ok", "serve_command": cmd})
                    continue
                except Exception as err:
                    reason = f"server failed: {type(err).__name__}: {' '.join(str(err).split())[:500]}"
            tqdm.write(f"{method}: not run: {reason}")
            bar.update(per_method)
            for ds in data:
                for t in args.temperatures:
                    for c in args.batch_sizes:
                        records.append({**base, "dataset": ds, "temperature": t, "concurrency": c,
                                        "batch_size": c, "status": "unsupported", "reason": reason})
    compare_with_ar(records)
    return records
