"""What every spec_bench mode shares: the methods' speculative configs, the
machine description stamped on each record, and counter arithmetic.

Why one place for the configs: the offline and online modes must run exactly the
same methods, and a record has to carry the exact config it measured so a number
can always be traced back to what produced it.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform

METHODS = ("ar", "vsd", "vllm_parallel", "pard", "pard_nolookup", "pard_fullhead", "pard_adaptive", "pard_adaptive_noguard",
           "pard_confidence", "ngram", "suffix")
#: The methods that run a draft model (the rest need only the target).
DRAFTED_METHODS = frozenset(METHODS) - {"ar", "ngram", "suffix"}

SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def base_name(method: str) -> str:
    """``"pard@4:runs/pard-4l"`` -> "pard": the method without its own K or draft."""
    return method.partition(":")[0].partition("@")[0]


def split_method(method: str, k: int) -> tuple[str, int]:
    """``"vllm_parallel@2"`` -> ("vllm_parallel", 2): a method at its own K, so
    one run can compare fixed-K baselines at several K (the best fixed K).
    A ``:DRAFT`` suffix (``pard@4:runs/pard-4l``, see ``method_draft``) is ignored here."""
    name, _, own_k = method.partition(":")[0].partition("@")
    if own_k and not (own_k.isdigit() and int(own_k) >= 1):
        raise SystemExit(f"error: '{method}': the K after '@' must be a positive integer, e.g. {name}@4")
    return name, int(own_k) if own_k else k


def method_draft(method: str, draft: str) -> str:
    """The draft a method runs with: its own after ``:`` (``pard@4:runs/pard-4l``),
    else ``--draft``. Lets one run compare drafts (e.g. 2, 4 and 6 layers) side by side."""
    own = method.partition(":")[2]
    if own and not os.path.isdir(own):
        raise SystemExit(f"error: '{method}': draft folder '{own}' does not exist")
    return own or draft


def method_spec(method: str, draft: str, k: int) -> dict | None:
    """The ``speculative_config`` of a method (None: plain autoregressive
    decoding). ``method`` may carry its own K and draft: ``pard@4:DIR``."""
    draft = method_draft(method, draft)
    method, k = split_method(method, k)
    if method == "ar":
        return None
    if method == "vsd":  # the same draft, K autoregressive draft forwards
        return {"method": "draft_model", "model": draft, "num_speculative_tokens": k}
    if method == "vllm_parallel":  # vLLM's own parallel drafting with the same draft
        return {"method": "draft_model", "model": draft, "num_speculative_tokens": k,
                "parallel_drafting": True}
    if method == "pard":
        return {"method": "pard", "model": draft, "num_speculative_tokens": k}
    if method == "pard_nolookup":  # PARD's draft alone (no prompt lookup on top)
        return {"method": "pard", "model": draft, "num_speculative_tokens": k, "prompt_lookup": False}
    if method == "pard_fullhead":  # pard with the draft's full output layer (no head_vocab)
        return {"method": "pard", "model": draft, "num_speculative_tokens": k, "head_vocab": 0}
    if method == "pard_adaptive":  # K chosen per step by measured goodput (pard_vllm.adaptive)
        return {"method": "pard", "model": draft, "num_speculative_tokens": k, "adaptive": "goodput"}
    if method == "pard_adaptive_noguard":  # ... without the measured-goodput check (adaptive_guard)
        return {"method": "pard", "model": draft, "num_speculative_tokens": k, "adaptive": "goodput",
                "adaptive_guard": False}
    if method == "pard_confidence":  # ... and each request's draft cut by its calibrated confidence
        return {"method": "pard", "model": draft, "num_speculative_tokens": k, "adaptive": "goodput",
                "confidence_threshold": "auto"}
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k,
                "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    if method == "suffix":
        return {"method": "suffix", "num_speculative_tokens": k}
    raise SystemExit(f"error: unknown method '{method}'; choose from {', '.join(METHODS)}")


def unsupported_reason(method: str) -> str | None:
    """Why a method cannot run here (None: it can). vLLM's suffix decoding lives
    in the arctic-inference package; without it vLLM refuses the config."""
    method = base_name(method)
    if method == "suffix" and importlib.util.find_spec("arctic_inference") is None:
        return ("vLLM's suffix decoding needs the arctic-inference package, which is not "
                "installed in this environment")
    return None


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Versions and machine, stamped on every record."""
    import torch
    import vllm
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every engine does first: our CPU defaults are then in os.environ
    return {
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "vllm_cpu_num_of_reserved_cpu": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def spec_delta(before: dict, after: dict) -> dict:
    """Acceptance statistics between two counter snapshots.

    Why deltas: vLLM's counters are cumulative over the engine's life, and one
    engine serves many cells (plus a warm-up), so each cell reads its own share.
    tau counts the bonus token: 1 + accepted / drafts.
    """
    d = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in SPEC_COUNTERS}
    drafts = d["vllm:spec_decode_num_drafts"]
    pos_b, pos_a = before.get(PER_POS, []), after.get(PER_POS, [])
    per_pos = [a - (pos_b[i] if i < len(pos_b) else 0.0) for i, a in enumerate(pos_a)]
    if not drafts:
        return {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "tau": None,
                "draft_acceptance_rate": None, "acceptance_per_position": None}
    return {
        "num_drafts": int(drafts),
        "num_draft_tokens": int(d["vllm:spec_decode_num_draft_tokens"]),
        "num_accepted_tokens": int(d["vllm:spec_decode_num_accepted_tokens"]),
        "tau": 1 + d["vllm:spec_decode_num_accepted_tokens"] / drafts,
        "draft_acceptance_rate": (d["vllm:spec_decode_num_accepted_tokens"]
                                  / max(d["vllm:spec_decode_num_draft_tokens"], 1)),
        "acceptance_per_position": [p / drafts for p in per_pos],
    }


def paired_ratio(numer: list[float], denom: list[float], draws: int = 10000, seed: int = 0):
    """(geometric mean of numer[i] / denom[i], 2.5th and 97.5th percentile of a
    bootstrap over i). Why paired: each i is one round that ran both sides
    seconds apart, so the machine's drift between rounds cancels in the ratio."""
    import numpy as np

    logs = np.log(np.asarray(numer, dtype=float) / np.asarray(denom, dtype=float))
    boot = logs[np.random.default_rng(seed).integers(0, len(logs), size=(draws, len(logs)))].mean(axis=1)
    low, high = np.exp(np.percentile(boot, [2.5, 97.5]))
    return float(np.exp(logs.mean())), float(low), float(high)


def round_order(items: list, r: int) -> list:
    """The order of round ``r``: ``items`` rotated left by r // 2, reversed on odd
    rounds. Why both: rotation alone puts every item in every place, but always after
    the same neighbour, and what one method leaves behind (a grown heap, warm caches)
    then favours the same next one every round (seen: 5% at batch 64); reversing
    every other round gives each item both neighbours (all orders, for three items)."""
    by = (r // 2) % len(items)
    order = items[by:] + items[:by]
    return order[::-1] if r % 2 else order


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) without numpy's import cost."""
    if not values:
        return None
    s = sorted(values)
    x = (len(s) - 1) * q / 100
    lo = int(x)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (x - lo)
