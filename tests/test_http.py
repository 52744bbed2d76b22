"""End to end over HTTP: `vllm serve` with the plugin on 127.0.0.1 answers
exactly like a plain server at temperature 0 (fp32), streaming or not, and
reports its drafts in /metrics."""

from __future__ import annotations

import pytest
from openai import OpenAI

from pard_vllm.server import VllmServer, free_port, serve_command, spec_decode_stats
from prompts import TEST_PROMPTS

pytestmark = pytest.mark.slow
PROMPTS = TEST_PROMPTS[:6]
MAX_TOKENS = 48
COMPLETION_PROMPTS = ["def is_prime(n):\n", "The three primary colors are", "Once upon a time, a robot"]


@pytest.fixture(scope="module")
def servers(embedded):
    started = []
    try:
        for draft in (None, embedded["draft"]):
            port = free_port()
            cmd = serve_command(embedded["target"], draft, k=8, dtype="float32", port=port,
                                extra_args=["--max-model-len", "1024"])
            started.append(VllmServer(cmd, port).__enter__())
        yield {"plain": started[0], "pard": started[1], "model": embedded["target"]}
    finally:
        for server in started:
            server.__exit__(None, None, None)


def _client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused")


def _chat(server, model, prompt, stream):
    kw = dict(model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
              max_tokens=MAX_TOKENS)
    if not stream:
        return _client(server).chat.completions.create(**kw).choices[0].message.content
    chunks = _client(server).chat.completions.create(stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _complete(server, model, prompt, stream):
    kw = dict(model=model, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
    if not stream:
        return _client(server).completions.create(**kw).choices[0].text
    return "".join(c.choices[0].text for c in _client(server).completions.create(stream=True, **kw)
                   if c.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_plain_server(servers, stream):
    for prompt in PROMPTS:
        want = _chat(servers["plain"], servers["model"], prompt, stream=False)
        got = _chat(servers["pard"], servers["model"], prompt, stream=stream)
        assert got == want and len(want) > 20, prompt


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_plain_server(servers, stream):
    for text in COMPLETION_PROMPTS:
        want = _complete(servers["plain"], servers["model"], text, stream=False)
        got = _complete(servers["pard"], servers["model"], text, stream=stream)
        assert got == want and want.strip(), text


def test_zz_metrics_show_drafts(servers):
    _chat(servers["pard"], servers["model"], PROMPTS[0], stream=False)
    stats = spec_decode_stats(servers["pard"].metrics())
    assert stats["num_drafts"] > 0
    # 8 per step, fewer where a prompt-lookup continuation was shorter (sent alone)
    assert 6 * stats["num_drafts"] <= stats["num_draft_tokens"] <= 8 * stats["num_drafts"]
    # pard-vllm's draft-length histogram: every verified draft was at most 8 long.
    metrics = servers["pard"].metrics()
    lengths = {key.split("{")[0]: value for key, value in metrics.items() if "pard_draft_length" in key
               and ('le="8.0"' in key or "le=" not in key)}
    assert lengths["vllm:pard_draft_length_count"] == stats["num_drafts"]
    assert lengths["vllm:pard_draft_length_sum"] == stats["num_draft_tokens"]
    assert lengths["vllm:pard_draft_length_bucket"] == stats["num_drafts"]  # all in le=8
    assert spec_decode_stats(servers["plain"].metrics())["num_drafts"] == 0
