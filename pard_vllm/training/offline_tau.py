"""Greedy tau of a draft replayed on held-out target answers, with no engine ("offline tau").

Under greedy decoding the target's output does not depend on the draft: it is the
distilled answer. So the accept/reject walk of speculative decoding can be replayed on
it. One forward of the answer's full PARD layout (K blocks, no conditional drop) gives
every guess the draft would ever make: the packed token (b, a+b) sees x[0..a] plus b
masks, exactly what the serving draft sees when it proposes from anchor a, so
``guess[a, b]`` is its proposal for x[a+b+1]. The walk then starts where vLLM's first
draft starts (the anchor is the first answer token, which the target's prefill wrote)
and moves on by ``accepted + 1`` per step.

Worked example, K = 3, answer x5..x12 after a 5-token prompt (anchor 5 = x5):

    step 1: guesses for x6, x7, x8 = [x6, x7, zz]  -> 2 accepted, next anchor 5 + 3 = 8
    step 2: guesses for x9, x10, x11 = [yy, ...]   -> 0 accepted, next anchor 9
    tau = (3 + 1) / 2 = 2.0; per position p1 = 2/2, p2 = 1/2, p3 = 0

Why it exists: vLLM's tau (``evaluate.py``) is the number users get, but it costs an
engine start and minutes per point; this costs one draft forward per answer, so the
trainer can log it at every checkpoint (a dense tau curve) and ablations can compare
drafts at equal steps without engine noise. The two agree when the serving path is
right (tests/test_e2e_offline.py checks that on the embedded draft), which also makes
this a check of the serving path.

    python -m pard_vllm.training.offline_tau --draft runs/pard-2l --data runs/data/eval-greedy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


@torch.no_grad()
def draft_guesses(model, tokens: torch.Tensor, k: int, mask_token: int,
                  head_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[L, k]`` greedy guesses: row a, column b = the draft's token for x[a+b+1] from anchor a
    (-1 where a+b runs past the answer)."""
    from pard_vllm.kernels import pard_layout
    from pard_vllm.training.model import PardLayout

    L = tokens.numel()
    blocks, pos = pard_layout(L, k, cod_r=None)
    keep = pos >= blocks
    blocks, pos = blocks[keep], pos[keep]
    ids = torch.where(blocks == 0, tokens[pos], torch.full_like(pos, mask_token))
    layout = PardLayout(blocks[None], pos[None], torch.zeros_like(pos)[None])
    hidden = model.model(input_ids=ids[None], position_ids=pos[None], pard_layout=layout,
                         use_cache=False).last_hidden_state[0]
    weight = model.get_output_embeddings().weight
    if head_ids is not None:
        guess = head_ids[(hidden @ weight[head_ids].T).argmax(-1)]
    else:
        guess = (hidden @ weight.T).argmax(-1)
    out = torch.full((L, k), -1, dtype=torch.long)
    out[pos - blocks, blocks] = guess
    return out


def replay(guesses: torch.Tensor, tokens: torch.Tensor, start: int, max_new: int) -> dict:
    """The greedy accept/reject walk from anchor ``start`` for ``max_new`` output tokens."""
    L, k = guesses.shape
    a, drafts, per_pos = start, 0, [0] * k
    while a < L - 1 and a - start + 1 < max_new:
        n = 0
        while n < k and a + n + 1 < L and int(guesses[a, n]) == int(tokens[a + n + 1]):
            per_pos[n] += 1
            n += 1
        drafts += 1
        a += n + 1
    return {"drafts": drafts, "accepted": sum(per_pos), "per_pos": per_pos}


def with_prompt_lookup(guesses: torch.Tensor, tokens: torch.Tensor, start: int, lookup) -> torch.Tensor:
    """The guess table as the serving proposer sends it with ``"prompt_lookup"``:
    from each anchor, a looked-up continuation alone where there is one
    (``pard_vllm.prompt_lookup``), else the draft's guesses (-1 = not sent)."""
    out = guesses.clone()
    context = tokens.numpy().astype("int32")
    for a in range(start, tokens.numel()):
        found = lookup.continuation(context[: a + 1], guesses.shape[1], int(guesses[a, 0]))
        if found:
            out[a] = -1
            out[a, :len(found)] = torch.tensor(found)
    return out


def ngram_table(tokens: torch.Tensor, k: int, start: int, min_n: int, max_n: int) -> torch.Tensor:
    """The guess table of vLLM's own ``ngram`` method alone (-1: no match, no drafts),
    for comparison. Imports numba (through vLLM's matcher): keep it out of a
    process that will start engines afterwards (see benchmarks/specbench_offline.py)."""
    from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens as match

    context = tokens.numpy().astype("int32")
    out = torch.full((tokens.numel(), k), -1, dtype=torch.long)
    for a in range(start, tokens.numel()):
        found = match(context[: a + 1], min_n, max_n, 1 << 30, k)
        out[a, :len(found)] = torch.from_numpy(found.astype("int64"))
    return out


def offline_tau(model, docs: list, k: int = 8, mask_token: int = 16, max_new: int = 128,
                head_ids: torch.Tensor | None = None, lookup=None, ngram: tuple[int, int] | None = None) -> dict:
    """Pooled tau over documents (``data.Doc``: prompt + answer), as vLLM pools its
    counters; with ``lookup`` (a ``PromptLookup``) as the default serving config drafts;
    with ``ngram`` (min, max) vLLM's n-gram method alone instead of the draft."""
    drafts, per_pos = 0, [0] * k
    for d in docs:
        last = min(d.tokens.numel() - 1, d.loss_from + max_new)
        if ngram is not None:
            g = ngram_table(d.tokens[: last + 1], k, d.loss_from, *ngram)
        else:
            g = draft_guesses(model, d.tokens[: last + 1], k, mask_token, head_ids)
        if lookup is not None:
            g = with_prompt_lookup(g, d.tokens[: last + 1], d.loss_from, lookup)
        r = replay(g, d.tokens[: last + 1], d.loss_from, max_new)
        drafts += r["drafts"]
        per_pos = [x + y for x, y in zip(per_pos, r["per_pos"])]
    return {"tau": 1 + sum(per_pos) / max(1, drafts), "k": k, "drafts": drafts, "docs": len(docs),
            "acceptance_per_pos": [x / max(1, drafts) for x in per_pos]}


def heldout_docs(data: str, n: int | None = None) -> list:
    """Answers whose prompt ends in the first token the target wrote (``Doc.loss_from``)."""
    from pard_vllm.training.data import make_docs
    from pard_vllm.training.distill import load_shards

    docs = make_docs(load_shards(data), seq_len=1 << 16)
    return docs[:n] if n else docs


def load_for_eval(draft: str, head_vocab: str = "draft"):
    """The draft (fp32, its own config's pard_token) and its head ids (None = full output layer)."""
    from safetensors import safe_open

    from pard_vllm.head_vocab import read_head_vocab
    from pard_vllm.training.model import load_draft, set_pard_attention

    weights = sorted(Path(draft).glob("*.safetensors"))
    if not (Path(draft) / "config.json").is_file() or not weights:
        raise SystemExit(f"error: '{draft}' is not a draft folder (config.json + *.safetensors); "
                         "pass a training output or the draft `pard-vllm prepare --json` prints")
    def has_embeddings(path) -> bool:
        with safe_open(str(path), "pt") as f:
            return "model.embed_tokens.weight" in f.keys()

    if not any(has_embeddings(w) for w in weights):
        raise SystemExit(f"error: '{draft}' ships without embeddings (weights-only export); pass the "
                         "full draft `pard-vllm prepare --json` prints instead")
    model = load_draft(draft).eval()
    set_pard_attention(model)
    cfg = json.loads((Path(draft) / "config.json").read_text())
    ids = read_head_vocab(draft) if head_vocab == "draft" else None
    return model, int(cfg.get("pard_token", 16)), (torch.tensor(ids) if ids else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", required=True, help="a full draft folder (e.g. runs/pard-2l, or the one "
                    "`pard-vllm prepare --json` prints as draft)")
    ap.add_argument("--data", required=True, help="held-out answers written by `pard-vllm distill` (greedy)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--n", type=int, help="only the first N answers")
    ap.add_argument("--max-tokens", type=int, default=128, help="output tokens per answer, as in evaluate.py")
    ap.add_argument("--head-vocab", choices=["draft", "full"], default="draft")
    ap.add_argument("--prompt-lookup", type=int, default=0, metavar="MAX_N",
                    help="replay the serving default's prompt lookup with this prompt_lookup_max "
                         "(e.g. 8; 0 = the draft alone)")
    ap.add_argument("--ngram", metavar="MIN,MAX", help="instead of the draft: vLLM's ngram method with "
                    "these prompt_lookup_min/max (e.g. 1,4), for comparison")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    ngram = tuple(int(x) for x in args.ngram.split(",")) if args.ngram else None
    if ngram is not None and (len(ngram) != 2 or not 1 <= ngram[0] <= ngram[1]):
        ap.error("--ngram takes MIN,MAX with 1 <= MIN <= MAX, e.g. 1,4")
    model, mask, ids = load_for_eval(args.draft, args.head_vocab)
    lookup = None
    if args.prompt_lookup:
        from pard_vllm.prompt_lookup import PromptLookup

        lookup = PromptLookup(args.prompt_lookup)
    res = offline_tau(model, heldout_docs(args.data, args.n), args.k, mask, args.max_tokens, ids, lookup, ngram)
    res.update(draft=args.draft, data=args.data, head_vocab=args.head_vocab if ids is not None else "full",
               prompt_lookup=args.prompt_lookup, ngram=args.ngram)
    print(json.dumps(res))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
