"""Where an engine step's time goes: wall time per engine step, split by vLLM function.

Used by ``k0_overhead.py --breakdown``. Wall-clock totals of two engines on this VM
drift by 10-20% between passes, which hides a 3-5% difference; the split does not
cancel the drift either, but it shows *which* part of a step differs (the target's
forward is the same in both engines, so a difference there is drift, a difference
in scheduling or sampling is a cost of the engine itself).

The wrappers go on vLLM's classes after pard-vllm's patches, so a patched function
is timed with its patch. The engine must run in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict

#: (label, module, class, method). Nested labels are parts of the one above them.
TIMED = (
    ("llm_step", "vllm.v1.engine.llm_engine", "LLMEngine", "step"),
    ("engine_step", "vllm.v1.engine.core", "EngineCore", "step"),
    ("schedule", "vllm.v1.core.sched.scheduler", "Scheduler", "schedule"),
    ("execute_model", "vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "execute_model"),
    ("target_forward", "vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_model_forward"),
    ("sample_tokens", "vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "sample_tokens"),
    ("rejection_sampler", "vllm.v1.sample.rejection_sampler", "RejectionSampler", "forward"),
    ("propose_drafts", "vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "propose_draft_token_ids"),
    ("pard_propose", "pard_vllm.proposer", "PardProposer", "propose"),
    ("draft_inputs", "pard_vllm.proposer", "PardProposer", "set_inputs_first_pass"),
    ("draft_head_sample", "pard_vllm.proposer", "PardProposer", "_sample_draft_tokens"),
    ("prompt_lookup", "pard_vllm.proposer", "PardProposer", "_look_up"),
    ("update_from_output", "vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output"),
    ("post_step", "vllm.v1.engine.core", "EngineCore", "post_step"),
)

seconds: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)
#: One record per engine step: (decode tokens, of which verified drafts, prompt tokens,
#: ms of the engine step, ms of the target's forward). See ``by_step_kind``.
steps_log: list[tuple[int, int, int, float, float]] = []
_scheduled: list = [None]  # the last scheduler output
_forward_at_step_start: list[float] = [0.0]


def install() -> None:
    """Wrap every function in TIMED once (after pard-vllm's patches are applied)."""
    import importlib

    from pard_vllm import patches

    patches.apply()
    for label, module, cls, name in TIMED:
        owner = getattr(importlib.import_module(module), cls)
        original = getattr(owner, name)
        if getattr(original, "__step_timer__", False):
            continue

        def make(original, label=label):
            @functools.wraps(original)  # keeps __pard_patched__, so the plugin does not wrap again
            def timed(*args, **kwargs):
                t0 = time.perf_counter()
                if label == "engine_step":
                    _forward_at_step_start[0] = seconds["target_forward"]
                try:
                    result = original(*args, **kwargs)
                    if label == "schedule":
                        _scheduled[0] = result
                    return result
                finally:
                    seconds[label] += time.perf_counter() - t0
                    calls[label] += 1
                    if label == "engine_step":
                        _log_step(time.perf_counter() - t0)
            timed.__step_timer__ = True
            return timed

        setattr(owner, name, make(original))


def _log_step(step_seconds: float) -> None:
    out, _scheduled[0] = _scheduled[0], None
    if out is None or not out.total_num_scheduled_tokens:
        return
    drafts = sum(map(len, out.scheduled_spec_decode_tokens.values()))
    decode = min(out.total_num_scheduled_tokens, len(out.num_scheduled_tokens) + drafts)
    forward = seconds["target_forward"] - _forward_at_step_start[0]
    steps_log.append((decode, drafts, out.total_num_scheduled_tokens - decode, 1000 * step_seconds, 1000 * forward))


def reset() -> None:
    seconds.clear()
    calls.clear()
    steps_log.clear()


def by_step_kind() -> dict[str, dict[str, float]]:
    """Engine steps split by what they did: ``prefill`` (any prompt tokens),
    ``plain`` (decode, no drafts verified) and ``verify <lo>-<hi>`` (decode
    tokens incl. verified drafts in that range). Per kind: steps, share of the
    run's step time, mean decode tokens and mean ms of a step and of its forward.

    Why: two engines' totals can differ for reasons that are not the cost of
    a verified token. At batch 16 here about half of plain decoding's time is
    prompt prefill (HumanEval's ~170-token prompts against 64 generated
    tokens), and an engine whose requests finish apart admits prompts in
    smaller, more frequent chunks; read per kind, a decode step's cost against
    its tokens is close to the line the adaptive controller fits (slightly
    concave: the first extra tokens cost the most)."""
    total = sum(r[3] for r in steps_log) or 1.0
    kinds: dict[str, list] = {}
    for decode, drafts, prompt, step_ms, forward_ms in steps_log:
        if prompt:
            kind = "prefill"
        elif not drafts:
            kind = "plain"
        else:
            lo = 1 << max(decode.bit_length() - 1, 0)
            kind = f"verify {lo}-{2 * lo - 1}"
        kinds.setdefault(kind, []).append((decode, step_ms, forward_ms))
    return {kind: {"steps": len(rows), "time_share": sum(r[1] for r in rows) / total,
                   "decode_tokens": sum(r[0] for r in rows) / len(rows),
                   "step_ms": sum(r[1] for r in rows) / len(rows),
                   "forward_ms": sum(r[2] for r in rows) / len(rows)}
            for kind, rows in sorted(kinds.items(), key=lambda kv: (kv[0] != "plain", kv[0] == "prefill",
                                                                   min(r[0] for r in kv[1])))}


def per_step_ms() -> dict[str, float]:
    """Milliseconds per engine step for each label, plus ``output_processing``
    (an LLMEngine step minus the engine core's step and post-step) and ``steps``."""
    steps = max(calls.get("engine_step", 0), 1)
    out = {label: 1000 * seconds.get(label, 0.0) / steps for label, *_ in TIMED}
    out["output_processing"] = out["llm_step"] - out["engine_step"] - out["post_step"]
    out["runner_outside_forward"] = out["execute_model"] - out["target_forward"]
    # What is left of the proposer: the draft's forward, mostly (its attention metadata and buffers too).
    out["draft_forward_etc"] = (out["pard_propose"] - out["draft_inputs"] - out["draft_head_sample"]
                                - out["prompt_lookup"])
    out["steps"] = calls.get("engine_step", 0)
    return out
