"""Distilled answers -> packed PARD training batches (conditional drop, labels, soft labels).

One *document* is a chat-templated prompt followed by the target's answer. Several
documents are packed into a row of at most ``seq_len`` real tokens, and every document
is expanded into its PARD layout: its real tokens (block 0) plus K-1 mask blocks,
conditionally dropped (``pard_vllm.kernels.pard_layout``). Documents never attend to
each other (``doc_ids``), so packing wastes no compute on padding and changes no result.

Labels: the packed token (b, p) of a document x predicts x[p+1]; it sees only
x[0..p-b] plus b masks, so block b learns to guess b+1 tokens ahead. We drop masks with
p < b (they would see no real token and have no valid target; their successors keep
their predecessor, so the COD invariant holds) and put the loss only on answer tokens:
the prompts are ours, not the target's, and the draft is only ever asked to continue
the target. With ``--loss kd`` the label of (b, p) is the target's top-k distribution
at x[p+1], read from the distilled shard.

CAT weights (PARD-2's Confidence-Adaptive Token loss, ``--cat``): block b at position
p is only useful if the target confirms the b tokens x[p-b+1..p] the draft assumed
behind its masks, so its loss is weighted by the target's probability of them,
``prod_j P_target(x_j)``. Worked example: an answer whose tokens the target wrote
with probabilities 0.9, 0.5, 0.8, 1.0 (x_0..x_3): block 0 always weighs 1; block 1 at
p = 2 (it sees x_0, x_1 and one mask at p = 2, guesses x_3) weighs P(x_2) = 0.8; block 2
at p = 2 (sees x_0 and masks at 1, 2) weighs 0.5 * 0.8 = 0.4; block 3 at p = 3 weighs
0.5 * 0.8 * 1.0. Prompt tokens are given, never guessed: they weigh 1.

Batches are a pure function of (seed, epoch, batch index), so a resumed run rebuilds
exactly the batches it had not consumed yet.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE = -100
CAT_NEEDS_TOPK = "error: --cat needs data distilled with --top-logits k (the target's probabilities)"


@dataclass
class Doc:
    tokens: torch.Tensor  # [L] int64, prompt + answer, truncated to seq_len
    loss_from: int  # first index of the answer (labels before it are ignored)
    topk_ids: torch.Tensor | None = None  # [L - loss_from, k]
    topk_logprobs: torch.Tensor | None = None


def make_docs(examples: list[dict], seq_len: int, loss_on_prompt: bool = False) -> list[Doc]:
    docs = []
    for ex in examples:
        prompt, answer = ex["prompt_ids"], ex["response_ids"]
        if answer.numel() == 0:
            continue
        tokens = torch.cat([prompt, answer])[:seq_len]
        start = 1 if loss_on_prompt else min(prompt.numel(), tokens.numel())
        if start >= tokens.numel():
            continue  # the prompt alone fills the window: nothing of the target's to learn
        tk = tl = None
        if "topk_ids" in ex:
            n = tokens.numel() - prompt.numel()
            if n > 0:
                tk, tl = ex["topk_ids"][:n], ex["topk_logprobs"][:n]
        docs.append(Doc(tokens.long(), prompt.numel() if not loss_on_prompt else start, tk, tl))
    return docs


def check_mask_token(docs: list[Doc], mask_token: int) -> None:
    """The mask id must never occur in real text, or the draft could not tell masks from tokens."""
    for d in docs:
        if bool((d.tokens == mask_token).any()):
            raise SystemExit(f"error: mask token {mask_token} occurs in the training data; "
                             "pick an id real text never produces (--mask-token)")


def pack_rows(lengths: list[int], seq_len: int, seed: int, epoch: int) -> list[list[int]]:
    """First-fit packing of shuffled documents into rows of <= seq_len real tokens.

    First-fit (each document goes to the first open row with room) instead of closing a
    row at the first document that does not fit: with ~250-token documents in 512-token
    rows the simple greedy left ~30% of every row as padding, which still costs compute.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = min(lengths[i], seq_len)
        for r, room in enumerate(free):
            if room >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    rng.shuffle(rows)
    return rows


def epoch_batches(docs: list[Doc], seq_len: int, batch_size: int, seed: int, epoch: int) -> list[list[list[int]]]:
    rows = pack_rows([d.tokens.numel() for d in docs], seq_len, seed, epoch)
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def gold_logprobs(doc: Doc) -> torch.Tensor:
    """[L] log P_target(x_j) for the answer tokens of ``doc`` (0 for prompt tokens).

    Read from the distilled top-k; a sampled token outside the top-k gets the k-th
    log-prob, an upper bound on its own (the weight is a confidence, not a likelihood)."""
    L = doc.tokens.numel()
    out = torch.zeros(L)
    if doc.topk_ids is None:
        raise SystemExit(CAT_NEEDS_TOPK)
    n = doc.topk_ids.shape[0]
    answer = doc.tokens[L - n:]
    lps = doc.topk_logprobs.float()
    hit = doc.topk_ids.long() == answer[:, None]
    out[L - n:] = torch.where(hit.any(1), (lps * hit).sum(1), lps[:, -1])
    return out


def cat_weights(doc: Doc, blocks: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """CAT weight of each packed (block, position) of ``doc``: exp(sum of the gold
    log-probs of x[p-b+1..p]); 1 for block 0 (see the module docstring)."""
    c = torch.cumsum(gold_logprobs(doc), 0)
    return torch.exp(c[pos] - c[pos - blocks])


def doc_layout(doc: Doc, k: int, cod_r: float | None, cod_min: float, gen: torch.Generator):
    """Packed (block, position) pairs of one document, masks with p < b removed."""
    from pard_vllm.kernels import pard_layout

    blocks, pos = pard_layout(doc.tokens.numel(), k, cod_r=cod_r, cod_min=cod_min, generator=gen)
    keep = pos >= blocks
    return blocks[keep], pos[keep]


def collate(docs: list[Doc], rows: list[list[int]], k: int, mask_token: int, pad_token: int,
            cod_r: float | None, cod_min: float, seed: int, with_topk: bool = False,
            with_cat: bool = False) -> dict:
    """Tensors of one batch: ``[B, T]`` ids/positions/blocks/docs/labels (+ flat soft labels
    and CAT weights, in the order of ``labels[labels != IGNORE]``)."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for row in rows:
        cols = {n: [] for n in ("input_ids", "position_ids", "block_ids", "doc_ids", "labels")}
        soft_ids, soft_lps, cat = [], [], []
        for j, di in enumerate(row):
            d = docs[di]
            b, p = doc_layout(d, k, cod_r, cod_min, gen)
            L = d.tokens.numel()
            tgt = p + 1
            valid = (tgt < L) & (tgt >= d.loss_from)
            cols["input_ids"].append(torch.where(b == 0, d.tokens[p], torch.full_like(p, mask_token)))
            cols["position_ids"].append(p)
            cols["block_ids"].append(b)
            cols["doc_ids"].append(torch.full_like(p, j))
            cols["labels"].append(torch.where(valid, d.tokens[tgt.clamp(max=L - 1)], torch.full_like(p, IGNORE)))
            if with_topk:
                if d.topk_ids is None:
                    raise SystemExit("error: --loss kd needs data distilled with --top-logits k")
                r = (tgt[valid] - d.loss_from).clamp(max=d.topk_ids.shape[0] - 1)
                soft_ids.append(d.topk_ids[r])
                soft_lps.append(d.topk_logprobs[r])
            if with_cat:
                cat.append(cat_weights(d, b[valid], p[valid]))
        parts.append(({n: torch.cat(v) for n, v in cols.items()}, soft_ids, soft_lps, cat, len(row)))
    T = max(c["input_ids"].numel() for c, *_ in parts)
    batch = {n: [] for n in ("input_ids", "position_ids", "block_ids", "doc_ids", "labels")}
    soft_ids, soft_lps, cat = [], [], []
    for cols, si, sl, cw, ndocs in parts:
        pad = T - cols["input_ids"].numel()
        if pad:  # a dummy document of real tokens, attended by nothing else, no loss
            ar = torch.arange(pad)
            cols["input_ids"] = torch.cat([cols["input_ids"], torch.full((pad,), pad_token)])
            cols["position_ids"] = torch.cat([cols["position_ids"], ar])
            cols["block_ids"] = torch.cat([cols["block_ids"], torch.zeros(pad, dtype=torch.long)])
            cols["doc_ids"] = torch.cat([cols["doc_ids"], torch.full((pad,), ndocs)])
            cols["labels"] = torch.cat([cols["labels"], torch.full((pad,), IGNORE)])
        for n in batch:
            batch[n].append(cols[n])
        soft_ids += si
        soft_lps += sl
        cat += cw
    out = {n: torch.stack(v) for n, v in batch.items()}
    out["n_real"] = int(sum(docs[i].tokens.numel() for row in rows for i in row))
    if with_topk:
        # row-major order of the valid labels == order of labels[labels != IGNORE]
        out["topk_ids"] = torch.cat(soft_ids)
        out["topk_logprobs"] = torch.cat(soft_lps)
    if with_cat:
        out["cat_weight"] = torch.cat(cat)
    return out
