"""Load and abort test: `vllm serve` with PARD under many concurrent streaming
chat requests answers exactly like a plain server at temperature 0, survives
clients that hang up mid-stream, and gives its memory back.

    flock /tmp/pard-vllm-engine.lock .venv/bin/python benchmarks/load_test.py [--requests 64]

1. A plain server (no speculation) answers every temperature-0 request that
   will not be aborted: the reference texts. It is then stopped.
2. A PARD server gets a warm-up round (the same requests, 8 tokens each);
   once idle, its RSS (API server + engine core, the whole process tree) and
   KV-cache usage are the idle level.
3. All N requests go out at once as streaming chat requests with mixed
   prompts, lengths (max_tokens 1..160) and sampling settings (greedy, top-p,
   top-k; vLLM refuses min_p with speculation); a quarter close their stream
   after a few chunks.
4. Checks: no request errored, every completed temperature-0 text equals the
   plain server's, /health answers, no request is left running or waiting,
   KV-cache usage is back to its idle level and RSS grew by at most the
   tolerance. Prints a summary; exits 1 on any failure.

No seeded requests: on vLLM's CPU build a seeded request whose prefill is
chunked (as happens under load) crashes the engine, with or without
speculation (README, "Known issues"). fp32 and eager throughout, so greedy
output is bit-comparable between the two servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pard_vllm.server import VllmServer, free_port, serve_command, spec_decode_stats  # noqa: E402

PROMPTS = [
    "Write a Python function that merges two sorted lists.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Explain in two sentences what a compiler does.",
    "List four uses of a paperclip.",
    "Write a limerick about a sleepy programmer.",
    "How does a refrigerator keep food cold?",
    "Give a regular expression that matches an email address and explain it.",
    "Describe a sunrise over the ocean.",
    "What is 17 times 23? Show your steps.",
    "Write a bash loop that prints the numbers 1 to 10.",
    "Name three planets and one fact about each.",
    "Why is the sky blue?",
]
#: A long prompt (a few hundred tokens) so prefills of very different sizes meet.
LONG_PROMPT = ("Here are my notes from the week. " + " ".join(
    f"On day {d} I wrote {d * 3} lines of code, fixed {d} bugs and read {d + 2} pages."
    for d in range(1, 25)) + " Summarize my week in three sentences.")
SAMPLING = [  # cycled over the requests; temperature 0 is checked against the plain server
    {"temperature": 0.0},
    {"temperature": 0.8, "top_p": 0.9},
    {"temperature": 0.0},
    {"temperature": 1.0, "top_k": 20},
    {"temperature": 0.0},
    {"temperature": 0.9, "top_p": 0.95, "top_k": 50},
]
MAX_TOKENS = [1, 2, 8, 24, 48, 96, 160]


@dataclass
class RequestSpec:
    index: int
    prompt: str
    max_tokens: int
    sampling: dict
    abort_after: int | None = None  # close the stream after this many chunks

    @property
    def greedy(self) -> bool:
        return self.sampling.get("temperature", 1.0) == 0.0


@dataclass
class Result:
    index: int
    text: str = ""
    chunks: int = 0
    aborted: bool = False
    finish_reason: str | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Summary:
    requests: int = 0
    aborted: int = 0
    completed: int = 0
    errors: int = 0
    greedy_compared: int = 0
    identical: int = 0
    healthy: bool = False
    rss_idle_mib: float = 0.0
    rss_after_mib: float = 0.0
    kv_usage_idle: float = 0.0
    kv_usage_after: float = 0.0
    left_running: float = 0.0
    load_seconds: float = 0.0
    mean_acceptance_length: float = float("nan")
    rss_rounds_mib: list[float] = field(default_factory=list)
    rss_by_process_mib: list[dict[str, int]] = field(default_factory=list)  # idle, then each round
    failures: list[str] = field(default_factory=list)

    @property
    def identical_pct(self) -> float:
        return 100.0 * self.identical / self.greedy_compared if self.greedy_compared else 0.0


def plan(n: int, abort_fraction: float = 0.25) -> list[RequestSpec]:
    """N requests, deterministic: mixed prompts, lengths and sampling; every
    1/abort_fraction-th request is aborted after 2-4 chunks (and given room
    to run long, so the abort really is mid-stream)."""
    every = max(1, round(1 / abort_fraction)) if abort_fraction > 0 else 0
    specs = []
    for i in range(n):
        prompt = LONG_PROMPT if i % 7 == 5 else PROMPTS[i % len(PROMPTS)]
        spec = RequestSpec(i, prompt, MAX_TOKENS[i % len(MAX_TOKENS)], SAMPLING[i % len(SAMPLING)])
        if every and i % every == every - 1:
            spec.max_tokens, spec.abort_after = 160, 2 + i % 3
        specs.append(spec)
    return specs


def _body(model: str, spec: RequestSpec, stream: bool) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": spec.prompt}],
            "max_tokens": spec.max_tokens, "stream": stream, **spec.sampling}


async def stream_chat(client: httpx.AsyncClient, url: str, model: str, spec: RequestSpec) -> Result:
    """One streaming chat request; closes the connection after
    ``spec.abort_after`` chunks if set (a client hanging up mid-answer)."""
    res, start = Result(spec.index), time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json=_body(model, spec, stream=True)) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    res.error = str(event["error"])[:300]
                    break
                for choice in event.get("choices", []):
                    res.text += choice.get("delta", {}).get("content") or ""
                    res.finish_reason = choice.get("finish_reason") or res.finish_reason
                res.chunks += 1
                if spec.abort_after is not None and res.chunks >= spec.abort_after:
                    res.aborted = True
                    break  # leaving the block closes the connection mid-stream
        if not res.aborted and res.finish_reason is None and res.error is None:
            res.error = "stream ended without finish_reason"
    except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    res.seconds = time.perf_counter() - start
    return res


async def run_load(url: str, model: str, specs: list[RequestSpec], timeout: float = 900) -> list[Result]:
    """Send every request at once (each on its own connection)."""
    limits = httpx.Limits(max_connections=len(specs) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        return list(await asyncio.gather(*(stream_chat(client, url, model, s) for s in specs)))


async def reference_texts(url: str, model: str, specs: list[RequestSpec],
                          timeout: float = 900) -> dict[int, str]:
    """Non-streamed answers of a (plain) server to the greedy requests that
    will not be aborted: what the PARD server must reproduce."""
    wanted = [s for s in specs if s.greedy and s.abort_after is None]
    async with httpx.AsyncClient(timeout=timeout) as client:
        async def one(spec):
            r = await client.post(url + "/v1/chat/completions", json=_body(model, spec, stream=False))
            r.raise_for_status()
            return spec.index, r.json()["choices"][0]["message"]["content"] or ""
        return dict(await asyncio.gather(*(one(s) for s in wanted)))


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and all its descendants (API server + engine core)."""
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def rss_by_process_mib(pid: int) -> dict[str, int]:
    """RSS per process of the tree, keyed "name[pid]": says which process grows."""
    out = {}
    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        try:
            out[f"{p.name()}[{p.pid}]"] = round(p.memory_info().rss / 2**20)
        except psutil.Error:
            pass
    return out


def gauge(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k.split("{")[0] == name)


def wait_idle(server: VllmServer, timeout: float = 120) -> dict[str, float]:
    """Poll /metrics until no request is running or waiting; return them."""
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        busy = gauge(m, "vllm:num_requests_running") + gauge(m, "vllm:num_requests_waiting")
        if busy == 0 or time.time() > deadline:
            time.sleep(1.0)  # let the engine free the last blocks and settle
            return server.metrics()
        time.sleep(0.5)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def check_load(server: VllmServer, model: str, specs: list[RequestSpec], reference: dict[int, str],
               rss_tolerance_mib: float = 128.0, rounds: int = 1) -> tuple[Summary, list[Result]]:
    """Warm up, take the idle level, run the load (``rounds`` times, RSS
    taken after each), then check everything."""
    s = Summary(requests=len(specs) * rounds)
    # Warm-up at the same concurrency and prompts (8 tokens each), so batch-size
    # dependent buffers and allocator pools exist before the idle level is taken.
    warm = [RequestSpec(x.index, x.prompt, min(x.max_tokens, 8), x.sampling,
                        None if x.abort_after is None else 2) for x in specs]
    asyncio.run(run_load(server.url, model, warm))
    idle = wait_idle(server)
    s.rss_idle_mib = tree_rss_mib(server.proc.pid)
    s.rss_by_process_mib.append(rss_by_process_mib(server.proc.pid))
    s.kv_usage_idle = gauge(idle, "vllm:kv_cache_usage_perc")
    before = spec_decode_stats(idle)

    results = []
    for _ in range(rounds):
        start = time.perf_counter()
        results += asyncio.run(run_load(server.url, model, specs))
        s.load_seconds += time.perf_counter() - start
        after = wait_idle(server)
        s.rss_rounds_mib.append(round(tree_rss_mib(server.proc.pid)))
        s.rss_by_process_mib.append(rss_by_process_mib(server.proc.pid))
    s.healthy = healthy(server.url)
    s.rss_after_mib = tree_rss_mib(server.proc.pid)
    s.kv_usage_after = gauge(after, "vllm:kv_cache_usage_perc")
    s.left_running = gauge(after, "vllm:num_requests_running") + gauge(after, "vllm:num_requests_waiting")
    stats = spec_decode_stats(after)
    drafts = stats["num_drafts"] - before["num_drafts"]
    if drafts:
        s.mean_acceptance_length = 1 + (stats["num_accepted_tokens"] - before["num_accepted_tokens"]) / drafts

    for r in results:
        if r.error:
            s.errors += 1
            s.failures.append(f"request {r.index}: {r.error}")
        elif r.aborted:
            s.aborted += 1
        else:
            s.completed += 1  # (an abort request that ended first counts here)
            if r.index in reference:
                s.greedy_compared += 1
                if r.text == reference[r.index]:
                    s.identical += 1
                else:
                    s.failures.append(f"request {r.index}: text differs from the plain server's: "
                                      f"{r.text[:80]!r} vs {reference[r.index][:80]!r}")
    expected = rounds * sum(1 for x in specs if x.greedy and x.abort_after is None)
    if s.greedy_compared != expected:
        s.failures.append(f"compared {s.greedy_compared} greedy requests, expected {expected}")
    if not s.healthy:
        s.failures.append("/health is not ok after the load")
    if s.left_running:
        s.failures.append(f"{s.left_running:.0f} requests still running or waiting after the load")
    if s.kv_usage_after > s.kv_usage_idle + 1e-6:
        s.failures.append(f"KV-cache usage {s.kv_usage_after:.4f} did not return to idle {s.kv_usage_idle:.4f}")
    if s.rss_after_mib > s.rss_idle_mib + rss_tolerance_mib:
        s.failures.append(f"RSS grew {s.rss_after_mib - s.rss_idle_mib:.0f} MiB (> {rss_tolerance_mib:.0f})")
    return s, results


def start_server(target: str, draft: str | None, k: int, extra_args: list[str]) -> VllmServer:
    port = free_port()
    return VllmServer(serve_command(target, draft, k=k, dtype="float32", port=port,
                                    extra_args=extra_args), port)


def report(s: Summary) -> str:
    lines = [
        f"requests            {s.requests}",
        f"aborted mid-stream  {s.aborted}",
        f"completed           {s.completed}",
        f"errors              {s.errors}",
        f"identical at T=0    {s.identical}/{s.greedy_compared} ({s.identical_pct:.1f}%)",
        f"health after        {'ok' if s.healthy else 'FAILED'}",
        f"left running        {s.left_running:.0f}",
        f"KV-cache usage      idle {s.kv_usage_idle:.4f} -> after {s.kv_usage_after:.4f}",
        f"RSS (process tree)  idle {s.rss_idle_mib:.0f} MiB -> after {s.rss_after_mib:.0f} MiB"
        f" (after each round: {s.rss_rounds_mib})",
        "RSS per process     " + "; ".join(
            f"{name}: {' -> '.join(str(r.get(name, '-')) for r in s.rss_by_process_mib)}"
            for name in s.rss_by_process_mib[0]) if s.rss_by_process_mib else "",
        f"load wall time      {s.load_seconds:.1f} s",
        f"mean acceptance len {s.mean_acceptance_length:.2f}",
    ]
    lines += [f"FAIL: {f}" for f in s.failures] or ["PASS"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--abort-fraction", type=float, default=0.25)
    ap.add_argument("-k", type=int, default=8, help="num_speculative_tokens")
    ap.add_argument("--target", help="target model (default: the embedded SmolLM2)")
    ap.add_argument("--draft", help="PARD draft (default: the embedded draft)")
    ap.add_argument("--rss-tolerance-mib", type=float, default=128.0)
    ap.add_argument("--rounds", type=int, default=1, help="run the load this many times")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    ap.add_argument("--compare-plain", action="store_true",
                    help="also put the same load on the plain server and report its figures: "
                         "tells growth that comes with vLLM itself from growth that PARD adds")
    ap.add_argument("extra", nargs="*", help="extra `vllm serve` arguments (after --)")
    args = ap.parse_args(argv)
    if not (args.target and args.draft):
        from pard_vllm.prepare import prepare

        built = prepare()
        args.target, args.draft = args.target or built["target"], args.draft or built["draft"]
    extra = ["--max-model-len", "1024", *args.extra]
    specs = plan(args.requests, args.abort_fraction)

    plain_summary = None
    with start_server(args.target, None, args.k, extra) as plain:
        reference = asyncio.run(reference_texts(plain.url, args.target, specs))
        if args.compare_plain:
            plain_summary, _ = check_load(plain, args.target, specs, reference, args.rss_tolerance_mib,
                                          rounds=args.rounds)
    with start_server(args.target, args.draft, args.k, extra) as pard:
        summary, _ = check_load(pard, args.target, specs, reference, args.rss_tolerance_mib,
                                rounds=args.rounds)
    if plain_summary is not None:
        print("plain server, same load:\n" + report(plain_summary) + "\n\nPARD server:")
    print(report(summary))
    if args.json:
        record = {**asdict(summary), "identical_pct": summary.identical_pct}
        if plain_summary is not None:
            record["plain"] = asdict(plain_summary)
        args.json.write_text(json.dumps(record, indent=2))
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
