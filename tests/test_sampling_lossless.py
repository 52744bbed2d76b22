"""Speculative decoding must not change what is sampled at temperature > 0.

Regression tests for a vLLM 0.32 CPU bug (fixed by
``pard_vllm.patches.CpuExpandBatchToTokensPatch``): the C++ fallback of the
rejection sampler's ``expand_kernel`` only handles int64, so the per-request
temperature / top_p / top_k that ``apply_sampling_constraints`` spreads over the
draft positions came back as uninitialised memory. Every draft-model method
(vLLM's ``draft_model``, parallel drafting, PARD) then sampled garbage at
temperature > 0, while greedy output stayed exact.

* in process, no engine (fast): the rejection sampler's processed target logits
  and the distribution of its output tokens, on vLLM's CPU kernels;
* end to end (slow): many seeded samples of a short prompt, plain vs PARD with
  greedy and with probabilistic drafts. Rejection sampling consumes the seeded
  generator differently from plain sampling, so samples after the first token
  are equal in distribution, not token for token: we compare distributions.
"""

from __future__ import annotations

import collections
from types import SimpleNamespace

import pytest
import torch
from vllm import LLM, SamplingParams

from conftest import ENGINE_KW, head_vocab_variant, shutdown


@pytest.fixture(scope="module")
def cpu_rejection_sampler():
    """vLLM's rejection sampler module with the CPU kernels vLLM's workers use
    (C++ fallbacks when Triton has no CPU backend) and our patches applied, as
    the plugin applies them in every vLLM process."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the bug and its fix concern vLLM's CPU platform")
    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()
    from pard_vllm import patches

    patches.apply()
    from vllm.v1.sample import rejection_sampler

    return rejection_sampler


def _metadata(temperature, top_p=None, top_k=None, generators=None):
    return SimpleNamespace(temperature=temperature, top_p=top_p, top_k=top_k,
                           all_greedy=bool((temperature == 0).all()),
                           all_random=bool((temperature != 0).all()),
                           generators=generators or {})


def test_expand_batch_to_tokens_keeps_every_dtype(cpu_rejection_sampler):
    rs = cpu_rejection_sampler
    cu = torch.tensor([2, 2, 5], dtype=torch.int32)  # 2, 0 and 3 draft tokens
    temperature = rs.expand_batch_to_tokens(torch.tensor([0.8, 0.3, 0.0]), cu, 5,
                                            replace_from=0, replace_to=1)
    assert temperature.tolist() == pytest.approx([0.8, 0.8, 1.0, 1.0, 1.0])
    top_p = rs.expand_batch_to_tokens(torch.tensor([0.95, 0.5, 0.7]), cu, 5)
    assert top_p.tolist() == pytest.approx([0.95, 0.95, 0.7, 0.7, 0.7])
    for dtype in (torch.int32, torch.int64):
        top_k = rs.expand_batch_to_tokens(torch.tensor([3, 9, 7], dtype=dtype), cu, 5)
        assert top_k.dtype == dtype and top_k.tolist() == [3, 3, 7, 7, 7]


def test_target_logits_get_each_requests_temperature_top_p_top_k(cpu_rejection_sampler):
    rs = cpu_rejection_sampler
    torch.manual_seed(0)
    num_draft = [3, 1, 2]
    cu = torch.tensor(num_draft, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    logits = torch.randn(sum(num_draft), 50)
    temperature = torch.tensor([0.8, 1.3, 0.5])
    top_p = torch.tensor([0.9, 1.0, 0.6])
    top_k = torch.tensor([50, 10, 50], dtype=torch.int32)
    got = rs.apply_sampling_constraints(logits.clone(), cu, _metadata(temperature, top_p, top_k))

    reps = torch.tensor(num_draft)
    expected = logits / temperature.repeat_interleave(reps)[:, None]
    for row in range(expected.shape[0]):
        req = int(torch.searchsorted(cu, row, right=True))
        order = expected[row].argsort(descending=True)
        probs = expected[row][order].softmax(-1)
        keep = (probs.cumsum(-1) - probs) < top_p[req]  # smallest prefix with mass >= top_p
        keep[int(top_k[req]):] = False
        expected[row][order[~keep]] = float("-inf")
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    torch.testing.assert_close(got[finite], expected[finite])


@pytest.mark.parametrize("with_draft_probs", [False, True, "subset"],
                         ids=["greedy-drafts", "draft-probs", "subset-draft-probs"])
def test_rejection_sampling_is_lossless_on_cpu(cpu_rejection_sampler, with_draft_probs):
    """Output token distribution == target distribution after temperature and
    top-p, whatever the draft proposes: 20k one-draft requests at once."""
    rs = cpu_rejection_sampler
    gen = torch.Generator().manual_seed(0)
    batch, vocab, temp, top_p = 20000, 12, 0.8, 0.9
    row = torch.randn(vocab, generator=gen) * 2
    target_logits = row.repeat(batch, 1)
    if with_draft_probs:
        draft_logits = torch.randn(vocab, generator=gen)
        if with_draft_probs == "subset":  # a head_vocab draft: zero probability outside its ids
            draft_logits[5:] = float("-inf")
        draft_probs = torch.softmax(draft_logits, -1).repeat(batch, 1)
        draft = torch.multinomial(draft_probs, 1, generator=gen).squeeze(1).to(torch.int32)
    else:
        draft_probs = None
        draft = torch.randint(vocab, (batch,), generator=gen, dtype=torch.int32)
    cu = torch.arange(1, batch + 1, dtype=torch.int32)
    meta = _metadata(torch.full((batch,), temp), top_p=torch.full((batch,), top_p))
    processed = rs.apply_sampling_constraints(target_logits.clone(), cu, meta)
    out = rs.rejection_sample(draft, [1] * batch, 1, cu, draft_probs, processed,
                              torch.zeros(batch, 1, dtype=torch.int64), meta)
    first = out[:, 0].long()
    assert (first >= 0).all() and (first < vocab).all()
    empirical = torch.bincount(first, minlength=vocab).double() / batch

    probs = torch.softmax(row.double() / temp, -1)
    order = probs.argsort(descending=True)
    sorted_p = probs[order]
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    exact = torch.zeros(vocab, dtype=torch.float64)
    exact[order[keep]] = sorted_p[keep] / sorted_p[keep].sum()
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv < 0.02, f"rejection sampling output is off the target distribution: TV {tv:.3f}"


# --------------------------------------------------------------- end to end

PROMPT = "Here is a list of fruits: apple,"
NUM_SAMPLES = 200  # seeded requests, all prefilled in one step (no chunking)
NUM_TOKENS = 3
TEXT_IDS_SOURCE = PROMPT + " banana, cherry, orange, grape, pear, plum, mango, kiwi, lemon, lime, peach and melon."
#: Total-variation distance between the 3-token samples of two correct runs is
#: ~0.1 here (plain vs plain with other seeds: 0.15); the bug gave 1.0.
MAX_TV = 0.3


def _samples(target, spec=None, prompt=PROMPT, n=NUM_SAMPLES):
    llm = LLM(target, speculative_config=spec, **ENGINE_KW)
    try:
        params = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=NUM_TOKENS)
                  for i in range(n)]
        outs = llm.generate([prompt] * n, params, use_tqdm=False)
        return [tuple(o.outputs[0].token_ids) for o in outs]
    finally:
        shutdown(llm)


def _tv(a, b) -> float:
    ca, cb = collections.Counter(a), collections.Counter(b)
    return 0.5 * sum(abs(ca[k] / len(a) - cb[k] / len(b)) for k in ca.keys() | cb.keys())


@pytest.fixture(scope="module")
def plain_samples(embedded):
    return _samples(embedded["target"])


@pytest.mark.slow
@pytest.mark.parametrize("draft_sampling", ["greedy", "probabilistic", "probabilistic+adaptive",
                                            "probabilistic+head_vocab"])
def test_pard_samples_like_plain_decoding(embedded, plain_samples, draft_sampling, tmp_path):
    # "+adaptive": K chosen per step and each request's drafts cut by
    # confidence, so the rejection sampler sees ragged draft lengths and
    # ragged draft probabilities.
    extra = ({"adaptive": "goodput", "min_speculative_tokens": 2, "confidence_threshold": 0.3}
             if draft_sampling.endswith("+adaptive") else {})
    draft = embedded["draft"]
    if draft_sampling.endswith("+head_vocab"):
        # Drafts only over the ids of a fruit list: the sampler sees draft
        # probabilities that are zero for most of the vocabulary.
        draft = head_vocab_variant(draft, tmp_path / "d", TEXT_IDS_SOURCE)
    pard = _samples(embedded["target"], {"method": "pard", "model": draft,
                                         "num_speculative_tokens": 4,
                                         "draft_sampling": draft_sampling.split("+")[0], **extra})
    assert len(pard) == len(plain_samples) == NUM_SAMPLES
    assert all(len(s) == NUM_TOKENS for s in pard)
    # The first token comes from the prefill, sampled the same way with the
    # same seed: identical per request.
    assert [s[0] for s in pard] == [s[0] for s in plain_samples]
    tv = _tv(pard, plain_samples)
    print(f"\n{draft_sampling} drafts: TV(pard, plain) over {NUM_TOKENS}-token samples = {tv:.3f}")
    assert tv < MAX_TV, (f"PARD changed the sampled distribution (TV {tv:.2f}); most common: "
                         f"pard {collections.Counter(pard).most_common(3)}, "
                         f"plain {collections.Counter(plain_samples).most_common(3)}")


REPEATING_PROMPT = "one two three four five. one two three four five. one two three"
LOOKUP_SAMPLES = 400
#: Measured on this prompt (400 samples, T = 0.8, top_p = 0.95): plain against
#: plain with other seeds 0.105, PARD with the lookup against plain 0.115.
MAX_TV_LOOKUP = 0.2


@pytest.mark.slow
def test_prompt_lookup_drafts_sample_like_plain_decoding(embedded, monkeypatch):
    """A prompt that repeats itself, so the prompt lookup replaces drafts (with
    one-hot draft probabilities) and skips whole draft forwards (no draft
    probabilities at all): sampled continuations keep plain decoding's
    distribution. A looked-up token whose draft probability pointed elsewhere
    would be accepted every time (its target/draft ratio divides by zero) and
    pile the samples onto it. (The 1-token rule's first token keeps PARD's
    probability: tests/test_prompt_lookup.py.)"""
    from pard_vllm import prompt_lookup

    def samples(spec):
        return _samples(embedded["target"], spec, REPEATING_PROMPT, LOOKUP_SAMPLES)

    plain = samples(None)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the drafter in this process, to count
    found = []  # per lookup: did it replace drafts (both the skip test and the per-row rule)
    for name in ("trusted", "continuation"):
        original = getattr(prompt_lookup.PromptLookup, name)

        def counting(self, *args, original=original):
            result = original(self, *args)
            found.append(bool(result))
            return result

        monkeypatch.setattr(prompt_lookup.PromptLookup, name, counting)
    pard = samples({"method": "pard", "model": embedded["draft"], "num_speculative_tokens": 4,
                    "draft_sampling": "probabilistic"})
    assert sum(found) >= LOOKUP_SAMPLES // 2, f"the lookup replaced drafts in only {sum(found)} request-steps"
    tv = _tv(pard, plain)
    print(f"\nprompt lookup, probabilistic drafts: TV(pard, plain) = {tv:.3f}; "
          f"lookups {sum(found)} of {len(found)}")
    assert tv < MAX_TV_LOOKUP, (f"the lookup changed the sampled distribution (TV {tv:.2f}); most common: "
                                f"pard {collections.Counter(pard).most_common(3)}, "
                                f"plain {collections.Counter(plain).most_common(3)}")
