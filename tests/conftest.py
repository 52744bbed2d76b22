"""Shared fixtures: the embedded default models, built once per machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Engines on a 2-core CPU: keep vLLM's log noise and thread fights down.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pard_vllm.server import CPU_KV_CACHE_BYTES  # noqa: E402

ENGINE_KW = dict(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=CPU_KV_CACHE_BYTES,
                 max_model_len=1024, seed=0)


@pytest.fixture(scope="session")
def embedded() -> dict[str, str]:
    from pard_vllm.prepare import prepare

    return prepare()


def draft_variant(src: str, dest: Path, drop=(), **changes) -> str:
    """A copy of a draft folder (weights symlinked) with config.json edited."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in Path(src).iterdir():
        if item.name != "config.json":
            (dest / item.name).symlink_to(item)
    cfg = json.loads((Path(src) / "config.json").read_text())
    for key in drop:
        cfg.pop(key, None)
    cfg.update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return str(dest)


def head_vocab_variant(src: str, dest: Path, text_or_ids) -> str:
    """A draft variant whose output layer covers only the ids of a text (or an id list)."""
    from transformers import AutoTokenizer

    from pard_vllm.head_vocab import HEAD_VOCAB_FILE, write_head_vocab

    draft = draft_variant(src, dest, drop=("pard_head_vocab",))
    (dest / HEAD_VOCAB_FILE).unlink(missing_ok=True)
    ids = text_or_ids
    if isinstance(text_or_ids, str):
        ids = AutoTokenizer.from_pretrained(src).encode(text_or_ids)
    ids = list(dict.fromkeys(list(ids) + [json.loads((Path(src) / "config.json").read_text())["eos_token_id"]]))
    write_head_vocab(draft, ids, 0.0, source="test")
    return draft


from pard_vllm.server import shutdown_engine as shutdown  # noqa: E402,F401
