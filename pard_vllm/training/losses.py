"""The output layer and the losses, where most of a small draft's training time goes.

SmolLM2's output layer is its tied 49152 x 576 embedding: 28M of a 2-layer draft's 35M
parameters, and ~75% of its training FLOPs per token. Three choices (``--head``):

* ``full``: logits over the whole vocabulary, tied embeddings trained. The reference.
* ``frozen``: same logits, the tied embeddings frozen. Skips the [V, D] weight gradient
  (1/3 of the head's cost) and keeps the draft's embedding identical to the target's,
  which is what lets a shipped draft leave the embedding out and re-attach the target's.
* ``sampled``: frozen, and logits only over a candidate set shared by the batch: every
  label, every id of the target's top-k, and ``negatives`` uniformly sampled ids (so
  tokens outside the batch are still pushed down). 10-20x fewer logits; the softmax is
  restricted to the candidates, a biased but cheap estimate that keeps the argmax
  ranking the draft is judged on.

Only positions with a label go through the head at all (prompt tokens and dropped or
target-less masks never do).

Losses: ``ce`` on the label (the target's greedy token when the data is greedy), ``kd``
the cross entropy to the target's renormalised top-k distribution, ``ce+kd`` their sum
(``ce_weight`` scales the ``ce`` term). With CAT weights in the batch (``--cat``,
``pard_vllm.training.data.cat_weights``) every position's terms are multiplied by its
weight before the mean: PARD-2's recipe is ``--loss ce+kd --ce-weight 0.1 --cat``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pard_vllm.training.data import IGNORE


def head_and_loss(hidden: torch.Tensor, batch: dict, weight: torch.Tensor, head: str, loss: str,
                  negatives: int = 2048, gen: torch.Generator | None = None,
                  ce_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Returns (scalar loss, stats) for ``hidden`` [B, T, D] at the batch's labelled positions."""
    labels = batch["labels"].reshape(-1)
    sel = labels != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[sel]
    y = labels[sel].to(h.device)
    blocks = batch["block_ids"].reshape(-1)[sel]
    want_kd = loss in ("kd", "ce+kd")
    soft_ids = batch["topk_ids"].to(h.device) if want_kd else None
    if head == "sampled":
        parts = [y, torch.randint(weight.shape[0], (negatives,), generator=gen).to(h.device)]
        if soft_ids is not None:
            parts.append(soft_ids.reshape(-1))
        cand = torch.cat(parts).unique()  # sorted
        logits = h @ weight[cand].T
        y_local = torch.searchsorted(cand, y)
        soft_local = torch.searchsorted(cand, soft_ids) if soft_ids is not None else None
    else:
        logits = h @ weight.T
        y_local, soft_local = y, soft_ids
    logp = F.log_softmax(logits.float(), dim=-1)
    w = batch.get("cat_weight")
    w = w.to(h.device) if w is not None else None

    def mean(per_position: torch.Tensor) -> torch.Tensor:
        return (per_position * w).mean() if w is not None else per_position.mean()

    terms = {}
    if loss in ("ce", "ce+kd"):
        terms["ce"] = ce_weight * mean(-logp.gather(1, y_local[:, None]).squeeze(1))
    if want_kd:
        p = F.softmax(batch["topk_logprobs"].to(h.device).float(), dim=-1)  # renormalised top-k
        terms["kd"] = mean(-(p * logp.gather(1, soft_local)).sum(-1))
    total = sum(terms.values())
    with torch.no_grad():
        hit = logp.argmax(-1) == y_local
        acc = {}
        for b in blocks.unique().tolist():
            m = blocks == b
            acc[int(b)] = (float(hit[m].float().mean()), int(m.sum()))
    stats = {n: float(v.detach()) for n, v in terms.items()}
    stats.update(n_labels=int(sel.sum()), n_logits=int(logits.numel()), acc=acc)
    return total, stats
