"""Config parsing, PARD detection and one-line errors for bad input.

These go through vLLM's real config path (EngineArgs.create_engine_config,
which is what `vllm serve` and `LLM(...)` call) without starting an engine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import draft_variant
from pard_vllm.config import PardConfigError, resolve_pard_config, wants_pard
from pard_vllm.patches import OPTIONS_ATTR, SpeculativeConfigArgPatch


def engine_config(target: str, spec: dict):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=target, dtype="float32", gpu_memory_utilization=0.3,
                      max_model_len=1024, speculative_config=spec).create_engine_config()


def test_pard_method_becomes_parallel_draft_model(embedded):
    cfg = engine_config(embedded["target"], {"method": "pard", "model": embedded["draft"],
                                             "num_speculative_tokens": 8})
    spec = cfg.speculative_config
    assert spec.method == "draft_model" and spec.parallel_drafting
    assert spec.num_speculative_tokens == 8
    opts = getattr(spec, OPTIONS_ATTR)
    assert opts.mask_token_id == 16 and opts.draft_sampling == "greedy"


def test_pard_draft_detected_without_method(embedded):
    cfg = engine_config(embedded["target"], {"model": embedded["draft"], "num_speculative_tokens": 4})
    assert getattr(cfg.speculative_config, OPTIONS_ATTR).num_speculative_tokens == 4


def test_spd_type_alone_is_detected(embedded, tmp_path):
    # AMD's drafts carry spd_type; a draft may name its mask under another key.
    draft = draft_variant(embedded["draft"], tmp_path / "d", drop=("pard_token",), mask_token_id=16)
    assert wants_pard({"model": draft})
    _, opts = resolve_pard_config({"model": draft, "num_speculative_tokens": 3})
    assert opts.mask_token_id == 16


def test_native_parallel_drafting_is_left_to_vllm(embedded):
    cfg = engine_config(embedded["target"], {"method": "draft_model", "model": embedded["draft"],
                                             "num_speculative_tokens": 4, "parallel_drafting": True})
    assert getattr(cfg.speculative_config, OPTIONS_ATTR, None) is None


def test_plain_model_is_not_pard(embedded):
    assert not wants_pard({"model": embedded["target"]})
    assert not wants_pard({"method": "ngram", "num_speculative_tokens": 3})


def test_probabilistic_drafts_map_to_vllm(embedded):
    kwargs, opts = resolve_pard_config({"method": "pard", "model": embedded["draft"],
                                        "num_speculative_tokens": 8, "draft_sampling": "probabilistic"})
    assert kwargs["draft_sample_method"] == "probabilistic"
    assert kwargs["parallel_drafting"] is True and kwargs["method"] == "draft_model"


@pytest.mark.parametrize("spec, fragment", [
    ({"num_speculative_tokens": 8, "bogus_key": 1}, "unknown key 'bogus_key'"),
    ({"num_speculative_tokens": 0}, "from 1 to 32"),
    ({"num_speculative_tokens": 33}, "from 1 to 32"),
    ({"num_speculative_tokens": 8, "draft_sampling": "beam"}, "draft_sampling"),
    ({"num_speculative_tokens": 8, "parallel_drafting": False}, "always drafts in parallel"),
    ({"num_speculative_tokens": 8, "prompt_lookup_max": 1}, "prompt_lookup_max must be an integer from 2"),
    ({"num_speculative_tokens": 8, "prompt_lookup": "yes please"}, "invalid 'prompt_lookup'"),
])
def test_bad_options_are_one_line_errors(embedded, spec, fragment):
    with pytest.raises(PardConfigError) as err:
        engine_config(embedded["target"], {"method": "pard", "model": embedded["draft"], **spec})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_missing_path(embedded, tmp_path):
    with pytest.raises(PardConfigError, match="does not exist"):
        engine_config(embedded["target"], {"method": "pard", "model": str(tmp_path / "nope"),
                                           "num_speculative_tokens": 8})


def test_missing_model_key(embedded):
    with pytest.raises(PardConfigError, match='needs "model"'):
        engine_config(embedded["target"], {"method": "pard", "num_speculative_tokens": 8})


def test_draft_without_mask_token(embedded, tmp_path):
    draft = draft_variant(embedded["draft"], tmp_path / "d", drop=("pard_token",))
    with pytest.raises(PardConfigError, match="no PARD mask token"):
        engine_config(embedded["target"], {"method": "pard", "model": draft, "num_speculative_tokens": 8})


def test_mask_token_outside_vocab(embedded, tmp_path):
    draft = draft_variant(embedded["draft"], tmp_path / "d", pard_token=10**6)
    with pytest.raises(PardConfigError, match="outside its vocabulary"):
        engine_config(embedded["target"], {"method": "pard", "model": draft, "num_speculative_tokens": 8})


def test_vocab_size_mismatch(embedded, tmp_path):
    draft = draft_variant(embedded["draft"], tmp_path / "d", vocab_size=32000)
    with pytest.raises(PardConfigError, match="vocabulary size 32000"):
        engine_config(embedded["target"], {"method": "pard", "model": draft, "num_speculative_tokens": 8})


def test_tokenizer_mismatch_same_size(embedded, tmp_path):
    # Same vocabulary size, but two tokens swap ids: drafts would be misread.
    dest = tmp_path / "d"
    draft_variant(embedded["draft"], dest)
    tok_path = dest / "tokenizer.json"
    tok = json.loads(Path(embedded["draft"], "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "hello", "world"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok_path.unlink()
    tok_path.write_text(json.dumps(tok))
    with pytest.raises(PardConfigError, match="different tokenizer"):
        engine_config(embedded["target"], {"method": "pard", "model": str(dest), "num_speculative_tokens": 8})


def test_pard2_draft_is_refused(embedded, tmp_path):
    draft = draft_variant(embedded["draft"], tmp_path / "d", spd_type="pard2")
    with pytest.raises(PardConfigError, match="PARD-2"):
        engine_config(embedded["target"], {"method": "pard", "model": draft, "num_speculative_tokens": 8})


def test_malformed_json_argument():
    with pytest.raises(argparse.ArgumentTypeError, match="malformed JSON"):
        SpeculativeConfigArgPatch.parse("{method: pard}")
    with pytest.raises(argparse.ArgumentTypeError, match="JSON object"):
        SpeculativeConfigArgPatch.parse("[1, 2]")
    assert SpeculativeConfigArgPatch.parse('{"method": "pard"}') == {"method": "pard"}


def _vllm_serve_error(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    from pard_vllm.server import vllm_executable

    return subprocess.run([vllm_executable(), "serve", *args, "--port", "1"], capture_output=True,
                          text=True, timeout=300, env=None if env is None else {**os.environ, **env})


def test_vllm_serve_malformed_json_is_one_line(embedded):
    res = _vllm_serve_error(embedded["target"], "--speculative-config", "{'method': 'pard'}")
    assert res.returncode != 0
    assert "malformed JSON" in res.stderr and "Traceback" not in res.stderr


def test_vllm_serve_bad_config_is_one_line(embedded, tmp_path):
    res = _vllm_serve_error(embedded["target"], "--speculative-config", json.dumps(
        {"method": "pard", "model": str(tmp_path / "missing"), "num_speculative_tokens": 8}))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: draft model path") and "does not exist" in last


def test_vllm_serve_bad_environment_switch_is_one_line(embedded):
    """The engine process reads PARD_VLLM_ADAPTIVE_LOG_STEPS; a bad value must stop
    `vllm serve` in the front end, before any engine starts, with one line."""
    res = _vllm_serve_error(embedded["target"], "--speculative-config", json.dumps(
        {"method": "pard", "model": embedded["draft"], "num_speculative_tokens": 4, "adaptive": "goodput"}),
        env={"PARD_VLLM_ADAPTIVE_LOG_STEPS": "every 60"})
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: PARD_VLLM_ADAPTIVE_LOG_STEPS must be a step count >= 1"), last


def test_plugin_refuses_unsupported_vllm():
    from pard_vllm.plugin import _check_vllm_version

    _check_vllm_version("0.32.0")
    _check_vllm_version("0.33.1+cu129")
    for bad in ("0.31.9", "0.34.0", "1.0.0"):
        with pytest.raises(PardConfigError, match="supports vLLM >=0.32,<0.34"):
            _check_vllm_version(bad)
