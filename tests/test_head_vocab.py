"""The draft's output layer restricted to the target's frequent ids (pard_vllm.head_vocab)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import draft_variant
from pard_vllm.config import PardConfigError, check_vocab_size, resolve_pard_config
from pard_vllm.head_vocab import HEAD_VOCAB_FILE, SubsetHead, rank_ids, read_head_vocab, write_head_vocab


def test_rank_ids_docstring_example():
    ids, coverage = rank_ids([[5, 9, 5, 2], [5, 9, 7]], size=3, always=[2])
    assert ids == [5, 9, 2]
    assert coverage == pytest.approx(6 / 7)


def test_forced_ids_join_even_when_never_seen():
    ids, _ = rank_ids([[1, 1, 3]], size=2, always=[99])
    assert ids == [1, 99]


def _fake_model(vocab=50, dim=8, scale=1.0, soft_cap=None):
    head = torch.nn.Linear(dim, vocab, bias=False)
    head.quant_method = SimpleNamespace()
    head.tp_size = 1
    proc = SimpleNamespace(scale=scale, soft_cap=soft_cap, org_vocab_size=vocab)
    return SimpleNamespace(lm_head=head, logits_processor=proc)


@pytest.mark.parametrize("scale, soft_cap", [(1.0, None), (0.5, 3.0)])
def test_subset_logits_equal_full_logits_at_kept_ids(scale, soft_cap):
    torch.manual_seed(0)
    model = _fake_model(scale=scale, soft_cap=soft_cap)
    ids = [7, 3, 41, 0]
    head = SubsetHead(model, ids)
    h = torch.randn(5, 8)
    full = h @ model.lm_head.weight.detach().T
    if soft_cap is not None:
        full = torch.tanh(full / soft_cap) * soft_cap
    full = full * scale
    torch.testing.assert_close(head.logits(h), full[:, ids])
    scattered = head.full_logits(h)
    torch.testing.assert_close(scattered[:, ids], full[:, ids])
    outside = torch.ones(50, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(scattered[:, outside]).all()
    # The draft distribution is the subset softmax, zero elsewhere.
    torch.testing.assert_close(scattered.softmax(-1)[:, ids], head.logits(h).softmax(-1))
    # Greedy over the subset maps back to target ids.
    assert head.to_target(head.logits(h).argmax(-1)).tolist() == [ids[j] for j in full[:, ids].argmax(-1).tolist()]


def test_subset_head_uses_vllms_cpu_gemm(monkeypatch):
    """On a CPU the subset rows go through the GEMM vLLM prepacks for its own
    layers (oneDNN here; torch's linear was ~10x slower at draft sizes), and
    the logits still match the full head's at realistic sizes."""
    from vllm.model_executor.layers import utils as layer_utils
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()
    dispatched = []
    original = layer_utils.dispatch_cpu_unquantized_gemm
    monkeypatch.setattr(layer_utils, "dispatch_cpu_unquantized_gemm",
                        lambda layer, remove_weight: dispatched.append(layer.weight.shape) or original(layer, remove_weight))
    torch.manual_seed(0)
    model = _fake_model(vocab=4096, dim=576)
    ids = torch.randperm(4096)[:1024].tolist()
    head = SubsetHead(model, ids)
    assert dispatched == [torch.Size([1024, 576])]
    h = torch.randn(4, 576)
    full = h @ model.lm_head.weight.detach().T
    torch.testing.assert_close(head.logits(h), full[:, ids], rtol=1e-4, atol=1e-4)
    assert head.to_target(head.logits(h).argmax(-1)).tolist() == [ids[j] for j in full[:, ids].argmax(-1).tolist()]


def test_unsupported_heads_are_named():
    model = _fake_model()
    assert "quantized" in SubsetHead.unsupported_reason(model)
    model.lm_head.quant_method = type("UnquantizedEmbeddingMethod", (), {})()
    assert SubsetHead.unsupported_reason(model) is None
    model.lm_head.tp_size = 2
    assert "tensor-parallel" in SubsetHead.unsupported_reason(model)


def _with_head_vocab(embedded, tmp_path, ids):
    draft = draft_variant(embedded["draft"], tmp_path / "d", drop=("pard_head_vocab",))
    (tmp_path / "d" / HEAD_VOCAB_FILE).unlink(missing_ok=True)  # the symlinked shipped one, if any
    if ids is not None:
        write_head_vocab(draft, ids, 0.5, source="test")
    return draft


def test_head_vocab_resolution(embedded, tmp_path):
    draft = _with_head_vocab(embedded, tmp_path, [5, 9, 2, 7])
    spec = {"method": "pard", "model": draft, "num_speculative_tokens": 4}
    assert resolve_pard_config(spec)[1].head_vocab_ids == (5, 9, 2, 7)
    assert resolve_pard_config({**spec, "head_vocab": 2})[1].head_vocab_ids == (5, 9)
    assert resolve_pard_config({**spec, "head_vocab": 0})[1].head_vocab_ids is None
    assert json.loads((tmp_path / "d" / "config.json").read_text())["pard_head_vocab"] == 4
    assert read_head_vocab(draft) == [5, 9, 2, 7]
    with pytest.raises(PardConfigError, match="exceeds the 4 ids"):
        resolve_pard_config({**spec, "head_vocab": 5})
    with pytest.raises(PardConfigError, match="head_vocab"):
        resolve_pard_config({**spec, "head_vocab": -1})


def test_head_vocab_without_file_names_the_command(embedded, tmp_path):
    draft = _with_head_vocab(embedded, tmp_path, None)
    spec = {"method": "pard", "model": draft, "num_speculative_tokens": 4}
    assert resolve_pard_config(spec)[1].head_vocab_ids is None
    with pytest.raises(PardConfigError, match="pard-vllm head-vocab"):
        resolve_pard_config({**spec, "head_vocab": 8})


def test_head_vocab_ids_outside_vocab(embedded, tmp_path):
    draft = _with_head_vocab(embedded, tmp_path, [1, 2])
    path = tmp_path / "d" / HEAD_VOCAB_FILE
    data = json.loads(path.read_text())
    data["ids"] = [1, 10**6]
    path.write_text(json.dumps(data))
    _, opts = resolve_pard_config({"method": "pard", "model": draft, "num_speculative_tokens": 4})
    with pytest.raises(PardConfigError, match="outside the vocabulary"):
        check_vocab_size(49152, opts)


def test_free_places_go_to_frequent_alternatives():
    ids, coverage = rank_ids([[4, 4, 6]], size=4, candidates=[[8, 9, 9], [9, 4]])
    assert ids == [4, 6, 9, 8]
    assert coverage == 1.0


def test_head_vocab_command_writes_a_servable_subset(embedded, tmp_path):
    from pard_vllm.cli import main

    data = tmp_path / "data"
    data.mkdir()
    shard = {"prompt_ids": [torch.tensor([1, 2], dtype=torch.int32)] * 2,
             "response_ids": [torch.tensor([40, 41, 40], dtype=torch.int32), torch.tensor([42, 40], dtype=torch.int32)],
             "topk_ids": [torch.tensor([[40, 50], [41, 50], [40, 51]], dtype=torch.int32),
                          torch.tensor([[42, 50], [40, 52]], dtype=torch.int32)],
             "topk_logprobs": [torch.zeros(3, 2), torch.zeros(2, 2)]}
    torch.save(shard, data / "greedy-shard-00000.pt")
    draft = _with_head_vocab(embedded, tmp_path, None)
    assert main(["head-vocab", "--data", str(data), "--draft", draft, "--size", "5"]) == 0
    assert read_head_vocab(draft) == [40, 41, 42, 50, 2]  # answers, then alternatives, eos always
    spec = {"method": "pard", "model": draft, "num_speculative_tokens": 4}
    assert resolve_pard_config(spec)[1].head_vocab_ids == (40, 41, 42, 50, 2)
