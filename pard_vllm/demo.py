"""``pard-vllm demo``: the embedded default served twice over HTTP, once with
PARD and once plain, the same greedy chat requests to each, answers and speed
side by side. Servers run one after the other so they never share the CPU."""

from __future__ import annotations

import time

from pard_vllm.prepare import prepare
from pard_vllm.server import VllmServer, free_port, serve_command, spec_decode_stats

DEMO_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "List three tips for writing clear code.",
    "What is the capital of France? Answer in one sentence.",
]


def _ask_all(url: str, model: str, max_tokens: int, stream_first: bool) -> tuple[list[str], int, float]:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused")
    answers, tokens, start = [], 0, time.perf_counter()
    for i, prompt in enumerate(DEMO_PROMPTS):
        messages = [{"role": "user", "content": prompt}]
        if stream_first and i == 0:
            print(f"\n> {prompt}\n", flush=True)
            parts = []
            stream = client.chat.completions.create(
                model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                    print(parts[-1], end="", flush=True)
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens
            print(flush=True)
            answers.append("".join(parts))
            continue
        r = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                           max_tokens=max_tokens)
        answers.append(r.choices[0].message.content)
        tokens += r.usage.completion_tokens
    return answers, tokens, time.perf_counter() - start


def run_demo(k: int = 8, dtype: str = "float32", max_tokens: int = 128, compile: bool = False) -> int:
    paths = prepare()
    print(f"target: {paths['target']}\ndraft:  {paths['draft']}", flush=True)
    rows = {}
    for name, draft in (("pard", paths["draft"]), ("plain", None)):
        port = free_port()
        cmd = serve_command(paths["target"], draft, k=k, dtype=dtype, port=port, eager=not compile)
        print(f"\n== starting `vllm serve` ({name}) on 127.0.0.1:{port} ...", flush=True)
        with VllmServer(cmd, port) as server:
            _ask_all(server.url, paths["target"], 8, stream_first=False)  # warm-up
            before = spec_decode_stats(server.metrics())
            answers, tokens, seconds = _ask_all(server.url, paths["target"], max_tokens, name == "pard")
            after = spec_decode_stats(server.metrics())
        drafts = after["num_drafts"] - before["num_drafts"]
        accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
        rows[name] = dict(answers=answers, tokens=tokens, seconds=seconds,
                          tau=(1 + accepted / drafts) if drafts else None)

    pard, plain = rows["pard"], rows["plain"]
    print("\n== answers (PARD)")
    for prompt, answer in zip(DEMO_PROMPTS, pard["answers"]):
        print(f"\n> {prompt}\n{answer.strip()}")
    same = sum(a == b for a, b in zip(pard["answers"], plain["answers"]))
    print(f"\n== batch 1, greedy, {dtype}, K={k}, {len(DEMO_PROMPTS)} requests")
    print(f"{'method':8} {'tokens':>7} {'tok/s':>8} {'mean acceptance length':>24}")
    for name, row in rows.items():
        tau = f"{row['tau']:.2f}" if row["tau"] else "-"
        print(f"{name:8} {row['tokens']:7d} {row['tokens'] / row['seconds']:8.1f} {tau:>24}")
    speedup = (pard["tokens"] / pard["seconds"]) / (plain["tokens"] / plain["seconds"])
    print(f"speedup {speedup:.2f}x; outputs identical to plain decoding: {same}/{len(DEMO_PROMPTS)}")
    return 0 if same == len(DEMO_PROMPTS) or dtype != "float32" else 1
