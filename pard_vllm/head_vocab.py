"""A draft output layer over the tokens the target actually writes.

Why: a small draft shares the target's vocabulary, so its output layer is as
large as the target's. For SmolLM2 that is 28M of the 2-layer draft's 35M
parameters; on a CPU (memory-bound at small batch) reading that matrix is
most of the draft's forward. Yet the target's answers use a small part of the
vocabulary: the 8192 most frequent ids of its distilled answers cover nearly
all of its tokens. The draft only needs logits over those rows.

How it stays lossless: the draft proposes ids from the subset only (mapped
back to the target's ids) and, when sampling, hands the rejection sampler a
full-vocabulary distribution that is zero outside the subset. Verification
is unchanged, so the output is exactly what the target would produce; a
target token outside the subset is simply never drafted (that draft is
rejected, as a wrong guess would be).

The subset is a file in the draft folder, ``pard_head_vocab.json``: ids by
falling frequency in the target's distilled answers (never in benchmark
prompts), so a prefix of it is the best subset of that size. Worked example:
answers [5, 9, 5, 2] and [5, 9, 7] with eos 2 and size 3 -> counts 5:3, 9:2,
2:1, 7:1 -> ids [5, 9, 2] (the tie between 2 and 7 goes to the smaller id),
covering 6 of 7 answer tokens. End-of-sequence ids always join the subset.
Places left once every answer token is in go to the target's top-k
alternatives (saved by ``pard-vllm distill --top-logits``), most frequent first.

    pard-vllm head-vocab --data runs/data/smollm2-greedy --draft DRAFT_DIR --size 8192

and serve with ``"head_vocab": 0`` to use the full output layer instead.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

HEAD_VOCAB_FILE = "pard_head_vocab.json"
CONFIG_KEY = "pard_head_vocab"


def rank_ids(answers: Iterable[Sequence[int]], size: int, always: Sequence[int] = (),
             candidates: Iterable[Sequence[int]] = ()) -> tuple[list[int], float]:
    """The ``size`` most frequent ids of ``answers`` (ties by id), with every id
    of ``always`` kept in; free places go to the most frequent ``candidates``
    (e.g. the target's top-k alternatives: tokens it nearly wrote). Returns the
    ids and the share of answer tokens they cover."""
    counts: Counter[int] = Counter()
    for answer in answers:
        counts.update(int(t) for t in answer)
    alternatives: Counter[int] = Counter()
    for row in candidates:
        alternatives.update(int(t) for t in row)
    order = lambda t: (-counts.get(t, 0), -alternatives.get(t, 0), t)  # noqa: E731
    forced = {int(t) for t in always}
    ranked = sorted(counts.keys() | alternatives.keys(), key=order)
    kept = [t for t in ranked if t not in forced][: max(size - len(forced), 0)]
    ids = sorted(set(kept) | forced, key=order)
    total = sum(counts.values())
    coverage = sum(counts[t] for t in ids) / total if total else 0.0
    return ids, coverage


def write_head_vocab(draft: str | Path, ids: list[int], coverage: float, source: str) -> Path:
    """Write the subset file into a draft folder and name it in config.json."""
    draft = Path(draft)
    cfg_path = draft / "config.json"
    cfg = json.loads(cfg_path.read_text())
    vocab = cfg.get("vocab_size")
    bad = [t for t in ids if not 0 <= t < (vocab or 1 << 62)]
    if bad:
        raise ValueError(f"head vocabulary ids {bad[:3]} are outside the draft's vocabulary ({vocab})")
    (draft / HEAD_VOCAB_FILE).write_text(json.dumps(
        {"size": len(ids), "coverage": round(coverage, 6), "source": source, "ids": ids}) + "\n")
    cfg[CONFIG_KEY] = len(ids)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return draft / HEAD_VOCAB_FILE


def read_head_vocab(draft: str | Path) -> list[int] | None:
    """The draft's subset ids (most frequent first), or None if it has none."""
    path = Path(draft) / HEAD_VOCAB_FILE
    if not path.is_file():
        return None
    return [int(t) for t in json.loads(path.read_text())["ids"]]


def build_from_data(data: str, draft: str, size: int) -> tuple[Path, float]:
    """``pard-vllm head-vocab``: rank the ids of a distilled data folder."""
    from pard_vllm.training.distill import load_shards

    cfg = json.loads((Path(draft) / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    always = [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
    examples = load_shards(data)
    answers = [ex["response_ids"].tolist() for ex in examples]
    alternatives = [ex["topk_ids"].flatten().tolist() for ex in examples if "topk_ids" in ex]
    ids, coverage = rank_ids(answers, size, always, alternatives)
    return write_head_vocab(draft, ids, coverage, source=str(data)), coverage


class SubsetHead:
    """Logits over the subset rows of a vLLM model's output layer.

    Built once after the draft's weights load (it copies the rows, so the
    matrix the forward reads is small and contiguous). The copy cannot go
    stale in vLLM 0.32: its in-place ``reload_weights`` reloads the target
    only, never the drafter; a vLLM that reloads drafters must rebuild this. ``scale`` and
    ``soft_cap`` follow vLLM's LogitsProcessor so logits equal the full ones
    at the kept ids.
    """

    def __init__(self, model, ids: Sequence[int]):
        import torch

        head, proc = model.lm_head, model.logits_processor
        self.ids = torch.tensor(list(ids), dtype=torch.long, device=head.weight.device)
        self.weight = head.weight.detach()[self.ids].contiguous()
        self.bias = getattr(head, "bias", None)
        if self.bias is not None:
            self.bias = self.bias.detach()[self.ids].contiguous()
        self.scale, self.soft_cap = proc.scale, proc.soft_cap
        self.vocab_size = proc.org_vocab_size
        self._linear = _platform_linear(self.weight, self.bias)

    @staticmethod
    def unsupported_reason(model) -> str | None:
        """Why the subset cannot replace this model's head (None = it can)."""
        head = getattr(model, "lm_head", None)
        if head is None or not hasattr(model, "logits_processor"):
            return "the draft has no plain lm_head"
        if getattr(head, "tp_size", 1) > 1:
            return "the draft's output layer is split across tensor-parallel ranks"
        if type(head.quant_method).__name__ not in ("UnquantizedEmbeddingMethod", "UnquantizedLinearMethod"):
            return "the draft's output layer is quantized"
        return None

    def logits(self, hidden_states):
        """[N, subset] logits; column j is target id ``ids[j]``."""
        logits = self._linear(hidden_states.to(self.weight.dtype))
        if self.soft_cap is not None:
            logits = logits.div(self.soft_cap).tanh().mul(self.soft_cap)
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits

    def to_target(self, columns):
        return self.ids[columns]

    def full_logits(self, hidden_states):
        """[N, vocab] logits, -inf outside the subset (for sampling with probabilities)."""
        sub = self.logits(hidden_states)
        full = sub.new_full((sub.shape[0], self.vocab_size), float("-inf"))
        full[:, self.ids] = sub
        return full


def _platform_linear(weight, bias):
    """x -> x @ weight.T + bias with the GEMM vLLM gives its own linear layers.

    Why not ``torch.nn.functional.linear``: on a CPU vLLM prepacks every weight
    for oneDNN (or zentorch, or its small-GEMM kernel), and plain torch is far
    slower at draft-sized inputs. On the 2-core AMD EPYC VM, fp32, 8192 x 576
    subset, 4 rows: 2.3 ms with torch against 0.22 ms with vLLM's oneDNN
    handler (``benchmarks/RESULTS.md``, "The draft's output layer through
    vLLM's CPU GEMM"), at every drafting step. On GPUs torch's linear is what
    vLLM's unquantized layers run anyway.
    """
    import torch
    from vllm.platforms import current_platform

    if weight.device.type != "cpu" or not current_platform.is_cpu():
        return lambda x: torch.nn.functional.linear(x, weight, bias)
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x.contiguous(), layer.weight, layer.bias)
