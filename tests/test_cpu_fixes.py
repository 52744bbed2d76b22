"""vLLM CPU-build bugs that pard_vllm.patches works around, each shown on a real engine."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_seeded_requests_survive_chunked_prefill(embedded):
    """CpuSeededChunkedPrefillPatch: seeded sampled requests whose prompts are
    split by a small token budget used to kill the engine ("CPU Generator does
    not use offset"). They must complete, with PARD on, and reproduce run to run."""
    from vllm import LLM, SamplingParams

    from conftest import ENGINE_KW, shutdown

    spec = {"method": "pard", "model": embedded["draft"], "num_speculative_tokens": 4}
    llm = LLM(embedded["target"], speculative_config=spec, enable_chunked_prefill=True,
              max_num_batched_tokens=64, max_num_seqs=8, **ENGINE_KW)
    try:
        base = "Explain, step by step and with one example each, how these sorting algorithms work: "
        prompts = [base + "bubble sort, insertion sort, merge sort, quicksort, heapsort. " * 3 + f"Case {i}."
                   for i in range(6)]
        assert all(len(llm.get_tokenizer()(p).input_ids) > 64 for p in prompts)  # really chunked
        params = [SamplingParams(temperature=0.7, top_p=0.9, seed=100 + i, max_tokens=24,
                                 ignore_eos=True) for i in range(6)]
        first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        shutdown(llm)
    assert all(len(t) == 24 for t in first)
    assert first == again
