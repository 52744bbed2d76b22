"""Export a trained draft small enough to ship in the repository.

A draft trained with frozen tied embeddings (``--head frozen`` or ``sampled``) holds
exactly the target's embedding matrix, which is most of its size (28M of 35M
parameters for SmolLM2). So we ship only the draft's own weights (decoder layers +
final norm) in bf16, and ``pard_vllm.prepare`` re-attaches the target's embeddings
at prepare time. The export refuses a draft whose embeddings differ from the
target's: dropping them would silently change the model.

    pard-vllm export-draft --draft runs/pard-2l --out pard_vllm/drafts/smollm2-135m-pard

Writes ``model.safetensors`` (bf16, no ``embed_tokens``/``lm_head``), ``config.json``
(the draft's, with ``pard_train`` provenance: step, hours, the training config and an
equivalent command line) and ``PROVENANCE.md``.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from pathlib import Path

EMBED = "model.embed_tokens.weight"
DROPPED = (EMBED, "lm_head.weight")
MAX_BYTES = 20 * 1024 * 1024


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_draft(src: Path) -> tuple[dict, dict]:
    """(config, tensors) read consistently while a trainer may be rewriting ``src``."""
    from safetensors.torch import load_file

    weights = src / "model.safetensors"
    for _ in range(5):
        before = (weights.stat().st_mtime_ns, (src / "config.json").stat().st_mtime_ns)
        cfg = json.loads((src / "config.json").read_text())
        tensors = load_file(weights)
        after = (weights.stat().st_mtime_ns, (src / "config.json").stat().st_mtime_ns)
        if before == after and time.time() - after[0] / 1e9 > 2:
            return cfg, tensors
        time.sleep(5)
    raise SystemExit(f"error: {src} keeps changing while being read; try again")


def _train_record(src: Path) -> dict:
    """The training config from ``checkpoint.pt`` (if any) and an equivalent command line."""
    ckpt = src / "checkpoint.pt"
    if not ckpt.is_file():
        return {}
    import torch

    c = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    config, state = dict(c.get("config", {})), dict(c.get("state", {}))
    rec = {"train_config": config, "real_tokens": state.get("real_tokens")}
    rec["train_command"] = train_command(config)
    meta = sorted(Path(config.get("data", "")).glob("*-meta.json")) if config.get("data") else []
    if meta:
        # A training folder may link shards of several distillations (its meta files are
        # links too): record the folder each one was written to.
        rec["distill"] = [dict(json.loads(m.read_text()), out=_relative(m.resolve().parent)) for m in meta]
    return rec


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (commands run from the repo root)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def inherited_layer_ids(record: dict | None) -> list[int] | None:
    """The target layers a continued draft was first cut from: continued runs keep all
    layers, so the ids live in the earliest ``pard_train`` record of the chain that has them."""
    while record and record.get("layer_ids") is None:
        record = record.get("continued_from")
    return record.get("layer_ids") if record else None


def train_command(config: dict) -> str:
    """``pard-vllm train`` flags that differ from the CLI defaults (the embedded target
    path is left out: it is the default ``--draft``)."""
    import argparse

    from pard_vllm.prepare import TARGET_NAME, cache_dir
    from pard_vllm.training.cli import add_training_commands

    sub = argparse.ArgumentParser().add_subparsers(dest="cmd")
    add_training_commands(sub)
    train = sub.choices["train"]
    parts = ["pard-vllm", "train"]
    for action in train._actions:
        if not action.option_strings or action.dest not in config or action.dest == "help":
            continue
        value = config[action.dest]
        if action.dest in ("draft", "target") and str(value).startswith(str(cache_dir())):
            if Path(value).name == TARGET_NAME:
                continue  # the embedded target: the default
            # another cached model (e.g. the previously shipped draft, as `pard-vllm prepare` builds
            # it): kept as is, the path `pard-vllm prepare --json` prints on a default setup
        if value == action.default or value is None:
            continue
        flag = max(action.option_strings, key=len)
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def _check_embeddings(tensors: dict, target: str | None) -> None:
    from safetensors import safe_open

    if target is None:
        from pard_vllm.prepare import prepare_target

        target = prepare_target()
    with safe_open(str(Path(target) / "model.safetensors"), "pt") as f:
        ref = f.get_tensor(EMBED)
    emb = tensors[EMBED]
    if emb.shape != ref.shape or not bool((emb.float() == ref.float()).all()):
        raise SystemExit(f"error: the draft's embeddings differ from the target's ({target}); it was not "
                         "trained with frozen embeddings, so they cannot be left out of the export")


def export_draft(draft: str, out: str, target: str | None = None, command: str | None = None) -> dict:
    import torch
    from safetensors.torch import save_file

    src, dst = Path(draft), Path(out)
    cfg, tensors = _read_draft(src)
    if not cfg.get("tie_word_embeddings", False):
        raise SystemExit("error: only drafts with tied embeddings can be exported without them")
    _check_embeddings(tensors, target)
    own = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items() if k not in DROPPED}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(own, str(dst / "model.safetensors"), metadata={"format": "pt"})
    size = (dst / "model.safetensors").stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"error: {size / 2**20:.1f} MiB exported, over the {MAX_BYTES // 2**20} MiB limit")
    train = dict(cfg.get("pard_train", {}))
    train.update(_train_record(src))
    if train.get("layer_ids") is None:
        train["layer_ids"] = inherited_layer_ids(train.get("continued_from"))
    cfg.pop("torch_dtype", None)
    cfg.update(dtype="bfloat16", pard_train=train, pard_export={
        "embeddings": "not shipped: the target's model.embed_tokens.weight, tied (equal at export)",
        "params": sum(v.numel() for v in own.values()),
        "sha256": sha256(dst / "model.safetensors"),
        "command": command,
    })
    cfg.pop("_model_name_or_path", None)
    from pard_vllm.head_vocab import CONFIG_KEY, read_head_vocab

    kept = read_head_vocab(dst)  # a head vocabulary made for an earlier export stays valid
    if kept is not None:
        cfg[CONFIG_KEY] = len(kept)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (dst / "PROVENANCE.md").write_text(_provenance(cfg, size))
    return {"out": str(dst), "bytes": size, "step": train.get("step"), "params": cfg["pard_export"]["params"]}


def _provenance(cfg: dict, size: int) -> str:
    t, e = cfg["pard_train"], cfg["pard_export"]
    lines = [
        "# Provenance of this draft", "",
        "Written by `pard-vllm export-draft`; do not edit by hand (re-run the export).", "",
        f"- step {t.get('step')}, {t.get('train_seconds', 0) / 3600:.2f} training hours, "
        f"{t.get('real_tokens')} real tokens seen, layers {t.get('layer_ids')} of the target",
        f"- {e['params']} parameters (decoder layers + final norm), bf16, {size} bytes, sha256 {e['sha256']}",
        "- embeddings: the target's, re-attached (tied) by `pard_vllm.prepare`; mask token "
        f"{cfg.get('pard_token')}, rope_theta {cfg.get('rope_theta')}", "",
        "Commands (run from the repository root; prompt generation is in pard_vllm/training/README.md):", "",
        "```bash",
    ]
    earlier, total_h = t.get("continued_from"), t.get("train_seconds", 0) / 3600
    while earlier:  # a run that started from an earlier trained draft: its history first
        total_h += earlier.get("train_seconds", 0) / 3600
        lines.insert(4, f"- continued from a draft trained for {earlier.get('step')} steps, "
                        f"{earlier.get('train_seconds', 0) / 3600:.2f} hours, {earlier.get('real_tokens')} real tokens "
                        f"(`{earlier.get('train_command', '?')}`)")
        earlier = earlier.get("continued_from")
    lines.insert(4, f"- {total_h:.2f} training hours in all")
    for d in t.get("distill", []):
        flags = ["--prompts", d["prompts"], "--max-tokens", str(d["max_tokens"]), "--top-logits", str(d["top_logits"])]
        if d.get("temperature"):
            flags += ["--temperature", str(d["temperature"]), "--num-samples", str(d["num_samples"])]
        if d.get("seed"):
            flags += ["--seed", str(d["seed"])]
        if d.get("limit"):  # only the first N prompts were distilled
            flags += ["--limit", str(d["limit"])]
        if d.get("dtype", "float32") != "float32":
            flags += ["--dtype", d["dtype"]]
        lines.append("pard-vllm distill " + shlex.join(flags + ["--out", d.get("out") or t["train_config"]["data"]]))
    outs = {d.get("out") for d in t.get("distill", [])} - {None, t["train_config"]["data"]}
    if outs:
        lines.append(f"# {t['train_config']['data']} holds links to the shards and meta files of {', '.join(sorted(outs))}")
    if t.get("train_command"):
        lines.append(t["train_command"] + "  # equivalent to the run's command; read from its checkpoint")
    if e.get("command"):
        lines.append(e["command"])
    lines += ["```", ""]
    return "\n".join(lines)
