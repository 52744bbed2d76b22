"""The trained draft that ships in pard_vllm/drafts/ and how prepare() completes it (no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pard_vllm.prepare import SHIPPED_DRAFT, _draft_stamp

EMBED = "model.embed_tokens.weight"


def test_shipped_draft_is_small_and_has_only_its_own_weights():
    files = [p for p in SHIPPED_DRAFT.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "PROVENANCE.md"}
    assert sum(p.stat().st_size for p in files) <= 20 * 1024 * 1024
    shipped = load_file(SHIPPED_DRAFT / "model.safetensors")
    assert EMBED not in shipped and "lm_head.weight" not in shipped
    assert {t.dtype for t in shipped.values()} == {torch.bfloat16}
    cfg = json.loads((SHIPPED_DRAFT / "config.json").read_text())
    assert cfg["pard_token"] == 16 and cfg["spd_type"] == "pard" and cfg["tie_word_embeddings"]
    assert cfg["rope_theta"] == 100000.0
    assert cfg["pard_train"]["step"] > 0 and cfg["pard_export"]["sha256"]
    assert len({k.split(".")[2] for k in shipped if k.startswith("model.layers.")}) == cfg["num_hidden_layers"]


def test_prepare_builds_the_trained_draft(embedded):
    draft, target = Path(embedded["draft"]), Path(embedded["target"])
    shipped = load_file(SHIPPED_DRAFT / "model.safetensors")
    built = load_file(draft / "model.safetensors")
    assert set(built) == set(shipped) | {EMBED}
    for name, weight in shipped.items():
        assert built[name].dtype == torch.float32
        assert torch.equal(built[name].to(torch.bfloat16), weight), name
        assert torch.equal(built[name], weight.float()), name  # bf16 -> fp32 is exact
    target_embed = load_file(target / "model.safetensors")[EMBED]
    assert torch.equal(built[EMBED], target_embed)
    cfg = json.loads((draft / "config.json").read_text())
    assert cfg["pard_token"] == 16 and cfg["dtype"] == "float32" and cfg["rope_theta"] == 100000.0
    assert (draft / "tokenizer.json").read_bytes() == (target / "tokenizer.json").read_bytes()
    # a re-export of the shipped weights changes the stamp, so caches rebuild
    assert json.loads((draft / "pard_vllm_recipe.json").read_text()) == _draft_stamp()
    # the shipped head vocabulary (pard_vllm.head_vocab) travels with it, unchanged
    head = SHIPPED_DRAFT / "pard_head_vocab.json"
    assert head.is_file() and cfg["pard_head_vocab"] == len(json.loads(head.read_text())["ids"])
    assert (draft / head.name).read_bytes() == head.read_bytes()


def test_built_draft_loads_in_transformers_with_tied_head(embedded):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded["draft"], dtype=torch.float32)
    assert model.config.num_hidden_layers == 2
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 16, 16]])).logits
    assert torch.isfinite(logits).all()


def test_export_round_trip(embedded, tmp_path):
    """Exporting the prepared draft gives back the shipped weights bit for bit."""
    from pard_vllm.training.export import export_draft

    res = export_draft(embedded["draft"], str(tmp_path / "out"), target=embedded["target"])
    assert res["bytes"] <= 20 * 1024 * 1024
    again = load_file(tmp_path / "out" / "model.safetensors")
    shipped = load_file(SHIPPED_DRAFT / "model.safetensors")
    assert set(again) == set(shipped)
    assert all(torch.equal(again[k], shipped[k]) for k in shipped)
