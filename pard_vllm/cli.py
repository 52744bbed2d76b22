"""``pard-vllm``: prepare the embedded default, serve it, show it working.

    pard-vllm prepare [--json] [--force]   build SmolLM2 + its PARD draft (cached)
    pard-vllm serve [-k 8] [VLLM ARGS...]  `vllm serve` with those defaults
    pard-vllm demo                         serve, ask, compare with plain decoding
    pard-vllm distill --target T --prompts FILE --out DATA   target answers as training data
    pard-vllm train --draft HF_DIR --data DATA --out DIR     train a PARD draft
    pard-vllm export-draft --draft DIR --out DIR             a trained draft's own layers, to ship
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys


def _prepare(args) -> int:
    from pard_vllm.prepare import prepare

    paths = prepare(force=args.force)
    if args.json:
        print(json.dumps(paths))
    else:
        print(f"target: {paths['target']}\ndraft:  {paths['draft']}")
    return 0


def _serve(args, extra: list[str]) -> int:
    from pard_vllm.prepare import prepare
    from pard_vllm.server import serve_command

    paths = prepare()
    target = args.target or paths["target"]
    draft = None if args.no_spec else (args.draft or paths["draft"])
    cmd = serve_command(target, draft, k=args.k, dtype=args.dtype, port=args.port,
                        eager=not args.compile, extra_args=extra)
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


def _demo(args) -> int:
    from pard_vllm.demo import run_demo

    return run_demo(k=args.k, dtype=args.dtype, max_tokens=args.max_tokens, compile=args.compile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pard-vllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="build the embedded default target and draft")
    p.add_argument("--json", action="store_true", help='print {"target": DIR, "draft": DIR}')
    p.add_argument("--force", action="store_true", help="rebuild even if cached")

    def engine_opts(p):
        p.add_argument("-k", type=int, default=8, help="draft tokens per step (default 8)")
        p.add_argument("--dtype", default="float32", help="float32 (default; exact on CPU) or bfloat16")
        p.add_argument("--compile", action="store_true",
                       help="let vLLM torch.compile (faster decoding, ~2 min longer start)")

    s = sub.add_parser("serve", help="vllm serve the embedded default with PARD; extra args go to vllm")
    engine_opts(s)
    s.add_argument("--target", help="target model (default: embedded SmolLM2)")
    s.add_argument("--draft", help="PARD draft (default: embedded draft)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--no-spec", action="store_true", help="serve without speculative decoding")

    d = sub.add_parser("demo", help="serve with PARD, send real requests, compare with plain decoding")
    engine_opts(d)
    d.add_argument("--max-tokens", type=int, default=128)

    from pard_vllm.training.cli import add_training_commands

    add_training_commands(sub)

    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "prepare":
        return _prepare(args)
    if args.cmd == "serve":
        return _serve(args, extra)
    if hasattr(args, "run"):  # the training commands (pard_vllm.training.cli)
        return args.run(args)
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
