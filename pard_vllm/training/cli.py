"""Argument parsing of ``pard-vllm distill`` and ``pard-vllm train`` (kept here so the main CLI stays small)."""

from __future__ import annotations


def _run_distill(args) -> int:
    from pard_vllm.training.distill import distill

    distill(args.target, args.prompts, args.out, max_tokens=args.max_tokens, temperature=args.temperature,
            num_samples=args.num_samples, top_logits=args.top_logits, shard_size=args.shard_size,
            dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed, limit=args.limit)
    return 0


def _run_train(args) -> int:
    from pard_vllm.training.train import TrainConfig, train

    cfg = TrainConfig(**{f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)})
    train(cfg)
    return 0


def _run_export(args) -> int:
    import shlex
    import sys

    from pard_vllm.training.export import export_draft

    cmd = shlex.join(["pard-vllm", "export-draft", "--draft", args.draft, "--out", args.out]
                     + (["--target", args.target] if args.target else []))
    res = export_draft(args.draft, args.out, target=args.target, command=cmd)
    print(f"export-draft: step {res['step']}, {res['params']} params, {res['bytes'] / 2**20:.1f} MiB -> {res['out']}",
          file=sys.stderr)
    return 0


def _run_head_vocab(args) -> int:
    import sys

    from pard_vllm.head_vocab import build_from_data

    path, coverage = build_from_data(args.data, args.draft, args.size)
    print(f"head-vocab: {args.size} ids cover {coverage:.2%} of the answer tokens in {args.data} -> {path}",
          file=sys.stderr)
    return 0


def add_training_commands(sub) -> None:
    d = sub.add_parser("distill", help="generate the target's answers (and top-k log-probs) as training data")
    d.add_argument("--target", help="target model (default: embedded SmolLM2)")
    d.add_argument("--prompts", required=True, help="JSONL of {\"prompt\": ...} or a text file, one prompt a line "
                   "(make one with `python -m pard_vllm.training.prompts`)")
    d.add_argument("--out", required=True, help="data folder (resumable: finished shards are skipped)")
    d.add_argument("--max-tokens", type=int, default=256)
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    d.add_argument("--num-samples", type=int, default=1, help="answers per prompt when temperature > 0")
    d.add_argument("--top-logits", type=int, default=0, help="also save the target's top-k log-probs per token")
    d.add_argument("--shard-size", type=int, default=256, help="prompts per generate call and per saved shard")
    d.add_argument("--dtype", default="float32")
    d.add_argument("--max-model-len", type=int, default=1024)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--limit", type=int, help="only the first N prompts")
    d.set_defaults(run=_with_default_target(_run_distill))

    t = sub.add_parser("train", help="train a PARD draft on distilled data (conditional drop, pard_attention)")
    t.add_argument("--draft", help="HF folder to start from: a draft, or the target itself with --layers N "
                   "(default: the embedded SmolLM2 target)")
    t.add_argument("--data", required=True, help="folder written by `pard-vllm distill`")
    t.add_argument("--out", required=True, help="output folder (a HF checkpoint vLLM serves with method pard)")
    t.add_argument("--k", type=int, default=8, help="parallel draft tokens trained (blocks)")
    t.add_argument("--layers", type=int, help="keep only the first N decoder layers of --draft")
    t.add_argument("--layer-ids", help="comma-separated decoder layers of --draft to keep, e.g. 0,1,29")
    t.add_argument("--grow", type=int, default=0, help="append N more of the target's layers (the ones after the "
                   "draft's) with zero-initialised outputs: a deeper draft that starts exactly where --draft is")
    t.add_argument("--cod-r", type=float, default=0.7, help="conditional-drop ratio (0 disables COD)")
    t.add_argument("--cod-min", type=float, default=0.2)
    t.add_argument("--loss", choices=["ce", "kd", "ce+kd"], default="ce")
    t.add_argument("--ce-weight", type=float, default=1.0, help="scale of the ce term (PARD-2 uses 0.1 with kd)")
    t.add_argument("--cat", action="store_true", help="weight each position's loss by the target's probability "
                   "of the tokens its masks stand for (PARD-2's CAT; needs --top-logits data)")
    t.add_argument("--head", choices=["full", "frozen", "sampled"], default="frozen",
                   help="output layer: full (train tied embeddings), frozen (tied embeddings fixed), "
                   "sampled (frozen, logits only over batch labels/top-k + sampled negatives)")
    t.add_argument("--negatives", type=int, default=2048, help="sampled negatives for --head sampled")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup", type=int, default=20)
    t.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--epochs", type=float, default=4.0)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--batch-size", type=int, default=4, help="packed rows per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--mask-token", type=int, help="mask id (default: the draft's pard_token, else 16 if unused)")
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="autocast dtype for the forward (weights and optimizer stay fp32)")
    t.add_argument("--save-every-min", type=float, default=5.0)
    t.add_argument("--eval-every-min", type=float, default=0.0,
                   help="measure tau with vLLM every N minutes (0 = never; see --eval-prompts)")
    t.add_argument("--eval-prompts", help="held-out prompts for the tau curve")
    t.add_argument("--eval-n", type=int, default=20)
    t.add_argument("--heldout-data", help="held-out answers from `pard-vllm distill` (prompts never trained "
                   "on): engine-free tau at every checkpoint, appended to OUT/curve.jsonl")
    t.add_argument("--heldout-n", type=int, default=20)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if present")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    t.set_defaults(run=_run_train)

    e = sub.add_parser("export-draft", help="write a trained draft's own layers (bf16, no embeddings) to ship")
    e.add_argument("--draft", required=True, help="trained draft folder (e.g. runs/pard-2l)")
    e.add_argument("--out", required=True, help="e.g. pard_vllm/drafts/smollm2-135m-pard")
    e.add_argument("--target", help="target whose embeddings the draft must equal (default: embedded SmolLM2)")
    e.set_defaults(run=_run_export)

    h = sub.add_parser("head-vocab", help="restrict a draft's output layer to the target's most frequent ids")
    h.add_argument("--data", required=True, help="folder written by `pard-vllm distill` (not benchmark prompts)")
    h.add_argument("--draft", required=True, help="draft folder to write pard_head_vocab.json into")
    h.add_argument("--size", type=int, default=8192, help="ids kept (end-of-sequence ids always are)")
    h.set_defaults(run=_run_head_vocab)


def _with_default_target(fn):
    def run(args):
        if not args.target:
            from pard_vllm.prepare import prepare

            args.target = prepare()["target"]
        return fn(args)

    return run
