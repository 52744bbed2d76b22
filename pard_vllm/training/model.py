"""The draft as a trainable Hugging Face model: construction, the PARD attention hook, export.

Why a hook instead of a model of our own: the draft must come out as an ordinary HF
Llama checkpoint that vLLM loads unchanged, so training runs the very same
``LlamaForCausalLM`` modules. Only the attention function differs: we register a
transformers attention implementation named ``"pard"`` that ignores the dense mask and
calls ``pard_vllm.kernels.pard_attention`` with a ``PardPlan`` handed down through the
forward's ``**kwargs`` (``pard_plan=``). Building the plan once per batch and reusing it
across layers keeps the integer pre-pass out of the per-layer cost.

``attention_backend("dense")`` switches the hook to a boolean mask + torch SDPA built
straight from the PARD rule; it exists to cross-check the kernel and as a fallback.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

_BACKEND = {"name": "kernel"}


def attention_backend(name: str | None = None) -> str:
    """Get or set the hook's backend: "kernel" (pard_attention) or "dense" (mask + SDPA)."""
    if name is not None:
        if name not in ("kernel", "dense"):
            raise ValueError(f"attention backend must be 'kernel' or 'dense', got {name!r}")
        _BACKEND["name"] = name
    return _BACKEND["name"]


class PardLayout:
    """What the hook needs for one batch: ids per packed token and, lazily, the kernel plan."""

    def __init__(self, block_ids: torch.Tensor, pos_ids: torch.Tensor, doc_ids: torch.Tensor):
        self.block_ids, self.pos_ids, self.doc_ids = block_ids, pos_ids, doc_ids
        self._plan = None
        self._mask = None

    def plan(self):
        if self._plan is None:
            from pard_vllm.kernels import build_plan

            self._plan = build_plan(self.block_ids, self.pos_ids, self.doc_ids)
        return self._plan

    def dense_mask(self) -> torch.Tensor:
        """``[B, 1, T, T]`` boolean: query (b,p) sees key (b',p') iff same document and
        (b'==0 and p'<=p-b) or (1<=b'<=b and p'==p-b+b')."""
        if self._mask is None:
            b, p, d = (x if x.dim() == 2 else x[None] for x in (self.block_ids, self.pos_ids, self.doc_ids))
            bq, pq, dq = b[:, :, None], p[:, :, None], d[:, :, None]
            bk, pk, dk = b[:, None, :], p[:, None, :], d[:, None, :]
            real = (bk == 0) & (pk <= pq - bq)
            diag = (bk >= 1) & (bk <= bq) & (pk == pq - bq + bk)
            self._mask = ((real | diag) & (dq == dk))[:, None]
        return self._mask


def _pard_attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       pard_layout: PardLayout | None = None, **kwargs):
    if pard_layout is None:
        raise RuntimeError("the 'pard' attention needs pard_layout=PardLayout(...) in the forward call")
    # Under bf16 autocast the rotary embedding hands back fp32 q/k next to a bf16 v.
    query, key = query.to(value.dtype), key.to(value.dtype)
    if _BACKEND["name"] == "dense":
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=pard_layout.dense_mask(), scale=scaling)
    else:
        from pard_vllm.kernels import pard_attention

        out = pard_attention(query, key, value, None, None, scale=scaling, plan=pard_layout.plan())
    return out.transpose(1, 2).contiguous(), None


def register_pard_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("pard", _pard_attention_fn)


def load_draft(src: str, layer_ids: list[int] | None = None, dtype=torch.float32):
    """A HF causal LM from ``src`` with only ``layer_ids`` of its decoder layers (all if None).

    Cutting layers from the target gives a draft that shares its tokenizer, embeddings and
    residual-stream geometry, which is why a few layers + the final norm already predict
    the next token a little, and why the tied embeddings can stay frozen.
    """
    from transformers import AutoModelForCausalLM

    register_pard_attention()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    if layer_ids is not None:
        n = len(model.model.layers)
        bad = [i for i in layer_ids if not -n <= i < n]
        if bad:
            raise SystemExit(f"error: --layer-ids {bad} out of range for a {n}-layer model")
        kept = [model.model.layers[i] for i in layer_ids]
        model.model.layers = torch.nn.ModuleList(kept)
        for new_idx, layer in enumerate(kept):
            layer.self_attn.layer_idx = new_idx
        model.config.num_hidden_layers = len(kept)
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = [model.config.layer_types[i] for i in layer_ids]
    model.config.use_cache = False
    return model


def grow_draft(model, source: str, layer_ids: list[int]) -> None:
    """Append ``layer_ids`` decoder layers of ``source`` (the target) to a trained draft.

    The new layers' output projections (attention ``o_proj``, MLP ``down_proj``) are
    zeroed, so each adds nothing to the residual stream at first: the grown draft
    computes exactly what the trained one did (its acceptance is kept, not reset) and
    training decides what the extra depth adds. The zeroed matrices get gradients from
    the first step; the rest of each new layer learns once they are non-zero.

    E.g. a draft trained from the target's layers [0, 1], grown by [2, 3], is a 4-layer
    draft whose first forward equals the 2-layer one's.
    """
    from transformers import AutoConfig

    n = AutoConfig.from_pretrained(source).num_hidden_layers
    bad = [i for i in layer_ids if not 0 <= i < n]
    if bad:
        raise SystemExit(f"error: --grow would copy layers {bad}, but {source} has {n}; grow by fewer layers")
    donor = load_draft(source, layer_ids, dtype=model.dtype)  # the cut, renumbered from 0
    first = len(model.model.layers)
    for offset, layer in enumerate(donor.model.layers):
        layer.self_attn.layer_idx = first + offset
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
        model.model.layers.append(layer.to(model.device))
    model.config.num_hidden_layers = len(model.model.layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types) + list(donor.config.layer_types)


def set_pard_attention(model) -> None:
    register_pard_attention()
    model.set_attn_implementation("pard")


def rope_theta_of(src: str) -> float | None:
    cfg = json.loads((Path(src) / "config.json").read_text())
    return cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")


def save_draft(model, out: str | Path, tokenizer_src: str, mask_token: int, k: int,
               rope_theta: float | None, extra: dict | None = None) -> None:
    """Write a HF checkpoint vLLM serves as is with ``"method": "pard"``.

    config.json gets ``pard_token`` and ``spd_type`` (how the plugin recognises a PARD
    draft) and an explicit ``rope_theta``: vLLM falls back to 10000 when it is missing,
    which would silently break a draft trained with another base.
    """
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    impl = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"  # never persist our training-only hook
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        model.config._attn_implementation = impl
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("attn_implementation", None)
    cfg.update(pard_token=int(mask_token), spd_type="pard", pard_k=int(k), use_cache=True, **(extra or {}))
    if rope_theta:
        cfg["rope_theta"] = float(rope_theta)
        cfg.setdefault("rope_parameters", {})["rope_theta"] = float(rope_theta)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
