"""Adaptive draft length: the policies on synthetic numbers (fast), then the
real engine with them on (lossless, and it stops speculating when drafts are
never accepted)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from pard_vllm.adaptive import (AcceptanceTracker, GoodputController, StepCostModel,
                                expected_accepted, length_from_confidence,
                                lengths_from_confidence, step_features)
from pard_vllm.config import PardConfigError, resolve_pard_config
from pard_vllm.measured_goodput import MeasuredGoodput


def _controller(a: float, b: float, accept_prefix: list[float], max_k: int = 8) -> GoodputController:
    """A controller that has seen many steps of cost a + b*tokens and many
    requests with the given prefix-acceptance probabilities."""
    ctl = GoodputController(max_k=max_k, explore=0.0)
    for batch, k in [(1, 0), (1, 3), (4, 1), (8, 8), (16, 0), (2, 5), (32, 2)] * 20:
        tokens = batch * (1 + k)
        ctl.observe_step(batch, tokens, k, seconds=a + b * tokens)
    # 1000 requests that drafted max_k: exactly round(p_i * 1000) reach position i.
    # Interleaved (every 10th request is one of 10 "strata") so decay does not bias.
    reached = [round(p * 1000) for p in accept_prefix] + [0] * (max_k - len(accept_prefix))
    for r in sorted(range(1000), key=lambda r: (r % 10, r)):
        ctl.observe_request(max_k, sum(1 for n in reached if r < n))
    return ctl


def test_expected_accepted_counts_bonus_token():
    assert expected_accepted([0.5, 0.25, 0.1], 0) == 1.0
    assert math.isclose(expected_accepted([0.5, 0.25, 0.1], 2), 1.75)


def test_cost_model_recovers_each_part_of_the_step_time():
    cost = StepCostModel()
    # fixed, per verified token, per drafted position, drafting, verifying drafts, per prompt token
    truth = [0.040, 0.005, 0.002, 0.010, 0.006, 0.0004]
    # (batch, tokens, K, prompt tokens): verifying = more tokens than requests; (4, 12, 0)
    # verifies without drafting, (2, 2, 3) drafts without verifying; two steps also
    # prefill a prompt (cheap per token, but many tokens).
    steps = [(1, 1, 0, 0), (1, 4, 3, 0), (4, 8, 1, 0), (8, 72, 8, 0), (16, 16, 0, 0), (2, 4, 5, 0),
             (4, 20, 4, 0), (4, 12, 0, 0), (2, 2, 3, 0), (4, 12, 2, 600), (1, 1, 0, 150)]
    for batch, tokens, k, prompt in steps * 60:
        x = step_features(batch, tokens, k, prefill=prompt)
        cost.observe(x, sum(w * v for w, v in zip(truth, x)))
    assert cost.coefficients() == pytest.approx(truth, rel=0.05, abs=2e-4)
    x = step_features(4, 20, 4)
    assert cost.is_outlier(x, 10.0) and not cost.is_outlier(x, 0.2)


def test_cost_model_stays_accurate_when_features_move_together():
    """K never 0 and the batch fixed: "fixed" and "drafting" are the same
    column. A solve-then-clamp fit put +1.7 s on one, -1.7 s on the other and
    then predicted steps seconds too slow; the non-negative fit must not."""
    cost = StepCostModel()
    for i in range(300):
        k, prev = 3 + (i % 7 == 0), 3 + (i % 7 == 1)
        x = step_features(64, 64 * (1 + prev), k)
        cost.observe(x, 0.055 + 0.0036 * x[1] + 0.002 * x[2])
    assert min(cost.coefficients()) >= 0
    x = step_features(64, 256, 3)
    assert cost.predict(x) == pytest.approx(0.055 + 0.0036 * 256 + 0.002 * 192, rel=0.02)


def test_cost_model_stays_solvable_when_features_move_together_for_good():
    """With min_k = 1 "drafting at all" never changes, and at batch 1 without
    prompts the prefill column stays 0: only the ridge keeps the fit solvable.
    Decayed with the data it fell below float precision after ~5900 steps and
    the solve raised "Singular matrix"; its floor keeps 10000 steps fine."""
    rng = random.Random(0)
    ctl = GoodputController(max_k=8, min_k=1)
    for _ in range(10000):
        k = ctl.choose(1)
        ctl.observe_request(k, min(k, rng.choice([0, 0, 1, 2])))
        ctl.observe_step(1, 1 + k, k, 0.040 + 0.004 * (1 + k) + 0.002 * rng.random())
    x = step_features(1, 3, 2, verifying=True)  # and the fit still prices a step right
    assert ctl.cost.predict(x) == pytest.approx(0.040 + 0.004 * 3 + 0.001, rel=0.05), ctl.cost.coefficients()


def test_cost_model_is_not_seeded_by_a_prefill_step():
    """An engine's first step prefills a prompt (172 tokens, 290 ms here against
    ~45 ms for a decode step). Seeded from it, the ridge prior put ~4.5 ms on
    each verified token, and 200 decode steps of the kind batch 1 produces
    (mostly K = 2, a floor probe every 49) still left 4 ms there, true 0.2 ms:
    K = 4 then looked 8 ms dearer than K = 2. The prefill step is passed over
    until a decode step seeds the prior; where every step prefills, the 17th seeds it."""
    rng, model = random.Random(0), StepCostModel()
    model.observe(step_features(1, 1, 8, False, 172), 0.290)
    assert model.samples == 0
    pattern = [(3, 2)] * 45 + [(3, 0), (1, 0), (1, 0), (1, 2)]
    for i in range(200):
        tokens, k = pattern[i % len(pattern)]
        model.observe(step_features(1, tokens, k), (0.038 + 0.0002 * tokens + (0.008 if k else 0)) * rng.uniform(0.95, 1.05))
    assert model.samples == 200 and model.coefficients()[1] < 0.0015, model.coefficients()
    busy = StepCostModel()
    for _ in range(17):
        busy.observe(step_features(4, 4, 2, False, 300), 0.400)
    assert busy.samples == 1


def _linear_step(batch, tokens, k):
    """40 ms + 3.6 ms per verified token + 2 ms per drafted position + 15 ms for drafting at all."""
    return 0.040 + 0.0036 * tokens + (0.015 + 0.002 * batch * k if k else 0.0)


def _closed_loop(accept: list[float], batch: int, steps: int = 800, seed: int = 0,
                 seconds=_linear_step, residual: bool = True) -> float:
    """The controller driving a simulated engine: step time = ``seconds(batch,
    verified tokens, K)`` +-15% noise; draft i accepted with conditional
    probability accept[i]. Returns the achieved tokens/s over the best fixed
    K's steady-state tokens/s. ``residual=False`` switches off the per-K
    correction of the cost model (``CostResidual``)."""
    import random

    rng, ctl, prev_k, made, spent = random.Random(seed), GoodputController(8, seed=seed), 8, 0, 0.0
    if not residual:
        ctl.residual.ratio = lambda *args: 1.0
    for _ in range(steps):
        k, tokens = ctl.choose(batch), batch * (1 + prev_k)
        took = seconds(batch, tokens, k) * rng.uniform(0.85, 1.15)
        for _ in range(batch):  # as in vLLM: the step's outcomes arrive before it is timed
            n = 0
            while n < prev_k and rng.random() < accept[n]:
                n += 1
            if prev_k:
                ctl.observe_request(prev_k, n)
            made += 1 + n
        ctl.observe_step(batch, tokens, k, took)
        spent, prev_k = spent + took, k
    best = max(batch * (1 + sum(math.prod(accept[:i + 1]) for i in range(k))) / seconds(batch, batch * (1 + k), k)
               for k in range(9))
    return made / spent / best


@pytest.mark.parametrize("batch", [1, 4, 16, 64])
def test_closed_loop_goodput_is_near_the_best_fixed_k(batch):
    good = [0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.5, 0.5]
    weak = [0.19, 0.1, 0.05, 0, 0, 0, 0, 0]
    assert _closed_loop(good, batch) > 0.9  # the best K falls from 8 to 0 as the batch grows
    assert _closed_loop(weak, batch) > 0.9  # the best K is 0 at every batch size


def test_measured_cost_per_k_overrules_a_misfit_linear_model():
    """Steps whose cost the linear model cannot express (K = 1 and 2 take an
    extra 25 ms, as a slow code path would): the fit spreads that over every
    K and mis-ranks them. With each K's measured/predicted ratio applied
    (``CostResidual``) the controller finds the best K (3 here); without it,
    it lands well below."""
    def step(batch, tokens, k):
        return 0.040 + 0.002 * tokens + (0.025 if k in (1, 2) else 0) + (0.005 + 0.001 * batch * k if k else 0)

    accept = [0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0, 0]
    seeds = range(6)
    with_residual = [_closed_loop(accept, 1, seed=s, seconds=step) for s in seeds]
    without = [_closed_loop(accept, 1, seed=s, seconds=step, residual=False) for s in seeds]
    assert min(with_residual) > 0.94 and sum(with_residual) / 6 > 0.97, with_residual
    assert sum(with_residual) / 6 > sum(without) / 6 + 0.03, (with_residual, without)


def test_probes_skip_k_predicted_far_worse():
    """A weak draft at batch 64: one K = 1 step costs about two plain ones, so
    after calibration the controller never probes it. At batch 1 the same
    draft pays at K = 1, and K = 0 (close) is still probed."""
    ctl = _controller(0.040, 0.0036, [0.19, 0.02])
    for _ in range(ctl.calibrate):
        ctl.choose(64)  # the start-up cycle through K
    assert [ctl.choose(64) for _ in range(400)].count(0) == 400
    assert {ctl.choose(1) for _ in range(400)} == {0, 1}  # best K (1) and probes of 0


def test_acceptance_tracker_prefix_is_monotone_and_learns():
    acc = AcceptanceTracker(max_k=4)
    for _ in range(2000):
        acc.observe(4, 1)  # first draft always accepted, second never
    p = acc.prefix_accept()
    assert p[0] > 0.95 and p[1] < 0.05 and p == sorted(p, reverse=True)


def test_docstring_example_picks_k2_at_batch1_and_stops_at_batch16():
    ctl = _controller(0.040, 0.005, [0.5, 0.25, 0.1, 0.05, 0.02, 0.01, 0.0, 0.0])
    assert ctl.best_k(1) == 2
    assert ctl.best_k(16) == 0


def test_zero_acceptance_turns_speculation_off():
    ctl = _controller(0.040, 0.0005, [0.0] * 8)
    assert [ctl.best_k(b) for b in (1, 4, 16, 64)] == [0, 0, 0, 0]


def test_fixed_drafting_overhead_keeps_a_weak_draft_off():
    """With 25% first-position acceptance, per-token costs alone would favour
    K = 1 at batch 1; a measured 20 ms cost of running the drafter at all
    makes plain decoding faster, and the controller must see that."""
    ctl = GoodputController(max_k=8, explore=0.0)
    for batch, k in [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)] * 20:
        tokens = batch * (1 + k)
        ctl.observe_step(batch, tokens, k, seconds=0.050 + 0.002 * tokens + (0.020 if k else 0))
    for r in range(400):
        ctl.observe_request(1, 1 if r % 4 == 0 else 0)
    assert ctl.best_k(1) == 0


def test_perfect_drafts_on_cheap_tokens_use_full_k():
    ctl = _controller(0.040, 0.0001, [1.0] * 8)
    assert ctl.best_k(1) == 8


def test_min_k_is_respected_and_exploration_samples_other_k():
    ctl = GoodputController(max_k=8, min_k=2, explore=0.5, seed=1)
    for batch, k in [(1, 0), (1, 8), (4, 2)] * 10:
        ctl.observe_step(batch, batch * (1 + k), k, seconds=0.04 + 0.01 * batch * (1 + k))
    for _ in range(200):
        ctl.observe_request(8, 0)
    calibration = [ctl.choose(4) for _ in range(ctl.calibrate)]
    assert calibration == [8, 5, 3, 2] * 2  # top, middle, floor + 1, floor
    # At batch 16 a K = 8 step verifies 144 tokens: the start-up stops at floor + 2.
    assert ctl.calibration_ks(16) == [4, 3, 2] and GoodputController(8).calibration_ks(64) == [2, 1, 0]
    assert GoodputController(8).calibration_ks(1) == [8, 4, 1, 0] and GoodputController(1).calibration_ks(16) == [1, 0]
    picks = [ctl.choose(4) for _ in range(300)]
    # Best is the floor (2); exploration probes one or two above it, for
    # ``probe_steps`` steps in a row (so the probed K is seen in steady state).
    assert ctl.best_k(4) == 2 and set(picks) == {2, 3, 4}
    runs = [len(list(group)) for k, group in itertools.groupby(picks[:picks.index(2, 290)]) if k != 2]
    assert runs and all(n % ctl.probe_steps == 0 for n in runs), runs
    with pytest.raises(ValueError):
        GoodputController(max_k=4, min_k=5)


def test_length_from_confidence_matches_tensor_version():
    conf = [[0.9, 0.9, 0.5, 0.9], [0.3, 0.9, 0.9, 0.9], [1.0, 1.0, 1.0, 1.0]]
    expected = [length_from_confidence(row, 0.4) for row in conf]
    assert expected == [3, 0, 4]  # 0.9, 0.81, 0.405, 0.36 -> 3
    assert lengths_from_confidence(torch.tensor(conf), 0.4).tolist() == expected


def test_config_rejects_adaptive_with_manual_schedule(embedded):
    spec = {"method": "pard", "model": embedded["draft"], "num_speculative_tokens": 4}
    kwargs, opts = resolve_pard_config({**spec, "adaptive": "goodput"})
    assert opts.adaptive == "goodput" and kwargs["num_speculative_tokens_per_batch_size"][0][2] == 4
    with pytest.raises(PardConfigError, match="choose one"):
        resolve_pard_config({**spec, "adaptive": "goodput",
                             "num_speculative_tokens_per_batch_size": [[1, 8, 4]]})
    with pytest.raises(PardConfigError, match="min_speculative_tokens"):
        resolve_pard_config({**spec, "adaptive": "goodput", "min_speculative_tokens": 6})
    with pytest.raises(PardConfigError, match='add "adaptive": "goodput"'):
        resolve_pard_config({**spec, "confidence_threshold": "auto"})
    for bad in (1.5, "sometimes"):
        with pytest.raises(PardConfigError, match="between 0 and 1 .* or \"auto\""):
            resolve_pard_config({**spec, "confidence_threshold": bad})


# --- the real engine ---------------------------------------------------------

def _useless_draft(src: str, dest) -> str:
    """The embedded draft with its final norm zeroed: every logit is 0, so it
    always drafts token 0, which the target never emits: acceptance is 0."""
    from safetensors.torch import load_file, save_file

    from conftest import draft_variant

    folder = draft_variant(src, dest)
    weights = dest / "model.safetensors"
    tensors = load_file(str(weights.resolve()))
    weights.unlink()  # a symlink to the real draft: never write through it
    tensors["model.norm.weight"] = torch.zeros_like(tensors["model.norm.weight"])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return folder


def _run(target, spec, prompts, max_tokens=64):
    from vllm import LLM, SamplingParams

    from conftest import ENGINE_KW, shutdown
    from prompts import chat

    llm = LLM(target, speculative_config=spec, disable_log_stats=False, **ENGINE_KW)
    try:
        outs = chat(llm, prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
        metrics = {m.name: getattr(m, "value", m) for m in llm.get_metrics()}  # histograms whole
        return [o.outputs[0].token_ids for o in outs], metrics
    finally:
        shutdown(llm)


@pytest.mark.slow
def test_adaptive_is_lossless_and_turns_off_for_a_useless_draft(embedded, tmp_path, monkeypatch):
    from prompts import TEST_PROMPTS

    from pard_vllm import confidence_cut

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # scheduler in this process
    made = {GoodputController: [], confidence_cut.ConfidenceCut: []}  # the instances the engine builds
    for cls, instances in made.items():
        def init(self, *a, _original=cls.__init__, _instances=instances, **kw):
            _original(self, *a, **kw)
            _instances.append(self)

        monkeypatch.setattr(cls, "__init__", init)
    prompts = TEST_PROMPTS[:12]
    plain, _ = _run(embedded["target"], None, prompts)
    # The draft alone: looked-up drafts are neither cut nor calibrated on (tests/test_prompt_lookup.py).
    adaptive = {"method": "pard", "model": embedded["draft"], "num_speculative_tokens": 8,
                "adaptive": "goodput", "confidence_threshold": "auto", "prompt_lookup": False}
    fast, metrics = _run(embedded["target"], adaptive, prompts)
    assert fast == plain  # fp32 greedy: exactly the plain tokens, K and cut varying or not
    # The draft-length histogram (DraftLengthMetricsPatch) agrees with vLLM's
    # counters, and K and the cut made drafts of several lengths.
    lengths = metrics["vllm:pard_draft_length"]
    assert lengths.count == metrics["vllm:spec_decode_num_drafts"] > 0
    assert lengths.sum == metrics["vllm:spec_decode_num_draft_tokens"]
    cumulative = [lengths.buckets[key] for key in sorted(lengths.buckets, key=float)]
    assert sum(b > a for a, b in zip([0, *cumulative], cumulative)) >= 2, lengths.buckets
    # The automatic cut ran: the drafter's ledger was settled with vLLM's
    # rejected counts (calibration), and the controller saw drafts shorter than their K.
    cut = made[confidence_cut.ConfidenceCut][-1]  # the drafter's
    # Every verified draft adds at least one reached count, decayed per draft; how many
    # drafts there are depends on the controller's (timed) choices, so compare with them.
    drafts, decay = metrics["vllm:spec_decode_num_drafts"], cut.calibration.decay
    assert sum(cut.calibration.reached) > 0.8 * (1 - decay ** drafts) / (1 - decay) > 10
    controller = made[GoodputController][-1]
    tracker = controller.acceptance
    # (12 requests at once: the start-up cycles K = 2, 1, 0, so positions 1-2 carry it.)
    assert sum(tracker.offered) > 20 and sum(tracker.kept) < 0.9 * sum(tracker.offered), tracker
    # The scheduler told prompt tokens from decode tokens: prefills got their own
    # slope, and the per-K residual only saw decode steps.
    assert controller.cost.coefficients()[5] > 0 and controller.residual.cells

    useless = _useless_draft(embedded["draft"], tmp_path / "useless")
    # Full output layer: with a head vocabulary, all-zero logits would pick its
    # first id (the target's most frequent token), which is sometimes right.
    # (no prompt lookup either: its drafts would be accepted)
    spec = {"method": "pard", "model": useless, "num_speculative_tokens": 8, "head_vocab": 0,
            "prompt_lookup": False}
    fixed_out, fixed = _run(embedded["target"], spec, prompts)
    adapt_out, adapt = _run(embedded["target"], {**spec, "adaptive": "goodput"}, prompts)
    assert fixed_out == plain and adapt_out == plain
    assert fixed["vllm:spec_decode_num_accepted_tokens"] == 0
    # Fixed K verifies 8 useless tokens per step; the controller learns they
    # never pay and drafts (almost) nothing: only its exploration remains.
    assert adapt["vllm:spec_decode_num_draft_tokens"] < 0.2 * fixed["vllm:spec_decode_num_draft_tokens"]


@pytest.mark.slow
def test_skipped_draft_steps_catch_up(embedded, monkeypatch):
    """K = 0 steps run no draft forward ("idle_draft": "skip"); when drafting
    resumes the draft re-reads the tokens it missed. Scripted K (four steps of
    0, then one of 8): output stays exactly plain, and acceptance matches an
    engine whose draft ran on every step. Without the catch-up the draft would
    attend to stale cache entries and accept far less."""
    import itertools

    from prompts import TEST_PROMPTS

    from pard_vllm.proposer import PardProposer

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # scheduler in this process
    prompts = TEST_PROMPTS[:8]
    plain, _ = _run(embedded["target"], None, prompts)
    # K = 0 steps that verify nothing take the runner's shortcut (patches.DraftStepPatch)
    shortcuts = []
    idle_step = PardProposer.idle_step
    monkeypatch.setattr(PardProposer, "idle_step", lambda self, *a: shortcuts.append(1) or idle_step(self, *a))
    thresholds = []  # with neither the lookup nor the "auto" cut on, nothing reads the cut threshold
    cut_threshold = GoodputController.cut_threshold
    monkeypatch.setattr(GoodputController, "cut_threshold",
                        lambda self, *a: thresholds.append(1) or cut_threshold(self, *a))
    stats, taken = {}, {}
    for idle in ("forward", "skip"):
        pattern = itertools.cycle([0, 0, 0, 0, 8])
        monkeypatch.setattr(GoodputController, "choose", lambda self, b: next(pattern))
        monkeypatch.setattr(GoodputController, "__getitem__", lambda self, b: next(pattern))
        # (no prompt lookup: its drafts at K = 0 would verify, and take steps off the shortcut)
        spec = {"method": "pard", "model": embedded["draft"], "num_speculative_tokens": 8,
                "adaptive": "goodput", "idle_draft": idle, "prompt_lookup": False}
        shortcuts.clear()
        out, stats[idle] = _run(embedded["target"], spec, prompts)
        taken[idle] = len(shortcuts)
        assert out == plain, idle
    # of every five steps: one drafts, the next verifies with K = 0, three skip before any preparation
    assert taken["forward"] == 0 and taken["skip"] >= 20, taken
    assert not thresholds, "the scheduler computed a cut threshold nobody reads (patches.AdaptiveKPatch)"
    accepted = {k: v["vllm:spec_decode_num_accepted_tokens"] for k, v in stats.items()}
    drafted = {k: v["vllm:spec_decode_num_draft_tokens"] for k, v in stats.items()}
    assert drafted["skip"] > 0 and accepted["forward"] > 0
    rate = {k: accepted[k] / drafted[k] for k in stats}
    print("accepted per drafted token:", rate)  # shown with pytest -s
    assert rate["skip"] >= 0.9 * rate["forward"], rate


@pytest.mark.slow
def test_lookup_drafts_at_k0_without_a_draft_forward(embedded, monkeypatch):
    """K pinned to 0 (the controller's "PARD does not pay here"): no draft
    forward ever runs, yet requests whose text repeats send the prompt lookup's
    continuation, cut where it stops paying (``LookupCut``). Output stays
    plain; the looked-up drafts are counted by vLLM, reach the scheduler's
    controller as the lookup's (``patches.DraftSourcePatch``), not PARD's, and
    settle the drafter's lookup cut."""
    from prompts import TEST_PROMPTS

    from pard_vllm.prompt_lookup import LookupCut
    from pard_vllm.proposer import PardProposer

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # scheduler and drafter in this process
    prompts = TEST_PROMPTS[:8]
    plain, _ = _run(embedded["target"], None, prompts)
    forwards, made = [], {GoodputController: [], LookupCut: []}
    first_pass = PardProposer.set_inputs_first_pass  # builds the draft forward's batch
    monkeypatch.setattr(PardProposer, "set_inputs_first_pass",
                        lambda self, *a, **kw: forwards.append(1) or first_pass(self, *a, **kw))
    for cls, instances in made.items():
        def init(self, *a, _original=cls.__init__, _instances=instances, **kw):
            _original(self, *a, **kw)
            _instances.append(self)

        monkeypatch.setattr(cls, "__init__", init)
    monkeypatch.setattr(GoodputController, "choose", lambda self, b: 0)
    monkeypatch.setattr(GoodputController, "__getitem__", lambda self, b: 0)
    spec = {"method": "pard", "model": embedded["draft"], "num_speculative_tokens": 8, "adaptive": "goodput"}
    out, metrics = _run(embedded["target"], spec, prompts)
    assert out == plain
    assert not forwards, "a K = 0 step ran the draft forward"
    drafts, accepted = metrics["vllm:spec_decode_num_drafts"], metrics["vllm:spec_decode_num_accepted_tokens"]
    print(f"\nlooked-up drafts at K = 0: {drafts} drafts, {metrics['vllm:spec_decode_num_draft_tokens']} tokens, "
          f"{accepted} accepted")
    assert drafts > 0 and accepted > drafts / 2
    controller, cut = made[GoodputController][-1], made[LookupCut][-1]
    assert sum(controller.lookup_acceptance.offered) > 0 and sum(controller.acceptance.offered) == 0
    assert sum(sum(t.offered) for t in cut.trackers) > 0

    # K pinned to 2: PARD drafts 2 tokens, and the controller's K does not cap a
    # continuation: some verified drafts are longer than 2 (vllm:pard_draft_length).
    monkeypatch.setattr(GoodputController, "choose", lambda self, b: 2)
    monkeypatch.setattr(GoodputController, "__getitem__", lambda self, b: 2)
    out, metrics = _run(embedded["target"], spec, prompts)
    assert out == plain and forwards
    lengths = metrics["vllm:pard_draft_length"]
    longer = lengths.count - lengths.buckets["2.0"]
    print(f"K = 2: {longer} of {lengths.count} drafts longer than 2")
    assert longer > 0
    assert sum(made[GoodputController][-1].acceptance.offered) > 0  # PARD's own drafts: PARD's acceptance


def test_a_gain_inside_the_margin_does_not_speculate():
    """K = 1 predicted 3% faster than plain: inside the 5% margin, so K = 0;
    with no margin the controller would draft."""
    # 50 ms + 10 ms per verified token at batch 1; position 1 accepted so that
    # K = 1 gives (1 + p) / 70 ms against 1 / 60 ms, i.e. 1.03x for p = 0.2017.
    p = 1.03 * 70 / 60 - 1
    for margin, expected in ((0.05, 0), (0.0, 1)):
        ctl = GoodputController(max_k=1, explore=0.0, margin=margin)
        for tokens, k in [(1, 0), (2, 1), (2, 0), (1, 1)] * 40:
            ctl.observe_step(1, tokens, k, seconds=0.050 + 0.010 * tokens)
        for r in range(4000):
            ctl.observe_request(1, 1 if (r * p) % 1 + p >= 1 else 0)
        assert ctl.best_k(1) == expected, (margin, ctl.goodput(1, 1) / ctl.goodput(1, 0))
        assert ctl._why == ("margin" if expected == 0 else "model")
    # Unless speculating has measured at least the margin faster here, one
    # standard error included (2 tokens in 70 +- 3.5 ms against 1 in 60 +- 3 ms,
    # 1.7x): then the measurement decides. 1.06x, though beyond noise, is not enough.
    ctl.margin = 0.05
    for spec_seconds, expected in ((0.070, 1), (0.120 / 1.06, 0)):
        ctl.measured = MeasuredGoodput()
        for i in range(12):
            ctl.measured.observe(1, True, 2, spec_seconds * (1 + 0.05 * (-1) ** i))
            ctl.measured.observe(1, False, 1, 0.060 * (1 + 0.05 * (-1) ** i))
        assert ctl.measured.speculation_faster(1) and ctl.best_k(1) == expected
        assert ctl._why == ("measured" if expected else "margin")
    ctl.measured.cells.clear()
    ctl.guard = False  # ... which is the guard's measurement: off, the margin stands
    assert ctl.best_k(1) == 0


def test_margin_held_off_is_revisited():
    """An unlucky start: 5 of the first 25 drafts accepted (0.8 in truth) puts
    the predicted gain of K = 1 at 1.08x, inside the 10% margin, so K = 0; and
    with speculation off no acceptance is measured to correct it. The margin
    is held like the guard's verdict: after 48 steps an 8-step probe of the
    model's K measures acceptance again, the predicted gain clears the
    margin, and K = 1 stays (it is 1.57x plain decoding here)."""
    ctl = GoodputController(max_k=1, explore=0.0, margin=0.10)
    for tokens, k, seconds in [(1, 0, 0.040), (2, 1, 0.046), (2, 0, 0.040), (1, 1, 0.046)] * 10:
        ctl.observe_step(1, tokens, k, seconds)
    for r in range(25):
        ctl.observe_request(1, int(r % 5 == 0))
    ctl.steps, ctl.measured, ctl._last_k = ctl.calibrate, MeasuredGoodput(), 0  # past start-up, nothing measured
    assert ctl.best_k(1) == 0 and ctl._why == "margin", ctl.goodput(1, 1) / ctl.goodput(1, 0)
    ks = _drive(ctl, 1, 300, spec_seconds=0.046, plain_seconds=0.040, accepted=1)
    assert ks[:48] == [0] * 48 and ks[48:51] == [1, 1, 1], ks[:60]
    assert ctl.reasons["mirror"] == 1 and ks[-100:].count(1) >= 90, (ctl.reasons, ks)


def test_measured_slower_speculation_overrules_the_model():
    """The model predicts K = 1 pays at batch 4 (50% acceptance, cheap tokens),
    but steady K = 1 steps there have measured 6 tokens in 80 ms (75 tok/s)
    against 4 in 42 ms (95 tok/s) for steady plain steps: a cost the features
    cannot see. So K = 0 at batch 4. At batch 1, where speculating measured
    faster (2 tokens in 46 ms against 1 in 40.5 ms), and with the guard off,
    the model's choice stands."""
    for guard, expected in ((True, 0), (False, 1)):
        ctl = _controller(0.040, 0.0005, [0.5], max_k=1)
        ctl.guard, ctl.measured = guard, MeasuredGoodput()  # measured from here on
        assert ctl.best_k(4) == 1  # what the model alone says
        for batch, spec_seconds, accepted in ((4, 0.080, 2), (1, 0.046, 1)):
            for k in [0] * 6 + [1] * 6:
                if k and ctl._last_k:  # this step verifies the drafts of the one before
                    for r in range(batch):
                        ctl.observe_request(1, int(r < accepted))
                seconds = spec_seconds if k else 0.040 + 0.0005 * batch
                ctl.observe_step(batch, batch * (1 + k), k, seconds=seconds)
        ratio4, ratio1 = ctl.measured.speculation_ratio(4), ctl.measured.speculation_ratio(1)
        assert ratio4 == pytest.approx(75 / 95.2, rel=0.01) and ratio1 > 1.5, (ratio4, ratio1)
        assert ctl.best_k(4) == expected and ctl.best_k(1) == 1


def _noisy_cell_trial(rng, true_ratio: float, spec_steps: int) -> tuple[bool, bool]:
    """Batch 1 on a noisy VM: 5 plain probe steps of 40 ms and ``spec_steps``
    speculating steps of 1 + Binomial(3, 0.2) tokens (1.6 on average), both
    with 10% log-normal time noise, priced so that speculating makes
    ``true_ratio`` times plain decoding's tokens per second. Returns (the
    noise-aware verdict, the bare ``ratio < 1`` verdict)."""
    m = MeasuredGoodput()
    for _ in range(5):
        m.observe(1, False, 1, 0.040 * rng.lognormal(0, 0.10))
    for _ in range(spec_steps):
        m.observe(1, True, 1 + rng.binomial(3, 0.2), 0.064 / true_ratio * rng.lognormal(0, 0.10))
    return m.speculation_slower(1), m.speculation_ratio(1) < 1


def test_guard_waits_out_noise_but_catches_a_real_loss():
    """At break-even a bare ``ratio < 1`` says "slower" half the time; the
    noise-aware verdict rarely does (one-sided 2 standard errors, a little
    above the nominal 2% with only 5 plain steps). A real 30% loss is caught
    after 20 speculating steps nearly always."""
    import numpy as np

    rng = np.random.default_rng(0)
    even = np.array([_noisy_cell_trial(rng, 1.0, 100) for _ in range(400)]).mean(0)
    loss = np.array([_noisy_cell_trial(rng, 0.7, 20) for _ in range(400)]).mean(0)
    assert even[1] > 0.35 and even[0] < 0.09, even
    assert loss[0] > 0.85, loss


def test_relative_error_is_the_ratio_estimators_standard_error():
    """Without decay the cell's error equals the textbook one for a ratio of
    means: sd(t - R s) / sqrt(n) / mean(s) / R, with the n - 1 sample variance."""
    import numpy as np

    rng = np.random.default_rng(1)
    tokens, seconds = rng.integers(1, 4, 30).astype(float), 0.05 * rng.lognormal(0, 0.1, 30)
    m = MeasuredGoodput(decay=1.0)
    for t, s in zip(tokens, seconds):
        m.observe(1, True, t, s)
    r = tokens.sum() / seconds.sum()
    expected = np.sqrt((tokens - r * seconds).var(ddof=1) / 30) / seconds.mean() / r
    assert m.rate(1, True) == pytest.approx(r) and m.relative_error(1, True) == pytest.approx(expected)
    assert MeasuredGoodput().relative_error(1, True) is None


def _drive(ctl: GoodputController, batch: int, steps: int, spec_seconds: float, plain_seconds: float,
           accepted: int = 1) -> list[int]:
    """Choose and observe ``steps`` steps at a fixed batch: a speculating step
    takes ``spec_seconds`` and gains ``accepted`` drafts per request when the
    step before drafted; a plain one takes ``plain_seconds``."""
    ks, ctl._accepted = [], 0.0  # (the helper's requests were not a step's)
    for _ in range(steps):
        k = ctl.choose(batch)
        if k and ctl._last_k:
            for _ in range(batch):
                ctl.observe_request(k, accepted)
        ctl.observe_step(batch, batch * (1 + k), k, spec_seconds if k else plain_seconds)
        ks.append(k)
    return ks


def _floor_starts(ctl: GoodputController, ks: list[int], first_step: int) -> list[int]:
    return [first_step + i + 1 for i, k in enumerate(ks) if k == 0 and (i == 0 or ks[i - 1] != 0)]


def test_floor_probes_come_sooner_until_the_plain_side_is_measured():
    """Until the guard has plain steps at this batch size (5 steady ones: two
    per 3-step probe, the first verifies the drafts before it), floor probes
    start every 8 steps; afterwards every 48, and every 96, 192, ... while
    speculating measures faster beyond noise (here 5x). When that verdict
    lapses (here: the measurements are dropped) they return to every 8, then 48."""
    ctl = _controller(0.040, 0.0005, [0.8] * 8)
    ctl.measured, ctl.steps = MeasuredGoodput(), ctl.calibrate  # past start-up, nothing measured
    ks = _drive(ctl, 16, 400, spec_seconds=0.060, plain_seconds=0.050, accepted=4)
    starts = _floor_starts(ctl, ks, ctl.calibrate)
    assert starts == [16, 24, 32, 48, 96, 192, 384], starts
    assert ctl.measured.speculation_faster(16)
    # Every step's rule is counted: each probe is one "floor" step and two "probe" ones.
    assert ctl.reasons["floor"] == len(starts) and ctl.reasons["probe"] == 2 * len(starts), ctl.reasons
    assert sum(ctl.reasons.values()) == 400 and ctl.reasons["model"] == 400 - 3 * len(starts), ctl.reasons

    ctl.measured, ctl.steps = MeasuredGoodput(), 1000
    ks = _drive(ctl, 16, 100, spec_seconds=0.060, plain_seconds=0.050, accepted=4)
    assert _floor_starts(ctl, ks, 1000) == [1008, 1016, 1024, 1056], _floor_starts(ctl, ks, 1000)


def test_start_up_steps_are_not_measured_as_speculating():
    """The start-up cycles K = 8, 4, 1, 0 to teach the fit; its drafting steps
    (and the step verifying their drafts) stay out of the guard's measurement,
    the steps after it count."""
    ctl = GoodputController(max_k=8)
    _drive(ctl, 1, ctl.calibrate, spec_seconds=0.090, plain_seconds=0.040)
    assert ctl.reasons == {"calibrate": ctl.calibrate} and not ctl.measured.cells
    _drive(ctl, 1, 10, spec_seconds=0.045, plain_seconds=0.040)
    assert ctl.measured.cells, ctl.reasons


def test_guard_verdict_is_revised_when_speculation_gets_faster():
    """The guard holds K at 0 against the model (which predicts K = 1) after
    12 speculating steps measured 1.6x slower than plain ones; then
    speculating gets cheap (2 tokens in 46 ms against 1 in 40.5 ms). The
    speculating probes it starts while it holds (after 48 steps, then 96, ...)
    measure the change, and K = 1 returns. While speculating stays slow the
    probes thin out: 48, 96, 192, ... steps apart."""
    ctl = _controller(0.040, 0.0005, [0.5], max_k=1)
    ctl.measured, ctl.steps = MeasuredGoodput(), ctl.calibrate
    for i in range(12):
        ctl.measured.observe(1, True, 1 + i % 2, 0.100)
        ctl.measured.observe(1, False, 1, 0.0405)
    assert ctl.measured.speculation_slower(1) and ctl.best_k(1) == 0
    fast = _drive(ctl, 1, 600, spec_seconds=0.046, plain_seconds=0.0405)
    assert 0 in fast[:48], fast
    assert fast[-100:].count(1) >= 90, fast

    ctl = _controller(0.040, 0.0005, [0.5], max_k=1)
    ctl.measured, ctl.steps = MeasuredGoodput(), ctl.calibrate
    for i in range(12):
        ctl.measured.observe(1, True, 1 + i % 2, 0.100)
        ctl.measured.observe(1, False, 1, 0.0405)
    ctl.cost.observe = ctl.residual.observe = lambda *args: None  # a model that stays wrong
    slow = _drive(ctl, 1, 1000, spec_seconds=0.100, plain_seconds=0.0405, accepted=0)
    starts = [i for i, k in enumerate(slow) if k and (i == 0 or not slow[i - 1])]
    assert [b - a for a, b in zip(starts, starts[1:])] == [96, 192, 384], starts
    assert ctl.reasons["mirror"] == len(starts) and ctl.reasons["guard"] > 900, ctl.reasons
